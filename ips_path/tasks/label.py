"""Classification of one label column or several (``--task classification``, ``--label-columns``).

Each label column is one multiclass task (:mod:`ips_path.tasks.label_columns`): a softmax over the
column's sorted values, cross-entropy, optional class weights. Splits and folds are stratified by
the first column. Validation logs AUC, AUPRC, balanced accuracy, accuracy and recall per class (with
several columns per task and their mean, which ``--monitor`` reads). Prediction writes each class's
probability (``prob_<class>``; an ensemble also each fold's), ``metrics.json``, ``roc.png`` and
``reliability.png`` (several columns: ``label_<task>``, ``predicted_<task>``, ``roc_<task>.png`` ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.evaluation.metrics import classification_metrics, prediction_metrics
from ips_path.evaluation.plots import plot_reliability, plot_roc
from ips_path.model import Task
from ips_path.runtime.atomic import read_json, write_json
from ips_path.slides.manifest import ManifestRow, read_manifest
from ips_path.tasks.base import OutcomeKind, ReportSection, SlideScores, number, register_kind
from ips_path.tasks.label_columns import LabelTasks, batch_targets, class_weights, joined_classes, validation_metrics

__all__ = ["CV_METRICS", "Classification"]

log = logging.getLogger(__name__)

#: What a cross-validation summarises per fold (several columns: also ``<task>_<metric>``).
CV_METRICS = ("auc", "balanced_accuracy", "auprc")
PROB_PREFIX = "prob_"


@register_kind("classification")
class Classification(OutcomeKind):
    """One multiclass task per label column (``label`` by default)."""

    label_tasks: LabelTasks | None = None

    columns_doc = ("prob_<class> per class (a cross-validated model: the mean of its folds, then fold<i>_prob_<class> "
                   "per fold); several label columns: label_<task> and predicted_<task> per task, prob_<task>=<class>, "
                   "and label/predicted as task=class pairs joined by '; '")
    prediction_files = {
        "metrics.json": "with labels: AUC, AUPRC, balanced accuracy with 95 % CIs, ECE, confusion matrix (and "
                        "over patients); several label columns: tasks (task -> the same) and mean (over the tasks)",
        "roc.png": "with labels: ROC curve (several label columns: roc_<task>.png per task)",
        "reliability.png": "with labels: reliability diagram (several label columns: reliability_<task>.png)",
    }

    @property
    def columns(self) -> tuple[str, ...]:
        return self.config.label_column_names

    @property
    def several(self) -> bool:
        return len(self.columns) > 1

    @property
    def cv_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        if not self.several:
            return CV_METRICS
        return CV_METRICS + tuple(f"{column}_{m}" for column in self.columns for m in CV_METRICS)

    # -- the manifest -------------------------------------------------------------------------------

    def read_manifest(self, manifest: str | os.PathLike, *, training: bool) -> list[ManifestRow]:
        return read_manifest(manifest, require_label=training, check_files=False, label_columns=self.columns,
                             label_case=self.config.label_case if training else "exact")

    def outcome_columns(self, row: ManifestRow) -> dict[str, Any]:
        return dict(zip(self.columns, row.labels, strict=True))

    def fit_manifest(self, rows: Sequence[ManifestRow], manifest: str | os.PathLike) -> None:
        self.label_tasks = LabelTasks.from_rows(rows, self.columns, manifest)

    # -- the model ----------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return self.label_tasks.class_names

    def model_tasks(self) -> list[Task]:
        return self.label_tasks.tasks()

    # -- training -----------------------------------------------------------------------------------

    def target(self, row: ManifestRow) -> tuple:
        """A class index per label column (``MISSING_TARGET`` where the cell is empty)."""
        return self.label_tasks.targets(row.labels)

    def batch_targets(self, tasks: Sequence[Task], targets: Sequence[tuple]) -> dict[str, torch.Tensor]:
        return batch_targets(tasks, targets)

    def class_weights(self, tasks: Sequence[Task], targets: Sequence[tuple], device: torch.device
                      ) -> dict[str, torch.Tensor] | None:
        return class_weights(targets, tasks, device) if self.config.class_weights else None

    @property
    def class_columns(self) -> tuple[str, ...]:
        return self.columns

    def check_training_slides(self, train_targets: Sequence[tuple]) -> None:
        # the validation split is checked with the manifest (validation_split_problems)
        if self.several:
            return
        classes = self.class_names
        absent = sorted(set(classes) - {classes[t[0]] for t in train_targets})
        if train_targets and absent:
            log.warning("no training slide of class(es) %s", ", ".join(absent))

    def validation_metrics(self, tasks: Sequence[Task], logits: Mapping[str, torch.Tensor],
                           targets: Sequence[tuple]) -> dict[str, float]:
        if self.several:
            return validation_metrics(self.label_tasks, tasks, logits, targets)
        task = tasks[0]
        labels = batch_targets(tasks, targets)[task.name]
        metrics = classification_metrics(labels.numpy(), task.probabilities(logits[task.name]).numpy(),
                                         self.class_names)
        return {"val_loss": float(task.loss(logits[task.name], labels)), **{f"val_{k}": v for k, v in metrics.items()}}

    def epoch_text(self, row: Mapping[str, float]) -> str:
        if "val_loss" not in row:
            return ""
        text = (f"  val loss {row['val_loss']:.4f}  {'mean ' if self.several else ''}AUC {row['val_auc']:.3f}  "
                f"balanced acc {row['val_balanced_accuracy']:.3f}")
        if self.several:
            text += "  (AUC " + ", ".join(f"{n} {row[f'val_{n}_auc']:.3f}" for n in self.columns) + ")"
        return text

    # -- the checkpoint -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"task_classes": self.label_tasks.state()} if self.several else {}

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.label_tasks = (LabelTasks.from_checkpoint(checkpoint)
                            or LabelTasks(self.columns[:1], (tuple(checkpoint["class_names"]),)))

    def run_info(self) -> dict[str, Any]:
        return {"tasks": self.label_tasks.state()} if self.several else {}

    # -- prediction ---------------------------------------------------------------------------------

    def truth(self, row: ManifestRow) -> dict[str, Any]:
        if not self.several:
            return {"label": row.label}
        task_labels = dict(zip(self.columns, row.labels, strict=True))
        return {"label": joined_classes(task_labels), "task_labels": task_labels}

    def slide_result(self, tasks: Sequence[Task], folds: Sequence[SlideScores]) -> dict[str, Any]:
        fold_probabilities = [np.concatenate([fold.probabilities[t.name].reshape(-1).numpy() for t in tasks])
                              for fold in folds]  # several tasks: one after another
        probabilities = np.mean(fold_probabilities, axis=0).tolist()
        result: dict[str, Any] = {"predicted": self.class_names[int(np.argmax(probabilities))],
                                  "probabilities": [round(p, 6) for p in probabilities]}
        if self.several:
            result["task_predicted"] = self.label_tasks.predicted(probabilities)
            result["predicted"] = joined_classes(result["task_predicted"])
        if len(folds) > 1:
            result["fold_probabilities"] = [[round(float(p), 6) for p in fold] for fold in fold_probabilities]
        return result

    def prediction_columns(self, n_folds: int) -> list[str]:
        tasks = self.columns if self.several else ()
        classes = self.class_names
        return [*(f"{what}_{task}" for task in tasks for what in ("label", "predicted")),
                *(f"{PROB_PREFIX}{c}" for c in classes),
                *(f"fold{i}_{PROB_PREFIX}{c}" for i in range(n_folds) for c in classes)]

    def prediction_cells(self, extra: Mapping[str, Any], ok: bool, n_folds: int) -> list[Any]:
        classes = self.class_names
        probabilities = extra.get("probabilities") if ok else None
        if probabilities is not None and len(probabilities) != len(classes):
            raise ValueError(f"{len(probabilities)} probabilities for {len(classes)} classes")
        n_fold_cells = n_folds * len(classes)
        folds = [p for fold in extra.get("fold_probabilities") or [] for p in fold] if ok and n_folds else []
        if len(folds) != n_fold_cells:
            folds = [""] * n_fold_cells  # a slide predicted before the ensemble's record had folds
        cells = []
        if self.several:
            task_labels, task_predicted = extra.get("task_labels") or {}, extra.get("task_predicted") or {}
            for t in self.columns:
                cells += [task_labels.get(t) or "", task_predicted.get(t) or "" if ok else ""]
        return [*cells, *(probabilities or [""] * len(classes)), *folds]

    def write_metrics(self, out_dir: Path, scored: Sequence[tuple[str, Mapping[str, Any]]],
                      rows: Sequence[ManifestRow]) -> dict[str, Any] | None:
        """``metrics.json``, ``roc.png`` and ``reliability.png`` over the predicted slides whose label is one of
        the model's classes; also over patients when the manifest names them. Several label columns: each
        task's metrics over the slides labelled for it, under ``tasks`` (with ``roc_<task>.png`` and
        ``reliability_<task>.png``), and ``mean`` over the tasks."""
        case_ids = {r.slide_id: r.case_id for r in rows}
        if not self.several:
            metrics = _measure([(s, extra.get("label"), extra["probabilities"]) for s, extra in scored],
                               self.class_names, case_ids, out_dir / "roc.png", out_dir / "reliability.png")
        else:
            per_task = {}
            for name, task_classes in zip(self.label_tasks.names, self.label_tasks.classes, strict=True):
                slides = [(s, (extra.get("task_labels") or {}).get(name),
                           self.label_tasks.split(extra["probabilities"])[name]) for s, extra in scored]
                found = _measure(slides, task_classes, case_ids, out_dir / f"roc_{name}.png",
                                 out_dir / f"reliability_{name}.png", name)
                if found is not None:
                    per_task[name] = found
            metrics = {"tasks": per_task, "mean": _mean_over_tasks(per_task)} if per_task else None
        if metrics is not None:
            write_json(out_dir / "metrics.json", metrics)
        return metrics

    def summary_lines(self, metrics: Mapping[str, Any], out_dir: Path) -> list[str]:
        lines = []
        for task, m in (metrics.get("tasks") or {"": metrics}).items():
            low, high = m["auc_ci95"]
            lines.append(f"{f'{task}: ' if task else ''}AUC {_shown(m['auc'])} (95% CI {_shown(low)}-{_shown(high)}), "
                         f"AUPRC {_shown(m['auprc'])}, balanced accuracy {_shown(m['balanced_accuracy'])}, "
                         f"calibration error {_shown(m['ece'])} on {m['n_slides']} labelled slides")
            if "patients" in m:
                p = m["patients"]
                lines.append(f"{f'{task} ' if task else ''}patients: AUC {_shown(p['auc'])}, "
                             f"AUPRC {_shown(p['auprc'])}, balanced accuracy {_shown(p['balanced_accuracy'])} "
                             f"on {p['n_patients']} patients")
        return lines

    @classmethod
    def output_files(cls, out_dir: Path) -> list[Path]:
        return [*super().output_files(out_dir), *out_dir.glob("roc_*.png"), *out_dir.glob("reliability_*.png")]

    @classmethod
    def report_filters(cls, run: Mapping[str, Any], classes: list[str], rows: Sequence[Any]
                       ) -> tuple[list[str], list[str]]:
        if run.get("tasks"):  # several label columns: a slide's label and prediction name a class of every task
            return sorted({r.label for r in rows if r.label}), sorted({r.predicted for r in rows if r.predicted})
        return super().report_filters(run, classes, rows)

    @classmethod
    def report_sections(cls, out_dir: Path, run: Mapping[str, Any]) -> list[ReportSection]:
        """The performance section; a model of several label columns gets one per task (``metrics["tasks"]``)."""
        metrics = read_json(out_dir / "metrics.json")
        if not metrics:
            return []
        if isinstance(metrics.get("tasks"), dict):
            return [_performance(f"Performance: {task}", found, out_dir / f"roc_{task}.png",
                                 out_dir / f"reliability_{task}.png")
                    for task, found in metrics["tasks"].items() if isinstance(found, dict)]
        return [_performance("Performance", metrics, out_dir / "roc.png", out_dir / "reliability.png")]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _measure(slides: Sequence[tuple[str, str | None, Sequence[float]]], classes: Sequence[str],
             case_ids: dict[str, str], roc: Path, reliability: Path, task: str | None = None) -> dict[str, Any] | None:
    """The metrics of (slide_id, label, probabilities) over the slides with a label among ``classes``, with
    their ROC and reliability pictures; None when no slide has one."""
    scored = [s for s in slides if s[1] in classes]
    unknown = sorted({s[1] for s in slides if s[1] and s[1] not in classes})
    if unknown:
        log.warning("labels %s%s are not classes of the model (%s); those slides are left out of the metrics",
                    ", ".join(unknown), f" of {task}" if task else "", ", ".join(classes))
    if not scored:
        return None
    labels = np.array([list(classes).index(label) for _, label, _ in scored])
    probabilities = np.array([p for _, _, p in scored], dtype=np.float64)
    cases = [case_ids.get(slide_id, slide_id) for slide_id, _, _ in scored]
    metrics = prediction_metrics(labels, probabilities, classes,
                                 cases if any(c != s[0] for c, s in zip(cases, scored, strict=True)) else None)
    plot_roc(labels, probabilities, classes, roc, auc=metrics["auc"], ci=metrics["auc_ci95"])
    plot_reliability(metrics["calibration_bins"], reliability, ece=metrics["ece"])
    return metrics


def _mean_over_tasks(per_task: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """AUC, AUPRC, balanced accuracy, accuracy and ECE: the mean over the tasks where each is defined."""
    means = {}
    for name in ("auc", "auprc", "balanced_accuracy", "accuracy", "ece"):
        values = [m[name] for m in per_task.values() if m.get(name) is not None]
        means[name] = round(float(np.mean(values)), 6) if values else None
    return means


def _performance(title: str, metrics: dict, roc: Path, reliability: Path) -> ReportSection:
    return ReportSection(title, _key_figures(metrics, "slides", "n_slides"),
                         [(path, what) for path, what in ((roc, "ROC curve"), (reliability, "Reliability diagram"))
                          if path.is_file()],
                         (metrics.get("classes") or [], metrics.get("confusion_matrix") or []),
                         patient_figures=_key_figures(metrics["patients"], "patients", "n_patients")
                         if isinstance(metrics.get("patients"), dict) else [])


def _key_figures(metrics: dict, unit: str, count: str) -> list[tuple[str, str, str]]:
    """AUC, AUPRC, balanced accuracy (each with its 95 % interval), calibration error and the count,
    named per ``unit`` (slides or patients)."""
    def interval(name: str) -> str:
        ci = metrics.get(f"{name}_ci95") or []
        return f"95 % CI {number(ci[0])}\u2013{number(ci[1])}" if len(ci) == 2 else ""

    figures = [(f"{name} ({unit})", number(metrics.get(key)), interval(key))
               for name, key in (("AUC", "auc"), ("AUPRC", "auprc"), ("Balanced accuracy", "balanced_accuracy"))
               if key in metrics]
    if "ece" in metrics:
        figures.append((f"Calibration error ({unit})", number(metrics["ece"]), "expected calibration error, 10 bins"))
    figures.append((f"{unit.capitalize()} with a label", str(metrics.get(count, "n/a")), ""))
    return figures
