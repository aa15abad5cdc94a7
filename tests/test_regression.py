"""`ipspath train --task regression`: a number per slide (here its lesion area), end to end, and its refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ips_path.cli.main import main
from ips_path.config import TrainConfig
from ips_path.review.report import write_report
from ips_path.review.view.cohort import open_cohort
from ips_path.review.view.server import ViewerApp
from ips_path.runtime.errors import BadInputError
from ips_path.stores.features import extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth_regression import write_regression_cohort
from ips_path.tasks.regression import regression_metrics
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides
from ips_path.training.checkpoint import load_checkpoint, load_model

FAST = ["--features", "stain_density", "--n-select", "64", "--chunk-size", "64", "--dim", "16", "--heads", "2",
        "--batch-size", "2", "--threads", "1", "--warmup-epochs", "1", "--device", "cpu", "--lr", "1e-3"]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(["-q", *args])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lesion_cohort(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """Eight generated slides whose ``lesion_area`` column is their lesion area (percent of tissue), tiled at
    2 µm/px into 32 px patches with stain_density features: (manifest, tiles, areas)."""
    root = tmp_path_factory.mktemp("regression")
    _, area = write_regression_cohort(root / "slides", 8, size=(1024, 768), mpp=1.0, downsamples=(1,), seed=5,
                                      workers=2, lesion_diameter_um=(150.0, 300.0), positive_fraction=0.75)
    manifest = root / "slides" / "manifest.csv"
    tiles = root / "tiles"
    tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=2.0, patch_size=32, qc=False),
                progress=False)
    assert all(o.ok for o in extract_features(sorted(tiles.glob("*.zarr")), "stain_density", progress=False))
    return manifest, tiles, area


@pytest.fixture(scope="module")
def regression_run(lesion_cohort, tmp_path_factory) -> Path:
    manifest, tiles, _ = lesion_cohort
    run = tmp_path_factory.mktemp("regression_run") / "run"
    with pytest.raises(SystemExit) as done:
        main(["-q", "train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--task",
              "regression", "--label-columns", "lesion_area", "--epochs", "2", *FAST])
    assert done.value.code == 0
    return run


def test_the_generated_target_is_each_slides_lesion_area(lesion_cohort):
    manifest, _, area = lesion_cohort
    rows = _csv(manifest)
    assert [float(r["lesion_area"]) for r in rows] == pytest.approx(area.tolist())
    assert {r["label"] for r in rows if float(r["lesion_area"]) == 0} <= {"negative"}
    assert all(float(r["lesion_area"]) > 0 for r in rows if r["label"] == "positive")


def test_training_logs_correlations_and_keeps_the_training_scale_in_the_checkpoint(regression_run):
    history = _csv(regression_run / "metrics.csv")
    assert {"val_pearson", "val_spearman", "val_mae", "val_r2", "val_loss"} <= set(history[0])
    assert "val_auc" not in history[0]
    splits = _csv(regression_run / "splits.csv")
    train_values = np.array([float(r["lesion_area"]) for r in splits if r["split"] == "train"])
    checkpoint = load_checkpoint(regression_run / "best.pt")
    saved = checkpoint["regression"]
    assert saved["column"] == "lesion_area" and saved["loss"] == "mse" and checkpoint["class_names"] == []
    assert saved["mean"] == pytest.approx(train_values.mean()) and saved["sd"] == pytest.approx(train_values.std())
    model, _ = load_model(regression_run / "best.pt")
    assert [(t.name, t.kind, t.n_outputs) for t in model.tasks] == [("lesion_area", "regression", 1)]


def test_prediction_writes_numbers_their_metrics_a_scatter_plot_and_a_report(regression_run, lesion_cohort, tmp_path,
                                                                          capsys):
    manifest, tiles, area = lesion_cohort
    out = tmp_path / "pred"
    code, printed, _ = _run(["predict", "--model", str(regression_run), "--manifest", str(manifest), "--tiles",
                             str(tiles), "-o", str(out), "--device", "cpu", "--no-heatmaps"], capsys)
    assert code == 0 and "lesion_area: Pearson r" in printed and "on 8 slides" in printed
    rows = _csv(out / "predictions.csv")
    assert list(rows[0]) == ["slide_id", "label", "predicted", "n_patches", "status", "error"]
    assert [float(r["label"]) for r in rows] == pytest.approx(area.tolist())

    model, checkpoint = load_model(regression_run / "best.pt")  # predicted = the head's output in the column's unit
    scale = checkpoint["regression"]
    store = TileStore.open(tiles / f"{rows[0]['slide_id']}.zarr")
    with torch.no_grad():
        output = float(model.predict_slide(PatchStreamer(chunk_size=64, threads=1).stream_features(
            store, "stain_density")).logits["lesion_area"].reshape(-1)[0])
    assert float(rows[0]["predicted"]) == pytest.approx(output * scale["sd"] + scale["mean"], abs=1e-5)

    metrics = json.loads((out / "regression_metrics.json").read_text())
    predicted = np.array([float(r["predicted"]) for r in rows])
    assert metrics["n_slides"] == 8 and metrics["column"] == "lesion_area"
    for name, value in regression_metrics(area, predicted).items():
        assert metrics[name] == pytest.approx(value, abs=1e-5)
        low, high = metrics[f"{name}_ci95"]
        assert low <= high
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "metrics.json").exists() and not (out / "roc.png").exists()

    page = write_report(out).read_text()
    assert "Regression: lesion_area" in page and "scatter.png" in page and "Pearson r (slides)" in page
    assert 'data-outcome="valued"' in page and "true value" in page

    app = ViewerApp(open_cohort(out))  # the viewer shows the number as the prediction, without classes
    shown = json.loads(app.slide_info(rows[0]["slide_id"]))["prediction"]
    assert float(shown["predicted"]) == pytest.approx(float(rows[0]["predicted"]))
    assert shown["classes"] == [] and shown["outcome"] == "valued"


def test_folds_train_by_target_tertile_and_predict_as_an_ensemble(lesion_cohort, tmp_path, capsys):
    manifest, tiles, _ = lesion_cohort
    run = tmp_path / "cv"
    code, printed, _ = _run(["train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--task",
                             "regression", "--label-columns", "lesion_area", "--regression-loss", "huber",
                             "--epochs", "1", "--folds", "2", *FAST], capsys)
    assert code == 0 and "validation pearson" in printed
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["metrics"] == ["pearson", "spearman", "mae", "r2"] and len(summary["per_fold"]) == 2
    folds = _csv(run / "splits.csv")
    assert {r["fold"] for r in folds} == {"0", "1"} and "lesion_area" in folds[0]
    assert load_checkpoint(run / "fold_0" / "best.pt")["regression"]["loss"] == "huber"

    out = tmp_path / "pred"
    code, _, _ = _run(["predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles), "-o",
                       str(out), "--device", "cpu", "--no-heatmaps"], capsys)
    assert code == 0
    for row in _csv(out / "predictions.csv"):
        folds = [float(row["fold0_predicted"]), float(row["fold1_predicted"])]
        assert float(row["predicted"]) == pytest.approx(np.mean(folds), abs=2e-6)


def test_a_cell_that_is_not_a_number_is_refused_naming_its_line(lesion_cohort, tmp_path, capsys):
    manifest, tiles, _ = lesion_cohort
    rows = _csv(manifest)
    rows[1]["lesion_area"] = "n.d."
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "slide_path": str(manifest.parent / r["slide_path"])} for r in rows)
    code, _, err = _run(["train", "--manifest", str(bad), "--tiles", str(tiles), "-o", str(tmp_path / "run"),
                         "--task", "regression", "--label-columns", "lesion_area", *FAST], capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"ipspath: error: {bad}: line 3: lesion_area 'n.d.' is not a number; a "
                                        "regression target needs a number in every lesion_area cell"]
    assert not (tmp_path / "run").exists()


def test_regression_options_that_make_no_sense_are_refused():
    with pytest.raises(BadInputError, match="a regression learns one column"):
        TrainConfig(task="regression", label_columns="a,b")
    with pytest.raises(BadInputError, match="monitor c_index does not exist for regression"):
        TrainConfig(task="regression", label_columns="a", monitor="c_index")
    with pytest.raises(BadInputError, match="class_weights is for classification"):
        TrainConfig(task="regression", label_columns="a", class_weights=True)
    assert TrainConfig(task="regression", label_columns="a").monitor == "pearson"


def test_regression_metrics_are_pearson_spearman_mae_and_r2():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    truth = rng.normal(size=50)
    predicted = truth + rng.normal(scale=0.5, size=50)
    predicted[:5] = predicted[5]  # ties
    found = regression_metrics(truth, predicted)
    assert found["pearson"] == pytest.approx(stats.pearsonr(truth, predicted)[0])
    assert found["spearman"] == pytest.approx(stats.spearmanr(truth, predicted)[0])
    assert found["mae"] == pytest.approx(np.mean(np.abs(truth - predicted)))
    assert found["r2"] == pytest.approx(1 - np.sum((truth - predicted) ** 2) / np.sum((truth - truth.mean()) ** 2))
    assert np.isnan(regression_metrics(truth[:1], predicted[:1])["pearson"])
