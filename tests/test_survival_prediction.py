"""Survival predictions: risk and risk group per slide, the mean per patient, the cohort's metrics."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from ips_path.config import TrainConfig
from ips_path.slides.manifest import ManifestRow
from ips_path.tasks.survival.prediction import curve_columns, slide_survival, write_patient_survival
from ips_path.tasks.survival.training import survival_task

pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")


def _checkpoint(loss="cox", cutoffs=(0.0,)):
    config = TrainConfig(task="survival", survival_loss=loss, time_bins=3)
    return {"config": config.as_dict(), "survival": {
        "loss": loss, "time_unit": "months", "bin_edges": [0.0, 4.0, 9.0, math.inf] if loss == "nll" else None,
        "reference_time": [1.0, 3.0, 5.0, 8.0, 12.0, 20.0], "reference_event": [1, 1, 0, 1, 0, 1],
        "risk_cutoffs": list(cutoffs)}}, survival_task(config)


def _row(slide_id, case_id, time=None, event=None):
    return ManifestRow(slide_id, None, None, None, case_id, None, 2, time, event)


def test_a_slide_gets_its_risk_and_the_group_of_the_training_cut_points():
    checkpoint, task = _checkpoint(cutoffs=(-0.5, 0.5))
    assert slide_survival(task, torch.tensor([0.7]), checkpoint) == {"risk": 0.7, "risk_group": "high risk"}
    assert slide_survival(task, torch.tensor([0.0]), checkpoint)["risk_group"] == "intermediate risk"
    checkpoint, task = _checkpoint("nll")
    out = slide_survival(task, torch.tensor([-1.0, 0.0, 1.0]), checkpoint)
    assert len(out["survival"]) == 3 and out["survival"] == sorted(out["survival"], reverse=True)
    assert out["risk"] == pytest.approx(-sum(out["survival"]), abs=1e-5)
    assert curve_columns(checkpoint) == ["survival_to_4", "survival_to_9", "survival_to_inf"]


def test_patients_average_their_slides_and_are_measured_with_their_outcomes(tmp_path):
    checkpoint, task = _checkpoint()
    rng = np.random.default_rng(0)
    rows, scored = [], []
    for p in range(30):
        time, event = float(rng.exponential(10) + 0.1), int(rng.random() < 0.7)
        for s in range(2):  # two slides per patient
            rows.append(_row(f"s{p}_{s}", f"p{p}", round(time, 1), event))
            scored.append((f"s{p}_{s}", slide_survival(task, torch.tensor([-math.log(time) + s * 0.1]), checkpoint)))
    metrics = write_patient_survival(tmp_path, scored, rows, checkpoint, n_bootstrap=50)
    with (tmp_path / "patients.csv").open() as f:
        patients = list(csv.DictReader(f))
    assert len(patients) == 30 and patients[0]["n_slides"] == "2"
    first = [extra["risk"] for slide_id, extra in scored if slide_id.startswith("s0_")]
    assert float(patients[0]["risk"]) == pytest.approx(np.mean(first), abs=1e-6)
    assert metrics["n_patients"] == 30 and metrics["n_slides"] == 60
    assert metrics["c_index"] > 0.95  # risk = -log(time) ranks every comparable pair but near ties
    saved = json.loads((tmp_path / "survival_metrics.json").read_text())
    assert saved["c_index"] == pytest.approx(metrics["c_index"]) and saved["risk_cutoffs"] == [0.0]
    assert (tmp_path / "km.png").read_bytes()[:4] == b"\x89PNG"


def test_without_outcomes_only_patients_are_written_and_stale_metrics_go(tmp_path):
    checkpoint, task = _checkpoint("nll")
    (tmp_path / "survival_metrics.json").write_text("{}")
    scored = [("a", slide_survival(task, torch.zeros(3), checkpoint))]
    assert write_patient_survival(tmp_path, scored, [], checkpoint) is None
    assert not (tmp_path / "survival_metrics.json").exists()
    with (tmp_path / "patients.csv").open() as f:
        patient = next(csv.DictReader(f))
    assert patient["case_id"] == "a" and patient["time"] == "" and "survival_to_9" in patient
