"""Several label columns of the manifest train several tasks: one query token and head each, per-task
metrics in training and prediction, checkpoints that rebuild them, and refusals before any work."""

from __future__ import annotations

import csv
import http.client
import json
import shutil
import threading

import h5py
import numpy as np
import pytest
import torch

import ips_path.training.train as train_module
from ips_path.cli.main import main
from ips_path.config import TrainConfig, resolve_config
from ips_path.inference.predict import predict
from ips_path.model import Task
from ips_path.model.tasks import MISSING_TARGET
from ips_path.review.report import write_report
from ips_path.review.view.cohort import open_cohort
from ips_path.review.view.server import ViewerApp, make_server
from ips_path.runtime.errors import BadInputError
from ips_path.tasks.label_columns import LabelTasks, validation_metrics
from ips_path.training.checkpoint import checkpoint_identity, load_checkpoint, load_model
from ips_path.training.cross_validation import train_cross_validated
from ips_path.training.train import train

FAST = dict(n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=2, threads=2, warmup_epochs=0.0,
            device="cpu", augment=False)
# task "site": a second column of the manifest, unrelated to the pixels (plumbing only); the last slide has none
SITES = ["A", "B", "B", "A", "A", "B", "A", ""]


def _two_task_manifest(manifest, path, sites=SITES):
    """The cohort's slides with columns lesion (its label: what the pixels show) and site, and no label column."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "lesion", "site", "case_id"])
        for row, site in zip(rows, sites, strict=True):
            writer.writerow([row["slide_id"], manifest.parent / row["slide_path"], row["label"], site, row["case_id"]])
    return path


@pytest.fixture(scope="module")
def two_tasks(cohort, tmp_path_factory):
    """(manifest, tiles, run folder, TrainResult) of a two-task run on the cohort; the tiles are a copy, as
    predictions write their scores into the stores."""
    manifest, shared_tiles = cohort
    root = tmp_path_factory.mktemp("two_tasks")
    tiles = shutil.copytree(shared_tiles, root / "tiles")
    two = _two_task_manifest(manifest, root / "manifest.csv")
    result = train(two, tiles, root / "run", TrainConfig(label_columns="lesion,site", **FAST), progress=False)
    return two, tiles, root / "run", result


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_two_label_columns_train_two_tasks_logged_per_task_and_by_their_mean(two_tasks):
    _, _, run, result = two_tasks
    assert [t.name for t in result.model.tasks] == ["lesion", "site"]
    assert result.model.aggregator.queries.shape[0] == 2  # one query token per task
    history = _csv(run / "metrics.csv")
    assert len(history) == 2
    for row in history:
        for task in ("lesion", "site"):
            for metric in ("loss", "auc", "auprc", "balanced_accuracy", "accuracy"):
                assert f"val_{task}_{metric}" in row
        per_task = [float(row[f"val_{t}_auc"]) for t in ("lesion", "site")]
        expected = np.nanmean(per_task) if not np.isnan(per_task).all() else float("nan")
        assert float(row["val_auc"]) == pytest.approx(expected, nan_ok=True)
        assert float(row["val_loss"]) == pytest.approx(sum(float(row[f"val_{t}_loss"]) for t in ("lesion", "site")))
        assert float(row["train_loss"]) == pytest.approx(sum(float(row[f"train_{t}_loss"]) for t in ("lesion", "site")),
                                                         rel=1e-5)
    splits = _csv(run / "splits.csv")
    assert {"lesion", "site"} <= set(splits[0]) and "label" not in splits[0]
    assert [r["site"] for r in splits] == SITES


def test_a_two_task_checkpoint_rebuilds_its_tasks_and_its_identity_names_them(two_tasks):
    _, _, run, result = two_tasks
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["task_classes"] == {"lesion": ["negative", "positive"], "site": ["A", "B"]}
    assert checkpoint["class_names"] == ["lesion=negative", "lesion=positive", "site=A", "site=B"]
    model, _ = load_model(run / "last.pt")
    assert [(t.name, t.n_classes) for t in model.tasks] == [("lesion", 2), ("site", 2)]
    for name, value in result.model.state_dict().items():  # the run's final weights, reloaded
        assert torch.equal(model.state_dict()[name], value.cpu())
    identity = checkpoint_identity(run / "last.pt")
    assert identity.class_names == tuple(checkpoint["class_names"])
    assert identity.config["label_columns"] == "lesion,site"


def test_a_two_task_model_predicts_each_tasks_class_probabilities_and_metrics(two_tasks, tmp_path, capsys):
    manifest, tiles, run, _ = two_tasks
    out = tmp_path / "pred"
    with pytest.raises(SystemExit) as done:
        main(["-q", "predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(out),
              "--device", "cpu", "--no-heatmaps"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "lesion: AUC" in printed and "on 8 labelled slides" in printed
    assert "site: AUC" in printed and "on 7 labelled slides" in printed
    rows = {r["slide_id"]: r for r in _csv(out / "predictions.csv")}
    truth = {r["slide_id"]: r for r in _csv(manifest)}
    header = list(next(iter(rows.values())))
    assert header[:11] == ["slide_id", "label", "predicted", "label_lesion", "predicted_lesion", "label_site",
                           "predicted_site", "prob_lesion=negative", "prob_lesion=positive", "prob_site=A",
                           "prob_site=B"]
    for slide_id, row in rows.items():
        for task, classes in (("lesion", ["negative", "positive"]), ("site", ["A", "B"])):
            p = [float(row[f"prob_{task}={c}"]) for c in classes]
            assert sum(p) == pytest.approx(1, abs=1e-5)
            assert row[f"predicted_{task}"] == classes[int(np.argmax(p))]
            assert row[f"label_{task}"] == truth[slide_id][task]
        assert row["predicted"] == f"lesion={row['predicted_lesion']}; site={row['predicted_site']}"
        # the joined label only where every task is labelled
        expected = f"lesion={truth[slide_id]['lesion']}; site={truth[slide_id]['site']}" if truth[slide_id]["site"] \
            else ""
        assert row["label"] == expected

    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["tasks"]) == ["lesion", "site"]
    assert metrics["tasks"]["lesion"]["n_slides"] == 8
    assert metrics["tasks"]["site"]["n_slides"] == 7  # the slide without a site is left out of that task only
    assert metrics["tasks"]["site"]["classes"] == ["A", "B"]
    aucs = [metrics["tasks"][t]["auc"] for t in ("lesion", "site")]
    assert metrics["mean"]["auc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    for task in ("lesion", "site"):
        assert (out / f"roc_{task}.png").stat().st_size > 1000
        assert (out / f"reliability_{task}.png").stat().st_size > 1000
    assert not (out / "roc.png").exists()
    with h5py.File(out / "scores" / f"{next(iter(rows))}_scores.h5") as f:
        assert list(f["task_attention_scores"].attrs["tasks"]) == ["lesion", "site"]
        assert f["task_attention_scores"].shape == (2, f["attention_scores"].shape[0])

    assert json.loads((out / "run.json").read_text())["tasks"] == {"lesion": ["negative", "positive"],
                                                                   "site": ["A", "B"]}
    page = write_report(out).read_text(encoding="utf-8")
    for task in ("lesion", "site"):
        assert f"Performance: {task}" in page
        assert f"roc_{task}.png" in page
    # the report's filter offers the predictions the slides have (one class of every task)
    for value in {r["predicted"] for r in rows.values()}:
        assert f'<option value="{value}">' in page

    # the viewer offers each task's attention, from the task tokens of the real two-task model
    cohort = open_cohort(out)
    server = make_server(ViewerApp(cohort, cache_bytes=2**20), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        slide_id = next(iter(rows))
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.request("GET", f"/api/slide/{slide_id}")
        info = json.loads(connection.getresponse().read())
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
        cohort.close()
    assert [t["name"] for t in info["tasks"]] == ["lesion", "site"]
    assert info["prediction"]["predicted"] == rows[slide_id]["predicted"]


def test_an_interrupted_two_task_run_resumes_to_the_same_result(two_tasks, tmp_path, monkeypatch):
    manifest, tiles, _, whole = two_tasks
    config = TrainConfig(label_columns="lesion,site", **FAST)
    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):  # Ctrl-C in the second step of epoch 2 (3 steps per epoch)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(manifest, tiles, tmp_path / "run", config, progress=False)
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    resumed = train(manifest, tiles, tmp_path / "run", config, resume=True, progress=False)
    assert resumed.epochs_completed == 2
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    with pytest.raises(BadInputError, match=r"label_columns \('lesion,site' -> 'site,lesion'\)"):
        train(manifest, tiles, tmp_path / "run", TrainConfig(label_columns="site,lesion", **FAST), resume=True,
              progress=False)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as done:
        main(["-q", "train", *args])
    return done.value.code, capsys.readouterr().err.strip().splitlines()


def test_an_unknown_label_column_is_refused_in_one_line_naming_the_manifests_columns(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    two = _two_task_manifest(manifest, tmp_path / "manifest.csv")
    code, lines = _cli(["--manifest", str(two), "--tiles", str(tiles), "-o", str(tmp_path / "run"),
                        "--label-columns", "lesion,grade", "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1
    assert str(two) in lines[0] and "missing column(s) grade" in lines[0]
    assert "the file has slide_id, slide_path, lesion, site, case_id" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_label_column_with_one_class_is_refused_in_one_line(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    two = _two_task_manifest(manifest, tmp_path / "manifest.csv", sites=["A"] * 7 + [""])
    code, lines = _cli(["--manifest", str(two), "--tiles", str(tiles), "-o", str(tmp_path / "run"),
                        "--label-columns", "lesion,site", "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1
    assert str(two) in lines[0] and "at least two classes in the site column, found ['A']" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_slide_with_no_value_in_any_label_column_is_refused_with_its_line(cohort, tmp_path):
    manifest, tiles = cohort
    two = _two_task_manifest(manifest, tmp_path / "manifest.csv")
    text = two.read_text().splitlines()
    cells = text[3].split(",")
    cells[2] = cells[3] = ""
    text[3] = ",".join(cells)
    two.write_text("\n".join(text) + "\n")
    with pytest.raises(BadInputError, match="line 4: slide .* has no value in any label column"):
        train(two, tiles, tmp_path / "run", TrainConfig(label_columns="lesion,site", **FAST), progress=False)


@pytest.mark.parametrize(("columns", "message"), [
    ("lesion,,site", "has an empty name"),
    ("lesion,lesion", "names a column twice"),
    ("lesion,case_id", "cannot learn the manifest's case_id"),
    ("lesion,a.b", "cannot name a task"),
    ("lesion,a/b", "cannot name a task"),
])
def test_bad_label_column_lists_are_refused_as_options(columns, message):
    with pytest.raises(BadInputError, match=message):
        TrainConfig(label_columns=columns)


def test_label_columns_read_from_a_yaml_list(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("label_columns: [grade, her2]\nepochs: 3\n")
    assert resolve_config(path).label_column_names == ("grade", "her2")


def test_several_label_columns_refuse_survival_and_the_instance_loss():
    with pytest.raises(BadInputError, match="--label-columns is for classification"):
        TrainConfig(label_columns="a,b", task="survival")
    with pytest.raises(BadInputError, match="--instance-loss needs one label column"):
        TrainConfig(label_columns="a,b", instance_loss=1.0)


def test_a_slide_without_a_label_for_a_task_counts_for_nothing_in_its_loss():
    task = Task("site", 3)
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, MISSING_TARGET, 2, 1])
    known = target != MISSING_TARGET
    assert torch.equal(task.loss(logits, target), task.loss(logits[known], target[known]))
    weights = torch.tensor([1.0, 2.0, 0.5])
    assert torch.equal(task.loss(logits, target, weights), task.loss(logits[known], target[known], weights))
    none = task.loss(logits, torch.full((4,), MISSING_TARGET))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_task_without_labelled_validation_slides_has_undefined_metrics_and_the_mean_skips_it():
    label_tasks = LabelTasks(("lesion", "site"), (("negative", "positive"), ("A", "B")))
    logits = {"lesion": torch.tensor([[2.0, -1.0], [-1.0, 2.0]]), "site": torch.tensor([[0.5, 0.1], [0.2, 0.3]])}
    row = validation_metrics(label_tasks, label_tasks.tasks(), logits, [(0, MISSING_TARGET), (1, MISSING_TARGET)])
    assert row["val_lesion_auc"] == 1.0 and np.isnan(row["val_site_auc"]) and np.isnan(row["val_site_recall_A"])
    assert row["val_auc"] == 1.0 and row["val_balanced_accuracy"] == 1.0
    assert row["val_site_loss"] == 0.0 and row["val_loss"] == pytest.approx(row["val_lesion_loss"])


def test_a_single_label_run_keeps_its_one_task_and_plain_class_names(trained_run):
    checkpoint = load_checkpoint(trained_run / "best.pt")
    assert "task_classes" not in checkpoint and checkpoint["task"] == "label"
    assert checkpoint["class_names"] == ["negative", "positive"]
    model, _ = load_model(trained_run / "best.pt")
    assert [(t.name, t.n_classes) for t in model.tasks] == [("label", 2)]
    header = list(_csv(trained_run / "metrics.csv")[0])
    assert "val_auc" in header and not any(k.startswith(("val_label_", "train_label_")) for k in header)


def test_one_other_label_column_trains_one_task_named_after_it(two_tasks, tmp_path):
    manifest, tiles, _, _ = two_tasks
    result = train(manifest, tiles, tmp_path / "run", TrainConfig(label_columns="lesion", **{**FAST, "epochs": 1}),
                   progress=False)
    assert [t.name for t in result.model.tasks] == ["lesion"]
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["class_names"] == ["negative", "positive"] and "task_classes" not in checkpoint
    prediction = predict(tmp_path / "run", tmp_path / "pred", manifest=manifest, tiles_dir=tiles, heatmaps=False,
                         progress=False)
    assert prediction.metrics["n_slides"] == 8  # the truth is the lesion column
    assert {r["label"] for r in _csv(tmp_path / "pred" / "predictions.csv")} == {"negative", "positive"}


def test_a_two_task_cross_validation_stratifies_on_the_first_column_and_its_ensemble_predicts_each_task(
        two_tasks, tmp_path):
    manifest, tiles, _, _ = two_tasks
    config = TrainConfig(label_columns="lesion,site", **{**FAST, "epochs": 1})
    cv = train_cross_validated(manifest, tiles, tmp_path / "cv", config, 2, progress=False)
    assert [row["fold"] for row in cv.folds] == [0, 1]
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert summary["metrics"][:3] == ["auc", "balanced_accuracy", "auprc"]
    assert {"lesion_auc", "site_auc", "lesion_balanced_accuracy"} <= set(summary["metrics"])
    for row in cv.folds:
        per_task = [row[f"val_{t}_auc"] for t in ("lesion", "site")]
        assert row["val_auc"] == pytest.approx(np.nanmean(per_task), nan_ok=True)
    splits = _csv(tmp_path / "cv" / "splits.csv")
    assert list(splits[0]) == ["slide_id", "case_id", "lesion", "site", "fold"]
    for fold in ("0", "1"):  # the lesion column, stratified: two slides of each class per fold
        assert sorted(r["lesion"] for r in splits if r["fold"] == fold) == ["negative"] * 2 + ["positive"] * 2
    fold_history = _csv(tmp_path / "cv" / "fold_0" / "metrics.csv")[0]
    assert "val_lesion_auc" in fold_history and "val_site_auc" in fold_history

    result = predict(tmp_path / "cv", tmp_path / "pred", manifest=manifest, tiles_dir=tiles, heatmaps=False,
                     progress=False)
    assert result.exit_code == 0 and sorted(result.metrics["tasks"]) == ["lesion", "site"]
    for row in _csv(tmp_path / "pred" / "predictions.csv"):
        for column in ("prob_lesion=positive", "prob_site=B"):
            folds = [float(row[f"fold{i}_{column}"]) for i in (0, 1)]
            assert float(row[column]) == pytest.approx(np.mean(folds), abs=1e-5)
