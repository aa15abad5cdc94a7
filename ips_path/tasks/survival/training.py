"""The survival side of a training run: targets, batches, validation C-index, and the closing evaluation.

:func:`ips_path.training.train.train` asks a :class:`SurvivalRun` for what differs from classification:

* targets: ``(time, event, time bin)`` per slide (:data:`~ips_path.tasks.survival.losses.SURVIVAL_TARGET_COLUMNS`);
* batches: with the Cox loss every batch holds an event (:func:`~ips_path.tasks.survival.sampling.event_batches`);
* validation: the loss and Harrell's C-index of every epoch (``val_c_index``, the default monitor);
* the end: with the best weights, the training slides' risks give the risk-group cut points (median
  or tertiles), and the validation slides get every metric with 95 % bootstrap intervals
  (``survival_metrics.json``) and the Kaplan-Meier curves of their risk groups (``km_val.png``).

What prediction needs of it is kept in the checkpoint under ``"survival"`` (:meth:`SurvivalRun.state`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.config import TrainConfig
from ips_path.model import Task
from ips_path.runtime.atomic import write_atomically
from ips_path.slides.manifest import ManifestRow
from ips_path.tasks.survival.groups import assign_groups, plot_kaplan_meier, risk_cutoffs
from ips_path.tasks.survival.losses import TimeBins
from ips_path.tasks.survival.metrics import harrell_c_index, survival_metrics
from ips_path.tasks.survival.sampling import event_batches

__all__ = ["SURVIVAL_TASK_NAME", "SurvivalRun", "finite_json", "survival_task"]

SURVIVAL_TASK_NAME = "survival"


def survival_task(config: TrainConfig) -> Task:
    """The model's task for a survival configuration: one Cox risk output, or ``time_bins`` hazards."""
    return Task(SURVIVAL_TASK_NAME, 1 if config.survival_loss == "cox" else config.time_bins, "survival")


