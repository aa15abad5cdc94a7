"""`ipspath train --task survival --folds K`: folds by patient, stratified by event and follow-up, C-indices."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ips_path.cli.train_cmd import train_cmd
from ips_path.config import TrainConfig
from ips_path.inference.predict import predict
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow
from ips_path.tasks.survival.cohort import survival_folds
from ips_path.training.cross_validation import train_cross_validated

pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")

FAST_OPTIONS = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
                "--threads", "2", "--warmup-epochs", "0", "--device", "cpu", "--no-augment", "--epochs", "1"]
# (time in months, event) of the 4 patients of the session cohort's 8 slides (two slides each)
PATIENT_OUTCOMES = [(5, 1), (9, 0), (12, 1), (20, 0)]


def _rows(n_patients: int, event_every: int) -> list[ManifestRow]:
    """Two slides per patient; every ``event_every``-th patient has the event."""
    return [ManifestRow(slide_id=f"p{p}_s{s}", slide_path=Path(f"/x/p{p}_s{s}.svs"), label=None, split=None,
                        case_id=f"p{p}", mpp=None, line=2, time=float(1 + (7 * p) % 23),
                        event=int(p % event_every == 0))
            for p in range(n_patients) for s in range(2)]


def test_survival_folds_keep_patients_whole_and_spread_events_and_follow_up():
    rows = _rows(30, event_every=3)
    folds = survival_folds(rows, 5, "m.csv", seed=3)
    fold_of_case: dict[str, set] = {}
    for r in rows:
        fold_of_case.setdefault(r.case_id, set()).add(folds[r.slide_id])
    assert all(len(f) == 1 for f in fold_of_case.values())  # a patient is never in two folds
    first = [r for r in rows if r.slide_id.endswith("_s0")]
    events = np.bincount([folds[r.slide_id] for r in first if r.event], minlength=5)
    assert events.min() >= 1 and events.max() - events.min() <= 1  # 10 events: 2 per fold
    late = np.bincount([folds[r.slide_id] for r in first if r.time > 12], minlength=5)
    assert late.max() - late.min() <= 2  # early and late follow-up in every fold
    assert survival_folds(rows, 5, "m.csv", seed=3) == folds


def test_more_folds_than_patients_with_events_are_refused_naming_the_fold():
    rows = _rows(9, event_every=4)  # events in patients 0, 4 and 8: three of them for four folds
    with pytest.raises(BadInputError, match=r"m.csv: --folds 4 leaves fold\(s\) 1 without any patient with an event "
                                            r"\(event = 1\): their C-index is undefined; use at most 3 folds"):
        survival_folds(rows, 4, "m.csv")


def _manifest(cohort_manifest: Path, out: Path) -> Path:
    """The cohort's 8 slides as 4 patients of two slides each, with outcomes and no split."""
    with cohort_manifest.open(newline="") as f:
        slides = list(csv.DictReader(f))
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "case_id", "time", "event"])
        for i, row in enumerate(slides):
            time, event = PATIENT_OUTCOMES[i // 2]
            writer.writerow([row["slide_id"], cohort_manifest.parent / row["slide_path"], f"patient{i // 2}", time,
                             event])
    return out


def test_survival_cross_validation_reports_c_indices_per_fold_and_resumes(cohort, tmp_path):
    manifest, tiles = cohort
    survival_csv = _manifest(manifest, tmp_path / "m.csv")
    run = tmp_path / "cv"
    result = CliRunner().invoke(train_cmd, ["--manifest", str(survival_csv), "--tiles", str(tiles), "-o", str(run),
                                            "--task", "survival", "--folds", "2", *FAST_OPTIONS],
                                obj={"quiet": True, "debug": False})
    assert result.exit_code == 0, result.output
    assert "2-fold cross-validation done; validation c_index" in result.output and "uno_c_index" in result.output

    with (run / "splits.csv").open() as f:
        splits = list(csv.DictReader(f))
    fold_of_patient: dict[str, set] = {}
    for r in splits:
        fold_of_patient.setdefault(r["case_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in fold_of_patient.values())  # no patient split between folds
    for fold in ("0", "1"):  # each fold holds an event (so each fold's training slides do too)
        assert any(r["event"] == "1" for r in splits if r["fold"] == fold)
        with (run / f"fold_{fold}" / "splits.csv").open() as f:
            val = {r["slide_id"] for r in csv.DictReader(f) if r["split"] == "val"}
        assert val == {r["slide_id"] for r in splits if r["fold"] == fold}

    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["metrics"] == ["c_index", "uno_c_index"]
    assert [r["fold"] for r in summary["per_fold"]] == [0, 1]
    for fold in (0, 1):  # the fold's C-indices are those its own run measured with its best weights
        measured = json.loads((run / f"fold_{fold}" / "survival_metrics.json").read_text())["validation"]
        row = summary["per_fold"][fold]
        assert row["val_c_index"] == pytest.approx(measured["c_index"]) and 0 <= row["val_c_index"] <= 1
        assert row["val_uno_c_index"] == pytest.approx(measured["uno_c_index"], nan_ok=True)
    values = [r["val_c_index"] for r in summary["per_fold"]]
    assert summary["summary"]["c_index"]["mean"] == pytest.approx(np.mean(values))
    assert summary["summary"]["c_index"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert "auc" not in summary["summary"]

    # A lost fold is trained again on --resume, the same way; a finished fold is neither trained nor measured again.
    kept = {name: (run / "fold_0" / name).stat().st_mtime_ns for name in ("best.pt", "survival_metrics.json")}
    shutil.rmtree(run / "fold_1")
    config = TrainConfig(task="survival", n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=1,
                         threads=2, warmup_epochs=0.0, device="cpu", augment=False)
    again = train_cross_validated(survival_csv, tiles, run, config, 2, resume=True, progress=False)
    assert {name: (run / "fold_0" / name).stat().st_mtime_ns for name in kept} == kept
    assert again.folds[1]["val_c_index"] == pytest.approx(summary["per_fold"][1]["val_c_index"])
    assert not math.isnan(again.summary["c_index"]["mean"])

    # The fold models do not make one survival model: predicting with the run is refused before any slide.
    with pytest.raises(BadInputError, match="an ensemble of survival models is not supported; give one fold's run"):
        predict(run, tmp_path / "pred", manifest=survival_csv, tiles_dir=tiles, progress=False)
    assert not (tmp_path / "pred" / "predictions.csv").exists()
