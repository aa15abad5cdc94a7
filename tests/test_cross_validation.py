"""Patient-level k-fold cross-validation (``ipspath train --folds K``) and the evaluation metrics it reports."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from ips_path.config import TrainConfig
from ips_path.evaluation.metrics import (
    average_precision,
    bootstrap_intervals,
    calibration,
    classification_metrics,
    macro_auprc,
    patient_level,
)
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow
from ips_path.training.cross_validation import assign_folds, fold_splits, train_cross_validated

FAST = dict(n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=1, threads=2, warmup_epochs=0.0,
            device="cpu", augment=False)


def _rows(n_patients: int, slides_per_patient: int = 2, test_patients: int = 0) -> list[ManifestRow]:
    rows = []
    for p in range(n_patients):
        label = "positive" if p % 3 == 0 else "negative"
        for s in range(slides_per_patient):
            rows.append(ManifestRow(slide_id=f"p{p}_s{s}", slide_path=Path(f"/x/p{p}_s{s}.svs"), label=label,
                                    split="test" if p < test_patients else None, case_id=f"p{p}", mpp=None, line=2))
    return rows


def test_folds_keep_patients_whole_spread_each_label_and_leave_the_test_split_out():
    rows = _rows(23, test_patients=3)
    folds = assign_folds(rows, 5, seed=1)
    by_case: dict[str, set] = {}
    for r in rows:
        by_case.setdefault(r.case_id, set()).add(folds[r.slide_id])
    assert all(len(f) == 1 for f in by_case.values())  # a patient is never in two folds
    assert {folds[r.slide_id] for r in rows if r.split == "test"} == {"test"}
    patients_per_fold = np.bincount([next(iter(f)) for c, f in by_case.items() if f != {"test"}], minlength=5)
    assert patients_per_fold.max() - patients_per_fold.min() <= 1
    for label in ("positive", "negative"):
        per_fold = np.bincount([folds[r.slide_id] for r in rows if r.label == label and r.split != "test"
                                and r.slide_id.endswith("_s0")], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, label
    assert assign_folds(rows, 5, seed=1) == folds and assign_folds(rows, 5, seed=2) != folds
    split = fold_splits(folds, 0)
    assert {split[s] for s, f in folds.items() if f == 0} == {"val"}
    assert {split[s] for s, f in folds.items() if f not in (0, "test")} == {"train"}


def test_more_folds_than_patients_is_refused():
    with pytest.raises(BadInputError, match="--folds 5 needs at least 5 patients outside the test split, found 4"):
        assign_folds(_rows(6, test_patients=2), 5)


def test_cross_validation_writes_folds_summary_and_resumes_fold_by_fold(cohort, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "cv"
    config = TrainConfig(**FAST)
    result = train_cross_validated(manifest, tiles, run, config, 2, progress=False)

    with (run / "splits.csv").open() as f:
        splits = list(csv.DictReader(f))
    assert {r["fold"] for r in splits} == {"0", "1"}
    summary = json.loads((run / "cv_summary.json").read_text())
    assert [r["fold"] for r in summary["per_fold"]] == [0, 1]
    for metric in ("auc", "balanced_accuracy", "auprc"):
        values = [r[f"val_{metric}"] for r in summary["per_fold"]]
        assert summary["summary"][metric]["mean"] == pytest.approx(np.mean(values))
        assert summary["summary"][metric]["sd"] == pytest.approx(np.std(values, ddof=1))
    for fold in (0, 1):  # each fold validated on its own slides only
        with (run / f"fold_{fold}" / "splits.csv").open() as f:
            val = {r["slide_id"] for r in csv.DictReader(f) if r["split"] == "val"}
        assert val == {r["slide_id"] for r in splits if r["fold"] == str(fold)}
    assert result.folds[0]["best_epoch"] == 1

    # A fold lost (or never finished) is trained again on --resume; a finished fold is kept as it is.
    kept = (run / "fold_0" / "best.pt").stat().st_mtime_ns
    shutil.rmtree(run / "fold_1")
    again = train_cross_validated(manifest, tiles, run, config, 2, resume=True, progress=False)
    assert (run / "fold_0" / "best.pt").stat().st_mtime_ns == kept
    for metric in ("val_auc", "val_balanced_accuracy", "val_auprc"):  # the same seed gives the same fold run
        assert again.folds[1][metric] == pytest.approx(result.folds[1][metric], nan_ok=True)
    with pytest.raises(BadInputError, match="already holds a cross-validation"):
        train_cross_validated(manifest, tiles, run, config, 2, progress=False)


def test_average_precision_is_the_step_wise_area_under_precision_recall():
    # scikit-learn's documented example: average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) = 0.8333
    assert average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.8333333)
    assert average_precision(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert math.isnan(average_precision(np.array([0, 0]), np.array([0.2, 0.9])))
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    assert macro_auprc(np.array([0, 1, 2, 0]), three) == pytest.approx(1.0)
    assert "auprc" in classification_metrics(np.array([0, 1]), np.array([[0.7, 0.3], [0.2, 0.8]]), ["a", "b"])


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_bins_form_the_reliability_diagram():
    labels = np.array([1, 1, 1, 0] * 5)  # confidence 0.75 for class 1, right 3 times in 4
    probabilities = np.tile([0.25, 0.75], (20, 1))
    calibrated = calibration(labels, probabilities)
    assert calibrated["ece"] == pytest.approx(0.0)
    assert calibrated["bins"] == [{"lower": 0.7, "upper": 0.8, "confidence": 0.75, "accuracy": 0.75, "count": 20}]
    overconfident = calibration(labels, np.tile([0.01, 0.99], (20, 1)))
    assert overconfident["ece"] == pytest.approx(0.24)


def test_bootstrap_intervals_hold_the_estimate_and_patients_pool_their_slides():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1)
    probabilities = np.stack([1 - scores, scores], axis=1)
    intervals = bootstrap_intervals(labels, probabilities, n_bootstrap=300)
    metrics = classification_metrics(labels, probabilities, ["a", "b"])
    for name in ("auc", "auprc", "balanced_accuracy"):
        low, high = intervals[name]
        assert low <= metrics[name] <= high and high - low < 0.5, name
    assert all(math.isnan(v) for v in bootstrap_intervals(np.zeros(5, int), probabilities[:5])["auc"])

    cases, patient_labels, pooled = patient_level(["b", "a", "b"], np.array([1, 0, 1]),
                                                  np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]))
    assert cases == ["a", "b"] and patient_labels.tolist() == [0, 1]
    np.testing.assert_allclose(pooled, [[0.9, 0.1], [0.3, 0.7]])
