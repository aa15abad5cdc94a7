"""predict's metrics.json and the report: AUPRC, bootstrap intervals, calibration, patients beside slides."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ips_path.evaluation.metrics import macro_auc, macro_auprc
from ips_path.inference.predict import predict
from ips_path.review.report import write_report


def _manifest_with_patients(manifest, path):
    """The cohort's manifest with two slides of one label per patient (absolute slide paths)."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, int] = {}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "label", "case_id"])
        for row in rows:
            n = seen[row["label"]] = seen.get(row["label"], -1) + 1
            writer.writerow([row["slide_id"], manifest.parent / row["slide_path"], row["label"],
                             f"{row['label']}_patient_{n // 2}"])
    return path


def test_metrics_and_report_show_auprc_intervals_calibration_and_patients(trained_run, cohort, tmp_path):
    manifest, tiles = cohort
    patients_manifest = _manifest_with_patients(manifest, tmp_path / "manifest.csv")
    out = tmp_path / "pred"
    result = predict(trained_run, out, manifest=patients_manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    assert result.exit_code == 0

    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("auc", "auprc", "balanced_accuracy"):
        low, high = metrics[f"{name}_ci95"]
        assert low is None or low <= metrics[name] <= high
    assert 0 <= metrics["ece"] <= 1 and sum(b["count"] for b in metrics["calibration_bins"]) == metrics["n_slides"]
    assert (out / "reliability.png").stat().st_size > 1000

    # patients: the mean probability of a patient's two slides
    with (out / "predictions.csv").open(newline="") as f:
        slides = {r["slide_id"]: r for r in csv.DictReader(f)}
    with patients_manifest.open(newline="") as f:
        case_of = {r["slide_id"]: r["case_id"] for r in csv.DictReader(f)}
    classes = metrics["classes"]
    cases = sorted(set(case_of.values()))
    pooled = np.array([np.mean([[float(slides[s][f"prob_{c}"]) for c in classes]
                                for s in slides if case_of[s] == case], axis=0) for case in cases])
    truth = np.array([classes.index(next(slides[s]["label"] for s in slides if case_of[s] == case)) for case in cases])
    patients = metrics["patients"]
    assert patients["n_patients"] == len(cases) == metrics["n_slides"] // 2
    assert patients["auc"] == pytest.approx(macro_auc(truth, pooled), abs=1e-4)
    assert patients["auprc"] == pytest.approx(macro_auprc(truth, pooled), abs=1e-4)

    text = write_report(out).read_text(encoding="utf-8")
    for figure in ("AUC (slides)", "AUPRC (slides)", "Balanced accuracy (slides)", "Calibration error (slides)",
                   "AUC (patients)", "AUPRC (patients)", "Patients with a label", "Reliability diagram"):
        assert figure in text
    assert f"{metrics['auprc']:.3f}" in text and f"{patients['auc']:.3f}" in text
    assert text.count("95 % CI") >= 6  # AUC, AUPRC, balanced accuracy over slides and over patients


def test_without_patients_in_the_manifest_only_slides_are_measured(trained_run, cohort, tmp_path):
    manifest, tiles = cohort
    plain = tmp_path / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with plain.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "label"])
        writer.writerows([r["slide_id"], manifest.parent / r["slide_path"], r["label"]] for r in rows)
    out = tmp_path / "pred"
    predict(trained_run, out, manifest=plain, tiles_dir=tiles, heatmaps=False, progress=False)
    assert "patients" not in json.loads((out / "metrics.json").read_text())
    assert "(patients)" not in write_report(out).read_text(encoding="utf-8")
