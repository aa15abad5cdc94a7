"""Regression (``--task regression --label-columns score``): a continuous slide-level target.

A biomarker score, a mutational burden, an expression signature: one numeric manifest column (named
by ``--label-columns``; a cell that is not a number is refused naming its line). The target is
standardised with the mean and standard deviation of the training slides, which the checkpoint keeps
(``regression``), so the model's one output is in standard units and predictions come back in the
column's. Loss: mean squared error, or Huber (``--regression-loss huber``, delta 1 standard
deviation). Splits and folds are stratified by tertiles of the target. Each epoch logs the
validation Pearson and Spearman r, MAE and R^2 (``--monitor pearson``, what ``auc`` means here).
Prediction writes ``predicted`` as a number (an ensemble: the mean of its folds, and each fold's
``fold<i>_predicted``), and with true values ``regression_metrics.json`` (the four metrics with 95 %
bootstrap intervals, resampling slides) and ``scatter.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ips_path.evaluation.metrics import rank_values
from ips_path.evaluation.plots import plot_scatter
from ips_path.model import Task
from ips_path.model.tasks import HeadKind, register_head_kind
from ips_path.runtime.atomic import read_json, write_json
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow, read_manifest
from ips_path.tasks.base import OutcomeKind, ReportSection, SlideScores, number, register_kind

__all__ = ["REGRESSION_METRICS", "Regression", "regression_metrics"]

REGRESSION_METRICS = ("pearson", "spearman", "mae", "r2")
_NAMES = {"pearson": "Pearson r", "spearman": "Spearman r", "mae": "MAE", "r2": "R\u00b2"}
HEADS = {"mse": "regression", "huber": "regression_huber"}


def _regression_loss(huber: bool):
    def loss(task: Task, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None
             ) -> torch.Tensor:
        if class_weight is not None:
            raise BadInputError(f"task {task.name!r}: regression tasks take no class weights")
        if tuple(target.shape) != (logits.shape[0],):
            raise BadInputError(f"task {task.name!r}: regression targets have shape {tuple(target.shape)}, expected "
                                f"({logits.shape[0]},)")
        value = logits.reshape(-1)
        return F.huber_loss(value, target.float(), delta=1.0) if huber else F.mse_loss(value, target.float())
    return loss


for _loss, _head in HEADS.items():  # the model's head: one output, the target in standard units
    register_head_kind(_head, HeadKind(min_classes=1, loss=_regression_loss(_loss == "huber"),
                                       probabilities=lambda task, logits: logits))


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman r, mean absolute error and R^2 (1 - residual / total sum of squares); NaN where
    fewer than two slides or a constant side leave one undefined."""
    truth, predicted = np.asarray(truth, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    out = {"mae": float(np.mean(np.abs(predicted - truth))) if truth.size else float("nan")}
    defined = truth.size >= 2 and np.ptp(truth) > 0
    correlated = defined and np.ptp(predicted) > 0
    out["pearson"] = float(np.corrcoef(truth, predicted)[0, 1]) if correlated else float("nan")
    out["spearman"] = (float(np.corrcoef(rank_values(truth), rank_values(predicted))[0, 1]) if correlated
                       else float("nan"))
    out["r2"] = (float(1 - np.sum((truth - predicted) ** 2) / np.sum((truth - truth.mean()) ** 2)) if defined
                 else float("nan"))
    return {name: out[name] for name in REGRESSION_METRICS}


def _with_intervals(truth: np.ndarray, predicted: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0
                    ) -> dict[str, Any]:
    """The metrics with ``<name>_ci95`` percentile bootstrap intervals over resampled slides."""
    found: dict[str, Any] = {k: _finite(v) for k, v in regression_metrics(truth, predicted).items()}
    draws = np.random.default_rng(seed).integers(0, truth.size, size=(n_bootstrap, truth.size))
    samples = np.array([list(regression_metrics(truth[d], predicted[d]).values()) for d in draws])
    for i, name in enumerate(REGRESSION_METRICS):
        values = samples[:, i][~np.isnan(samples[:, i])]
        found[f"{name}_ci95"] = ([float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
                                 if values.size else [None, None])
    return found


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@register_kind("regression")
class Regression(OutcomeKind):
    """One continuous target column; see the module docstring."""

    default_monitor = "pearson"
    cv_metrics = REGRESSION_METRICS
    mean: float = 0.0
    sd: float = 1.0

    columns_doc = "predicted is a number in the column's unit (an ensemble: the folds' mean, then fold<i>_predicted)"
    prediction_files = {
        "regression_metrics.json": "regression models with true values: pearson, spearman, mae, r2 with "
                                   "<name>_ci95 (bootstrap over slides), n_slides, column",
        "scatter.png": "regression models with true values: predicted against true value per slide",
    }

    @property
    def column(self) -> str:
        return self.config.label_column_names[0]

    # -- the manifest -------------------------------------------------------------------------------

    def read_manifest(self, manifest: str | os.PathLike, *, training: bool) -> list[ManifestRow]:
        """The rows, every cell of the target column a finite number (or empty, at prediction)."""
        rows = read_manifest(manifest, require_label=training, check_files=False, label_columns=(self.column,))
        bad = [f"line {r.line}: {self.column} {r.label!r}" for r in rows
               if r.label is not None and _number_or_none(r.label) is None]
        if bad:
            raise BadInputError(f"{manifest}: {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} is not a number; "
                                f"a regression target needs a number in every {self.column} cell")
        return rows

    def strata(self, rows: Sequence[ManifestRow]) -> dict[str, str] | None:
        """Tertiles of the target (of each patient's first slide), so that every split spans its range."""
        first = {}
        for r in rows:
            if r.label is not None:
                first.setdefault(r.case_id, float(r.label))
        if not first:
            return {}
        cuts = np.quantile(np.array(list(first.values())), [1 / 3, 2 / 3])
        return {case: f"tertile:{int(np.searchsorted(cuts, value, side='right'))}" for case, value in first.items()}

    def outcome_columns(self, row: ManifestRow) -> dict[str, Any]:
        return {self.column: row.label}

    # -- the model ----------------------------------------------------------------------------------

    def model_tasks(self) -> list[Task]:
        return [Task(self.column, 1, HEADS[self.config.regression_loss])]

    # -- training -----------------------------------------------------------------------------------

    def fit_training(self, train_rows: Sequence[ManifestRow]) -> None:
        """The mean and standard deviation of the training slides' targets."""
        values = np.array([float(r.label) for r in train_rows], dtype=np.float64)
        sd = float(values.std()) if values.size else 0.0
        if not sd > 0:
            raise BadInputError(f"the training slides' {self.column} values are all {values[0] if values.size else '-'}"
                                "; a regression needs targets that differ")
        self.mean, self.sd = float(values.mean()), sd

    def target(self, row: ManifestRow) -> tuple:
        """The slide's target in standard units of the training slides."""
        return ((float(row.label) - self.mean) / self.sd,)

    def batch_targets(self, tasks: Sequence[Task], targets: Sequence[tuple]) -> dict[str, torch.Tensor]:
        return {tasks[0].name: torch.tensor([t[0] for t in targets], dtype=torch.float32)}

    def validation_metrics(self, tasks: Sequence[Task], logits: Mapping[str, torch.Tensor],
                           targets: Sequence[tuple]) -> dict[str, float]:
        """``val_loss`` (in standard units) and the metrics of the values in the column's unit."""
        task = tasks[0]
        target = self.batch_targets(tasks, targets)[task.name]
        predicted = logits[task.name].reshape(-1).double().numpy() * self.sd + self.mean
        truth = target.double().numpy() * self.sd + self.mean
        return {"val_loss": float(task.loss(logits[task.name], target)),
                **{f"val_{k}": v for k, v in regression_metrics(truth, predicted).items()}}

    def epoch_text(self, row: Mapping[str, float]) -> str:
        if "val_loss" not in row:
            return ""
        return (f"  val loss {row['val_loss']:.4f}  Pearson r {row['val_pearson']:.3f}  "
                f"Spearman r {row['val_spearman']:.3f}  MAE {row['val_mae']:.4g}  R2 {row['val_r2']:.3f}")

    # -- the checkpoint -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"regression": {"column": self.column, "mean": self.mean, "sd": self.sd,
                               "loss": self.config.regression_loss}}

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint["regression"]
        self.mean, self.sd = float(saved["mean"]), float(saved["sd"])

    def run_info(self) -> dict[str, Any]:
        return {"regression": {"column": self.column, "mean": self.mean, "sd": self.sd}}

    # -- prediction ---------------------------------------------------------------------------------

    def truth(self, row: ManifestRow) -> dict[str, Any]:
        return {"label": row.label}

    def slide_result(self, tasks: Sequence[Task], folds: Sequence[SlideScores]) -> dict[str, Any]:
        """The predicted value in the column's unit: the mean over the ensemble's folds."""
        values = [float(fold.logits[tasks[0].name].reshape(-1)[0]) * self.sd + self.mean for fold in folds]
        result: dict[str, Any] = {"predicted": round(float(np.mean(values)), 6), "probabilities": []}
        if len(folds) > 1:
            result["fold_predicted"] = [round(v, 6) for v in values]
        return result

    def prediction_columns(self, n_folds: int) -> list[str]:
        return [f"fold{i}_predicted" for i in range(n_folds)]

    def prediction_cells(self, extra: Mapping[str, Any], ok: bool, n_folds: int) -> list[Any]:
        folds = list(extra.get("fold_predicted") or []) if ok else []
        return folds if len(folds) == n_folds else [""] * n_folds

    def write_metrics(self, out_dir: Path, scored: Sequence[tuple[str, Mapping[str, Any]]],
                      rows: Sequence[ManifestRow]) -> dict[str, Any] | None:
        """``regression_metrics.json`` and ``scatter.png`` over the predicted slides with a true value."""
        known = [(float(extra["label"]), float(extra["predicted"])) for _, extra in scored
                 if _number_or_none(extra.get("label")) is not None]
        if not known:
            return None
        truth, predicted = (np.array(v) for v in zip(*known, strict=True))
        metrics = {"column": self.column, "n_slides": len(known), **_with_intervals(truth, predicted)}
        write_json(out_dir / "regression_metrics.json", metrics)
        plot_scatter(truth, predicted, out_dir / "scatter.png", name=self.column,
                     title=f"{self.column}: Pearson r {number(metrics['pearson'])}, n = {len(known)}")
        return metrics

    def summary_lines(self, metrics: Mapping[str, Any], out_dir: Path) -> list[str]:
        parts = [f"{_NAMES[m]} {number(metrics[m])} (95% CI {number(metrics[f'{m}_ci95'][0])}-"
                 f"{number(metrics[f'{m}_ci95'][1])})" for m in REGRESSION_METRICS]
        return [f"{metrics['column']}: {', '.join(parts)} on {metrics['n_slides']} slides; scatter: "
                f"{out_dir / 'scatter.png'}"]

    @classmethod
    def report_filters(cls, run: Mapping[str, Any], classes: list[str], rows: Sequence[Any]
                       ) -> tuple[list[str], list[str]]:
        return [], []  # numbers: nothing to choose from

    @classmethod
    def report_sections(cls, out_dir: Path, run: Mapping[str, Any]) -> list[ReportSection]:
        """The four metrics with their intervals, and the scatter plot."""
        metrics = read_json(out_dir / "regression_metrics.json")
        if not metrics:
            return []

        def interval(name: str) -> str:
            low, high = metrics.get(f"{name}_ci95") or [None, None]
            return f"95 % CI {number(low)}\u2013{number(high)}"

        figures = [(f"{_NAMES[m]} (slides)", number(metrics.get(m)), interval(m)) for m in REGRESSION_METRICS]
        figures.append(("Slides with a value", str(metrics.get("n_slides", "n/a")), ""))
        scatter = out_dir / "scatter.png"
        return [ReportSection(f"Regression: {metrics.get('column', '')}".rstrip(": "), figures,
                              [(scatter, "Predicted against true value")] if scatter.is_file() else [],
                              css_class="metrics regression")]


def _number_or_none(text: object) -> float | None:
    """A manifest cell as a finite number, None where it is empty or not one."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
