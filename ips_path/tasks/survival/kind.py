"""Survival (``--task survival``): a risk score learnt from the manifest's ``time`` and ``event`` columns.

The model's head is a Cox risk (``--survival-loss cox``; every batch holds an event) or discrete-time
hazards over ``--time-bins`` bins (``nll``; also a survival curve). Splits and folds keep events and
follow-up balanced (:func:`~ips_path.tasks.survival.survival_strata`) and refuse a split or fold
without events. Each epoch logs the validation C-index (``--monitor c_index``, what ``auc`` means
here). After training, the best weights' training risks give the risk-group cut points, kept in the
checkpoint under ``survival``, and the validation slides ``survival_metrics.json`` and ``km_val.png``
(:mod:`ips_path.tasks.survival.training`). Prediction gives each slide a risk and risk group (and a
curve), and writes ``patients.csv`` and, with outcomes, ``survival_metrics.json`` and ``km.png``
(:mod:`ips_path.tasks.survival.prediction`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ips_path.model import Task
from ips_path.runtime.atomic import read_json
from ips_path.slides.manifest import ManifestRow, read_manifest
from ips_path.tasks.base import OutcomeKind, ReportSection, SlideScores, number, register_kind
from ips_path.tasks.survival.cohort import check_events_in_folds, check_events_in_splits
from ips_path.tasks.survival.prediction import curve_columns, slide_survival, write_patient_survival
from ips_path.tasks.survival.sampling import survival_strata
from ips_path.tasks.survival.training import SurvivalRun, survival_task

__all__ = ["SURVIVAL_CV_METRICS", "Survival"]

log = logging.getLogger(__name__)

SURVIVAL_CV_METRICS = ("c_index", "uno_c_index")


@register_kind("survival")
class Survival(OutcomeKind):
    """One survival task; see the module docstring."""

    default_monitor = "c_index"
    cv_metrics = SURVIVAL_CV_METRICS
    run: SurvivalRun | None = None

    ensembles = False
    columns_doc = "predicted is the risk group, then risk (and survival_to_<t> per time bin, discrete time)"
    prediction_files = {
        "patients.csv": "survival models: case_id, n_slides, risk, risk_group (survival_to_<t> per time bin), time, "
                        "event",
        "survival_metrics.json": "survival models with time/event: C-index (Harrell, Uno) with 95 % CI, "
                                 "time-dependent AUC, integrated Brier score, log-rank p",
        "km.png": "survival models with time/event: Kaplan-Meier curves of the risk groups",
    }

    # -- the manifest -------------------------------------------------------------------------------

    def read_manifest(self, manifest: str | os.PathLike, *, training: bool) -> list[ManifestRow]:
        return read_manifest(manifest, require_label=False, check_files=False, require_survival=training)

    def strata(self, rows: Sequence[ManifestRow]) -> dict[str, str] | None:
        time = {r.case_id: float(r.time) for r in rows if r.time is not None}
        event = {r.case_id: int(r.event) for r in rows if r.event is not None}
        return survival_strata(time, event)

    def check_splits(self, rows: Sequence[ManifestRow], splits: Mapping[str, str], manifest: str | os.PathLike,
                     ) -> None:
        check_events_in_splits(rows, splits, manifest)

    def check_folds(self, rows: Sequence[ManifestRow], folds: Mapping[str, int | str], k: int,
                    manifest: str | os.PathLike) -> None:
        check_events_in_folds(rows, folds, k, manifest)

    @property
    def label_columns(self) -> tuple[str, ...]:
        return ("label",)

    def outcome_columns(self, row: ManifestRow) -> dict[str, Any]:
        return {"time": row.time, "event": row.event}

    # -- the model ----------------------------------------------------------------------------------

    def model_tasks(self) -> list[Task]:
        return [survival_task(self.config)]

    # -- training -----------------------------------------------------------------------------------

    def fit_training(self, train_rows: Sequence[ManifestRow]) -> None:
        self.run = SurvivalRun.from_rows(self.config, train_rows)

    def target(self, row: ManifestRow) -> tuple:
        """``(time, event, time bin)``; the bin is 0 for Cox."""
        return self.run.target(row)

    def batch_targets(self, tasks: Sequence[Task], targets: Sequence[tuple]) -> dict[str, torch.Tensor]:
        return {tasks[0].name: torch.tensor(list(targets), dtype=torch.float32)}

    def batches(self, targets: Sequence[tuple], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
        """Cox: batches that each hold an event; discrete time: consecutive pieces."""
        events = [int(t[1]) for t in targets]
        return self.run.batches(range(len(targets)), events, batch_size, epoch, seed)

    def validation_metrics(self, tasks: Sequence[Task], logits: Mapping[str, torch.Tensor],
                           targets: Sequence[tuple]) -> dict[str, float]:
        return self.run.validation_metrics(tasks[0], logits[tasks[0].name], self.batch_targets(tasks, targets)[
            tasks[0].name])

    def epoch_text(self, row: Mapping[str, float]) -> str:
        return f"  val loss {row['val_loss']:.4f}  C-index {row['val_c_index']:.3f}" if "val_c_index" in row else ""

    @property
    def finishes(self) -> bool:
        return True

    def finish(self, tasks: Sequence[Task], train_logits: Mapping[str, torch.Tensor],
               train_targets: Sequence[tuple], val_logits: Mapping[str, torch.Tensor] | None,
               val_targets: Sequence[tuple], out_dir: Path) -> None:
        """Risk-group cut points from the training risks; ``survival_metrics.json`` and ``km_val.png`` of the
        validation slides."""
        task = tasks[0]
        summary = self.run.finish(task, train_logits[task.name], None if val_logits is None else val_logits[task.name],
                                  self.batch_targets(tasks, val_targets)[task.name] if val_targets else None, out_dir)
        validation = summary.get("validation", {})
        if validation:
            log.info("validation C-index %.3f (95 %% CI %.3f-%.3f), Uno %.3f; log-rank p %.2g between the risk "
                     "groups (%s)", validation["c_index"], validation["c_index_low"], validation["c_index_high"],
                     validation["uno_c_index"], validation["log_rank_p"], out_dir / "km_val.png")

    def finished(self, checkpoint: Mapping[str, Any], run_dir: Path) -> bool:
        """The final measurement writes ``survival_metrics.json``, then the cut points into ``best.pt`` and last
        into ``last.pt``: cut points in ``last.pt`` mean all of it is there."""
        measured = (checkpoint.get("survival") or {}).get("risk_cutoffs") is not None
        return measured and (run_dir / "survival_metrics.json").is_file() and checkpoint["status"] != "running"

    # -- the checkpoint -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"survival": self.run.state()}

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.run = SurvivalRun.from_state(self.config, checkpoint["survival"])

    def _checkpoint_view(self) -> dict[str, Any]:
        """What :mod:`ips_path.tasks.survival.prediction` reads of a checkpoint."""
        return {"config": self.config.as_dict(), "survival": self.run.state()}

    # -- cross-validation ---------------------------------------------------------------------------

    def fold_metrics(self, run_dir: Path, checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
        """Harrell's and Uno's C-index of a fold's validation patients with its best weights."""
        validation = read_json(run_dir / "survival_metrics.json").get("validation", {})
        return {f"val_{m}": float("nan") if validation.get(m) is None else float(validation[m])
                for m in self.cv_metrics}

    # -- prediction ---------------------------------------------------------------------------------

    def truth(self, row: ManifestRow) -> dict[str, Any]:
        return {"label": None}  # a survival model predicts a risk group, not a class: a label column is not its truth

    def slide_result(self, tasks: Sequence[Task], folds: Sequence[SlideScores]) -> dict[str, Any]:
        result = slide_survival(tasks[0], folds[0].logits[tasks[0].name], self._checkpoint_view())
        result.update(predicted=result["risk_group"], probabilities=[])
        return result

    def prediction_columns(self, n_folds: int) -> list[str]:
        return ["risk", *curve_columns(self._checkpoint_view())]

    def prediction_cells(self, extra: Mapping[str, Any], ok: bool, n_folds: int) -> list[Any]:
        cells = [extra.get("risk", ""), *extra.get("survival", [])] if ok else []
        return cells or [""] * len(self.prediction_columns(n_folds))

    def write_metrics(self, out_dir: Path, scored: Sequence[tuple[str, Mapping[str, Any]]],
                      rows: Sequence[ManifestRow]) -> dict[str, Any] | None:
        """A risk per patient (``patients.csv``); metrics over the patients with outcomes."""
        return write_patient_survival(out_dir, scored, rows, self._checkpoint_view())

    def summary_lines(self, metrics: Mapping[str, Any], out_dir: Path) -> list[str]:
        m = metrics
        return [f"C-index {_shown(m['c_index'])} (95% CI {_shown(m['c_index_low'])}-{_shown(m['c_index_high'])}), "
                f"Uno {_shown(m['uno_c_index'])} on {m['n_patients']} patients; Kaplan-Meier: {out_dir / 'km.png'}"]

    @classmethod
    def report_sections(cls, out_dir: Path, run: Mapping[str, Any]) -> list[ReportSection]:
        """Survival models with outcomes: the C-indices with their intervals, and the Kaplan-Meier picture."""
        metrics = read_json(out_dir / "survival_metrics.json")
        if not metrics:
            return []

        def interval(name: str) -> str:
            return f"95 % CI {number(metrics.get(f'{name}_low'))}\u2013{number(metrics.get(f'{name}_high'))}"

        unit = metrics.get("time_unit") or ""
        figures = [("C-index (Harrell)", number(metrics.get("c_index")), interval("c_index")),
                   ("C-index (Uno)", number(metrics.get("uno_c_index")), interval("uno_c_index")),
                   ("Log-rank p (risk groups)", f"{metrics['log_rank_p']:.2g}" if metrics.get("log_rank_p")
                    is not None else "n/a", "groups cut at the training risks"),
                   ("Patients (events)", f"{metrics.get('n_patients', 'n/a')} ({metrics.get('n_events', 'n/a')})",
                    f"{metrics.get('n_slides', 'n/a')} slides")]
        figures += [(f"AUC at {key.removeprefix('auc_at_')} {unit}".strip(), number(value), "time-dependent")
                    for key, value in metrics.items() if key.startswith("auc_at_")]
        if "integrated_brier_score" in metrics:
            figures.append(("Integrated Brier score", number(metrics["integrated_brier_score"]), "lower is better"))
        km = out_dir / "km.png"
        return [ReportSection("Survival", figures,
                              [(km, "Kaplan-Meier curves of the risk groups")] if km.is_file() else [],
                              css_class="metrics survival")]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
