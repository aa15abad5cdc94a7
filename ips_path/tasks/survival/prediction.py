"""The survival side of ``ipspath predict``: a risk (and curve) per slide, per patient, and the cohort's metrics.

Per slide (:func:`slide_survival`): the risk score, its risk group (cut at the training risks'
median or tertiles kept in the checkpoint) and, for the discrete-time model, the predicted
``P(T > end of bin k)`` per time bin. Per patient (:func:`write_patient_survival`): the mean risk
(and curve) of the patient's slides, in ``patients.csv``. With ``time`` and ``event`` in the
manifest: ``survival_metrics.json`` (Harrell's and Uno's C-index with 95 % intervals, time-dependent
AUC, integrated Brier score for the discrete-time model, log-rank p) over patients, and ``km.png``,
the Kaplan-Meier curves of their risk groups.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.config import TrainConfig
from ips_path.model import Task
from ips_path.runtime.atomic import write_atomically, write_csv
from ips_path.slides.manifest import ManifestRow
from ips_path.tasks.survival.groups import GROUP_NAMES, assign_groups
from ips_path.tasks.survival.training import SurvivalRun, finite_json

__all__ = ["curve_columns", "slide_survival", "write_patient_survival"]




def _run_of(checkpoint: Mapping[str, Any]) -> SurvivalRun:
    return SurvivalRun.from_state(TrainConfig.from_dict(checkpoint["config"], source="the checkpoint"),
                                  checkpoint["survival"])


def curve_columns(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of the survival-curve columns of a discrete-time model: ``survival_to_<bin end>``; none for Cox."""
    edges = checkpoint["survival"].get("bin_edges")
    return [f"survival_to_{e:g}" for e in edges[1:]] if edges else []


def slide_survival(task: Task, logits: torch.Tensor, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A slide's ``risk``, ``risk_group`` and (discrete time) ``survival`` per bin, from its head's logits."""
    logits = logits.float().reshape(1, -1)
    risk = float(task.risk(logits)[0])
    out: dict[str, Any] = {"risk": round(risk, 6), "risk_group": _group_name(risk, checkpoint)}
    if not task.is_cox:
        out["survival"] = [round(float(p), 6) for p in task.probabilities(logits)[0]]
    return out


def _group_name(risk: float, checkpoint: Mapping[str, Any]) -> str:
    cutoffs = checkpoint["survival"].get("risk_cutoffs")
    if not cutoffs:
        return ""
    return GROUP_NAMES[len(cutoffs) + 1][int(assign_groups([risk], cutoffs)[0])]


def write_patient_survival(out_dir: Path, scored: Sequence[tuple[str, Mapping[str, Any]]],
                           rows: Sequence[ManifestRow], checkpoint: Mapping[str, Any], *,
                           n_bootstrap: int = 1000) -> dict[str, Any] | None:
    """``patients.csv`` from the predicted slides; with outcomes also ``survival_metrics.json`` and ``km.png``.

    Parameters
    ----------
    out_dir : Path
        The prediction folder: ``patients.csv``, ``survival_metrics.json`` and ``km.png`` go there.
    scored : sequence of (slide_id, extra)
        The predicted slides and their :func:`slide_survival` values.
    rows : sequence of ManifestRow
        The manifest's rows (case_id, time, event); slides not in it are their own patient.
    checkpoint : mapping
        The model's checkpoint (its ``survival`` entry).

    Returns
    -------
    dict or None
        The metrics, None without outcomes (or with fewer than two patients).
    """
    by_id = {r.slide_id: r for r in rows}
    patients: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    outcome: dict[str, tuple[float | None, int | None]] = {}
    for slide_id, extra in scored:
        row = by_id.get(slide_id)
        case_id = row.case_id if row is not None else slide_id
        patients[case_id].append(extra)
        outcome[case_id] = (row.time, row.event) if row is not None else (None, None)
    curve_names = curve_columns(checkpoint)
    records = []
    for case_id, slides in patients.items():
        risk = float(np.mean([s["risk"] for s in slides]))
        record: dict[str, Any] = {"case_id": case_id, "n_slides": len(slides), "risk": round(risk, 6),
                                  "risk_group": _group_name(risk, checkpoint)}
        if curve_names:
            mean_curve = np.mean([s["survival"] for s in slides], axis=0)
            record.update({name: round(float(p), 6) for name, p in zip(curve_names, mean_curve, strict=True)})
        time, event = outcome[case_id]
        record.update({"time": "" if time is None else f"{time:g}", "event": "" if event is None else event})
        records.append(record)
    write_csv(out_dir / "patients.csv", records)

    known = [r for r in records if r["time"] != "" and r["event"] != ""]
    if len(known) < 2:
        for path in (out_dir / "survival_metrics.json", out_dir / "km.png"):
            path.unlink(missing_ok=True)  # an earlier run's, which no longer matches
        return None
    run = _run_of(checkpoint)
    curves = np.array([[r[name] for name in curve_names] for r in known]) if curve_names else None
    metrics = run.evaluate(np.array([r["risk"] for r in known]), np.array([float(r["time"]) for r in known]),
                           np.array([int(r["event"]) for r in known]), out_dir / "km.png", curves=curves,
                           title="predicted patients", n_bootstrap=n_bootstrap)
    metrics.update({"n_patients": len(known), "n_slides": sum(r["n_slides"] for r in known),
                    "time_unit": run.config.time_unit, "risk_cutoffs": run.cutoffs})
    text = json.dumps(finite_json(metrics), indent=2)
    write_atomically(out_dir / "survival_metrics.json", lambda partial: partial.write_text(text, encoding="utf-8"))
    return metrics

