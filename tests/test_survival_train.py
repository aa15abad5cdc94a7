"""`ipspath train --task survival` end to end on the generated cohort, and its refusals."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ips_path.cli.predict_cmd import predict_cmd
from ips_path.cli.train_cmd import train_cmd
from ips_path.config import TrainConfig
from ips_path.inference.predict import predict
from ips_path.review.report import write_report
from ips_path.runtime.errors import BadInputError
from ips_path.training.checkpoint import load_checkpoint, load_model
from ips_path.training.train import train

pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")

FAST_OPTIONS = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
                "--threads", "2", "--warmup-epochs", "1", "--device", "cpu", "--no-augment"]
# (time in months, event, split) per slide of the session cohort (8 slides)
OUTCOMES = [(5, 1, "train"), (9, 0, "train"), (12, 1, "train"), (3, 1, "train"), (20, 0, "train"),
            (7, 1, "val"), (15, 0, "val"), (2, 1, "val")]


def survival_manifest(cohort_manifest: Path, out: Path, outcomes=OUTCOMES) -> Path:
    """The cohort's slides with survival outcomes (no label column)."""
    with cohort_manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "case_id", "time", "event", "split"])
        for row, (time, event, split) in zip(rows, outcomes, strict=True):
            writer.writerow([row["slide_id"], cohort_manifest.parent / row["slide_path"], row["case_id"], time, event,
                             split])
    return out


def _invoke(args):
    return CliRunner().invoke(train_cmd, args, obj={"quiet": True, "debug": False})


@pytest.fixture(scope="module")
def cox_run(cohort, tmp_path_factory):
    """A two-epoch Cox run on the cohort (through the command line): (run folder, its output)."""
    manifest, tiles = cohort
    root = tmp_path_factory.mktemp("cox")
    run = root / "run"
    result = _invoke(["--manifest", str(survival_manifest(manifest, root / "m.csv")), "--tiles", str(tiles),
                      "-o", str(run), "--task", "survival", "--epochs", "2", "--time-unit", "weeks", *FAST_OPTIONS])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_cli_trains_a_cox_model_and_writes_c_index_and_kaplan_meier(cox_run):
    run, output = cox_run
    assert "best validation c_index" in output

    with (run / "metrics.csv").open() as f:
        history = list(csv.DictReader(f))
    assert 0 <= float(history[-1]["val_c_index"]) <= 1 and math.isfinite(float(history[-1]["val_loss"]))
    assert "val_auc" not in history[-1]
    with (run / "splits.csv").open() as f:
        splits = list(csv.DictReader(f))
    assert [(float(r["time"]), int(r["event"]), r["split"]) for r in splits] == [tuple(o) for o in OUTCOMES]

    summary = json.loads((run / "survival_metrics.json").read_text())
    validation = summary["validation"]
    assert validation["n"] == 3 and validation["n_events"] == 2 and summary["time_unit"] == "weeks"
    assert validation["c_index"] == pytest.approx(float(history[int(load_checkpoint(run / "best.pt")["epoch"]) - 1]
                                                        ["val_c_index"]))
    assert validation["c_index_low"] <= validation["c_index"] <= validation["c_index_high"]
    assert (run / "km_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = load_checkpoint(run / "best.pt")
    assert best["task"] == "survival" and best["class_names"] == []
    assert best["survival"]["risk_cutoffs"] == summary["risk_cutoffs"] and len(summary["risk_cutoffs"]) == 1
    assert best["survival"]["reference_time"] == [5.0, 9.0, 12.0, 3.0, 20.0]
    model, _ = load_model(run / "best.pt")
    assert model.tasks[0].kind == "survival" and model.tasks[0].is_cox


def test_predict_scores_slides_and_patients_and_the_report_shows_c_index_and_kaplan_meier(cox_run, cohort, tmp_path):
    run, _ = cox_run
    manifest, tiles = cohort
    # a new cohort: the same slides as four patients of two slides each, with their own outcomes
    with manifest.open(newline="") as f:
        slides = list(csv.DictReader(f))
    new = tmp_path / "new.csv"
    with new.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "case_id", "time", "event"])
        for i, row in enumerate(slides):
            patient = i // 2
            writer.writerow([row["slide_id"], manifest.parent / row["slide_path"], f"patient{patient}",
                             [4, 10, 6, 30][patient], [1, 1, 0, 1][patient]])
    out = tmp_path / "pred"
    result = predict(run, out, manifest=new, tiles_dir=tiles, device="cpu", threads=2, heatmaps=False,
                     progress=False)
    assert result.exit_code == 0

    with (out / "predictions.csv").open() as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == 8 and all(r["status"] == "done" for r in predicted)
    assert {r["predicted"] for r in predicted} <= {"low risk", "high risk"}
    cutoff = load_checkpoint(run / "best.pt")["survival"]["risk_cutoffs"][0]
    assert all((float(r["risk"]) > cutoff) == (r["predicted"] == "high risk") for r in predicted
               if abs(float(r["risk"]) - cutoff) > 1e-5)  # the CSV rounds; a training slide sits on the median
    assert not any(c.startswith("prob_") for c in predicted[0])

    with (out / "patients.csv").open() as f:
        patients = list(csv.DictReader(f))
    assert [p["case_id"] for p in patients] == [f"patient{i}" for i in range(4)]
    assert float(patients[0]["risk"]) == pytest.approx(np.mean([float(r["risk"]) for r in predicted[:2]]), abs=1e-5)
    metrics = json.loads((out / "survival_metrics.json").read_text())
    assert metrics["n_patients"] == 4 and metrics["n_events"] == 3 and metrics["time_unit"] == "weeks"
    assert result.metrics["c_index"] == pytest.approx(metrics["c_index"])
    assert (out / "km.png").is_file() and not (out / "metrics.json").exists()
    assert (out / "scores" / f"{predicted[0]['slide_id']}_scores.h5").is_file()  # attention of the survival token

    again = CliRunner().invoke(predict_cmd, ["--model", str(run), "--manifest", str(new), "--tiles", str(tiles), "-o",
                                             str(out), "--no-heatmaps", "--device", "cpu"],
                               obj={"quiet": True, "debug": False})
    assert again.exit_code == 0, again.output
    assert f"C-index {metrics['c_index']:.3f}" in again.output and "on 4 patients" in again.output

    page = write_report(out).read_text()
    assert "C-index (Harrell)" in page and f"{metrics['c_index']:.3f}" in page
    assert 'src="km.png"' in page and "Kaplan-Meier curves of the risk groups" in page