@dataclass
class SurvivalRun:
    """Survival targets and evaluation of one run.

    Attributes
    ----------
    config : TrainConfig
    reference_time, reference_event : list
        The training slides' outcomes: the censoring distribution of Uno's C-index and of the
        time-dependent AUC, and the quantiles of the discrete-time bins.
    bins : TimeBins or None
        Discrete-time bins (``nll``); None for Cox.
    cutoffs : list of float or None
        Risk-group cut points, known once :meth:`finish` has run.
    """

    config: TrainConfig
    reference_time: list[float]
    reference_event: list[int]
    bins: TimeBins | None = None
    cutoffs: list[float] | None = field(default=None)

    @classmethod
    def from_rows(cls, config: TrainConfig, train_rows: Sequence[ManifestRow]) -> SurvivalRun:
        """Set up from the training slides (one outcome per slide; time bins from their event times)."""
        time = [float(r.time) for r in train_rows]
        event = [int(r.event) for r in train_rows]
        bins = (TimeBins.from_quantiles(np.array(time), np.array(event), config.time_bins)
                if config.survival_loss == "nll" else None)
        return cls(config, time, event, bins)

    def target(self, row: ManifestRow) -> tuple[float, float, float]:
        """``(time, event, bin)`` of a slide; the bin is 0 for Cox."""
        bin_index = int(self.bins.index(np.array([row.time]))[0]) if self.bins is not None else 0
        return float(row.time), float(row.event), float(bin_index)

    def batches(self, order: Sequence[int], events: Sequence[int], batch_size: int, epoch: int, seed: int
                ) -> list[list[int]]:
        """This epoch's batches of the slides ``order`` (this process's shard, shuffled).

        Cox: batches that each hold an event, drawn with ``(seed, epoch)``; discrete time: consecutive
        pieces of ``order``.
        """
        if self.config.survival_loss != "cox":
            return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        picked = event_batches([events[i] for i in order], batch_size, np.random.default_rng([seed, epoch, 1]))
        return [[order[j] for j in batch] for batch in picked]

    def validation_metrics(self, task: Task, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """``val_loss`` and ``val_c_index`` (Harrell's) of one validation pass."""
        risk = task.risk(logits).numpy()
        time, event = targets[:, 0].numpy(), targets[:, 1].numpy()
        return {"val_loss": float(task.loss(logits, targets)), "val_c_index": harrell_c_index(time, event, risk)}

    def finish(self, task: Task, train_logits: torch.Tensor, val_logits: torch.Tensor | None,
               val_targets: torch.Tensor | None, out_dir: Path, *, n_bootstrap: int = 1000) -> dict[str, Any]:
        """Cut points from the training risks; every validation metric, ``survival_metrics.json``, ``km_val.png``.

        Returns
        -------
        dict
            What ``survival_metrics.json`` holds: ``risk_cutoffs``, ``time_unit``, ``train_c_index`` and,
            with validation slides, ``validation`` (see :func:`~ips_path.tasks.survival.survival_metrics`)
            with its ``log_rank_p``.
        """
        train_risk = task.risk(train_logits).numpy()
        self.cutoffs = risk_cutoffs(train_risk, self.config.risk_groups)
        summary: dict[str, Any] = {
            "risk_cutoffs": self.cutoffs, "risk_groups": self.config.risk_groups, "time_unit": self.config.time_unit,
            "train_c_index": harrell_c_index(self.reference_time, self.reference_event, train_risk)
            if len(train_risk) == len(self.reference_time) else None,
        }
        if val_logits is not None and val_targets is not None and len(val_logits):
            curves = None if task.is_cox else task.probabilities(val_logits).numpy()
            summary["validation"] = self.evaluate(task.risk(val_logits).numpy(), val_targets[:, 0].numpy(),
                                                  val_targets[:, 1].numpy(), out_dir / "km_val.png", curves=curves,
                                                  title="validation slides", n_bootstrap=n_bootstrap)
        text = json.dumps(finite_json(summary), indent=2)
        write_atomically(out_dir / "survival_metrics.json", lambda partial: partial.write_text(text, encoding="utf-8"))
        return summary

    def evaluate(self, risk: np.ndarray, time: np.ndarray, event: np.ndarray, km_path: Path, *,
                 curves: np.ndarray | None = None, title: str, n_bootstrap: int = 1000) -> dict[str, float]:
        """Every survival metric of a scored cohort, and its Kaplan-Meier picture at ``km_path``.

        Parameters
        ----------
        risk, time, event : (n,) arrays
        km_path : Path
            Output PNG of the risk groups' Kaplan-Meier curves.
        curves : (n, K) array, optional
            Discrete-time survival past each bin, for the integrated Brier score.
        title : str
            Names the cohort on the picture.
        """
        times = survival = None
        if self.bins is not None and curves is not None:
            times = _brier_times(time)
            survival = self.bins.survival_at(curves, times)
        metrics = survival_metrics(time, event, risk, reference=(np.array(self.reference_time),
                                                                  np.array(self.reference_event)),
                                   survival=survival, survival_times=times, n_bootstrap=n_bootstrap)
        cutoffs = self.cutoffs if self.cutoffs is not None else risk_cutoffs(risk, self.config.risk_groups)
        metrics["log_rank_p"] = plot_kaplan_meier(time, event, assign_groups(risk, cutoffs), km_path,
                                                  n_groups=len(cutoffs) + 1, time_unit=self.config.time_unit,
                                                  title=title, c_index=metrics["c_index"])
        return metrics

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain lists and numbers, loadable with ``weights_only``)."""
        return {"loss": self.config.survival_loss, "time_unit": self.config.time_unit,
                "bin_edges": list(self.bins.edges) if self.bins is not None else None,
                "reference_time": list(self.reference_time), "reference_event": list(self.reference_event),
                "risk_cutoffs": self.cutoffs}

    @classmethod
    def from_state(cls, config: TrainConfig, state: Mapping[str, Any]) -> SurvivalRun:
        """The run a checkpoint's ``"survival"`` entry describes (for prediction)."""
        edges = state.get("bin_edges")
        return cls(config, list(state["reference_time"]), list(state["reference_event"]),
                   TimeBins(tuple(float(e) for e in edges)) if edges else None, state.get("risk_cutoffs"))


def _brier_times(time: np.ndarray) -> np.ndarray:
    """20 times across the cohort's follow-up (10th to 90th percentile) for the integrated Brier score."""
    low, high = np.quantile(time, [0.1, 0.9])
    return np.linspace(low, high, 20) if high > low else np.array([low])


def finite_json(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return float(value) if isinstance(value, np.floating) else value