def test_discrete_time_model_keeps_its_bins_and_measures_a_brier_score(cohort, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "run"
    config = TrainConfig(task="survival", survival_loss="nll", time_bins=2, risk_groups=3, epochs=1, batch_size=2,
                         n_select=8, chunk_size=16, dim=32, heads=4, threads=2, device="cpu", augment=False)
    result = train(survival_manifest(manifest, tmp_path / "m.csv"), tiles, run, config, progress=False)
    assert result.best_epoch == 1
    state = load_checkpoint(run / "best.pt")["survival"]
    assert state["loss"] == "nll" and state["bin_edges"] == [0.0, 5.0, math.inf]  # median of train events 3, 5, 12
    assert len(state["risk_cutoffs"]) == 2  # tertiles
    summary = json.loads((run / "survival_metrics.json").read_text())
    assert 0 <= summary["validation"]["integrated_brier_score"] <= 1
    model, _ = load_model(run / "best.pt")
    assert model.tasks[0].n_outputs == 2


def test_a_validation_split_without_events_is_refused_before_training(cohort, tmp_path):
    manifest, tiles = cohort
    outcomes = [(t, e if s == "train" else 0, s) for t, e, s in OUTCOMES]
    result = _invoke(["--manifest", str(survival_manifest(manifest, tmp_path / "m.csv", outcomes)), "--tiles",
                      str(tiles), "-o", str(tmp_path / "run"), "--task", "survival", *FAST_OPTIONS])
    assert isinstance(result.exception, BadInputError)  # the command line turns it into one line and exit code 2
    assert "no event (event = 1) in split(s) val (3 slide(s), all censored)" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_survival_needs_time_and_event_columns_and_a_survival_monitor(cohort, tmp_path):
    manifest, tiles = cohort
    with pytest.raises(BadInputError, match="missing column\\(s\\) time, event"):
        train(manifest, tiles, tmp_path / "run", TrainConfig(task="survival"), progress=False)
    with pytest.raises(BadInputError, match="monitor balanced_accuracy does not exist for survival"):
        TrainConfig(task="survival", monitor="balanced_accuracy")
    with pytest.raises(BadInputError, match="class_weights is for classification"):
        TrainConfig(task="survival", class_weights=True)
