"""The label columns of a manifest as the tasks of a classifier (``ipspath train --label-columns grade,her2``).

Each label column is one multiclass task named after the column: its classes are the column's sorted
distinct values (a softmax over them, also for two), with its own query token and head in the model.
The default is the one ``label`` column, which trains and predicts exactly as a single-task run always
has. With several columns:

* A slide whose cell is empty for a task stays in the run and counts for nothing in that task's loss
  and metrics (its target is :data:`~ips_path.model.tasks.MISSING_TARGET`); a row empty in every label
  column is refused by :func:`~ips_path.slides.manifest.read_manifest`.
* The training loss is the sum of the tasks' losses, each the mean over the batch's slides labelled
  for it; ``metrics.csv`` logs each task's as ``train_<task>_loss`` beside ``train_loss``.
* Validation logs, per task, ``val_<task>_<metric>`` (loss, AUC, AUPRC, balanced accuracy, accuracy,
  recall per class) and, over the tasks, ``val_loss`` (their sum) and ``val_auc``, ``val_auprc``,
  ``val_balanced_accuracy``, ``val_accuracy`` (their mean over the tasks where the metric is defined).
  ``--monitor`` reads the means, so ``best.pt`` and early stopping follow the mean of the tasks.
* Splits and cross-validation folds are stratified by the first label column.
* Checkpoints keep ``task_classes`` (task -> class names, in task order) and, as ``class_names``, the
  flat list ``<task>=<class>``: the order of the probabilities a multi-task prediction concatenates,
  which names the ``prob_<task>=<class>`` columns of ``predictions.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.evaluation.metrics import classification_metrics
from ips_path.model import Task
from ips_path.model.tasks import MISSING_TARGET
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow

__all__ = ["MEAN_METRICS", "TASK_SEPARATOR", "LabelTasks", "batch_targets", "class_weights", "joined_classes",
           "validation_metrics"]

#: Joins a task and one of its classes in flat class names: ``grade=high``.
TASK_SEPARATOR = "="
#: Validation metrics averaged over the tasks into ``val_<metric>`` (what ``--monitor`` reads).
MEAN_METRICS = ("auc", "auprc", "balanced_accuracy", "accuracy")


@dataclass(frozen=True)
class LabelTasks:
    """The label columns of a run and the classes of each.

    Attributes
    ----------
    names : tuple of str
        The label columns, in the order given; each names its task.
    classes : tuple of tuple of str
        The sorted class names of each task.
    """

    names: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]

    @classmethod
    def from_rows(cls, rows: Sequence[ManifestRow], names: Sequence[str], manifest: str | Path) -> LabelTasks:
        """The tasks of the label columns ``names`` (the rows' ``labels``, in that order).

        Raises
        ------
        BadInputError
            A column with fewer than two classes, naming the manifest, the column and what it holds.
        """
        classes = tuple(tuple(sorted({r.labels[i] for r in rows if r.labels[i] is not None}))
                        for i in range(len(names)))
        for name, found in zip(names, classes, strict=True):
            if len(found) < 2:
                raise BadInputError(f"{manifest}: training needs at least two classes in the {name} column, found "
                                    f"{list(found)}; label slides of another class or leave the column out")
        return cls(tuple(names), classes)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> LabelTasks | None:
        """The tasks of a multi-task checkpoint; None for a single-task (or survival) one."""
        saved = checkpoint.get("task_classes")
        if not saved:
            return None
        return cls(tuple(saved), tuple(tuple(c) for c in saved.values()))

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    @property
    def class_names(self) -> list[str]:
        """What a checkpoint's ``class_names`` hold: the classes of the one task, or ``<task>=<class>``
        of every task in order."""
        if not self.several:
            return list(self.classes[0])
        return [f"{name}{TASK_SEPARATOR}{c}" for name, classes in zip(self.names, self.classes, strict=True)
                for c in classes]

    def state(self) -> dict[str, list[str]]:
        """``task_classes`` of a checkpoint (task -> class names)."""
        return {name: list(classes) for name, classes in zip(self.names, self.classes, strict=True)}

    def tasks(self) -> list[Task]:
        """One multiclass :class:`~ips_path.model.Task` per column."""
        return [Task(name, len(classes), "multiclass") for name, classes in zip(self.names, self.classes, strict=True)]

    def targets(self, labels: Sequence[str | None]) -> tuple[int, ...]:
        """A slide's class index for each task (``MISSING_TARGET`` for an empty or unknown value)."""
        return tuple(classes.index(value) if value in classes else MISSING_TARGET
                     for value, classes in zip(labels, self.classes, strict=True))

    def split(self, probabilities: Sequence[float]) -> dict[str, list[float]]:
        """A flat probability vector (the order of :attr:`class_names`) -> task -> its probabilities."""
        out, start = {}, 0
        for name, classes in zip(self.names, self.classes, strict=True):
            out[name] = list(probabilities[start:start + len(classes)])
            start += len(classes)
        return out

    def predicted(self, probabilities: Sequence[float]) -> dict[str, str]:
        """Task -> its most probable class, from a flat probability vector."""
        return {name: classes[int(np.argmax(p))] for (name, p), classes in
                zip(self.split(probabilities).items(), self.classes, strict=True)}


def joined_classes(by_task: Mapping[str, str | None]) -> str | None:
    """``grade=high; her2=pos``: one class per task, as ``predictions.csv`` writes a multi-task slide's
    ``label`` and ``predicted``; None unless every task has one."""
    if not by_task or any(value is None for value in by_task.values()):
        return None
    return "; ".join(f"{name}{TASK_SEPARATOR}{value}" for name, value in by_task.items())


def batch_targets(tasks: Sequence[Task], task_labels: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Task name -> ``(B,)`` class indices of a batch, from each slide's per-task indices."""
    indices = torch.tensor([list(labels) for labels in task_labels], dtype=torch.long).reshape(-1, len(tasks))
    return {task.name: indices[:, i] for i, task in enumerate(tasks)}


def class_weights(task_labels: Sequence[Sequence[int]], tasks: Sequence[Task], device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """Per task, ``n / (K * n_k)`` for each class k over the training slides labelled for it (0 for a class
    without slides)."""
    out = {}
    for i, task in enumerate(tasks):
        known = [labels[i] for labels in task_labels if labels[i] != MISSING_TARGET]
        counts = np.bincount(known, minlength=task.n_classes).astype(np.float64)
        weights = np.divide(len(known), task.n_classes * counts, out=np.zeros(task.n_classes), where=counts > 0)
        out[task.name] = torch.tensor(weights, dtype=torch.float32, device=device)
    return out


def validation_metrics(label_tasks: LabelTasks, tasks: Sequence[Task], logits: Mapping[str, torch.Tensor],
                       task_labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """The validation row of several tasks (see the module docstring), each over its labelled slides (NaN
    metrics for a task without any)."""
    targets = batch_targets(tasks, task_labels)
    per_task: dict[str, dict[str, float]] = {}
    for task, classes in zip(tasks, label_tasks.classes, strict=True):
        labels = targets[task.name]
        known = labels != MISSING_TARGET
        if bool(known.any()):
            found = classification_metrics(labels[known].numpy(), task.probabilities(logits[task.name][known]).numpy(),
                                           classes)
        else:
            found = {name: float("nan") for name in (*MEAN_METRICS, *(f"recall_{c}" for c in classes))}
        per_task[task.name] = {"loss": float(task.loss(logits[task.name], labels)), **found}
    row = {"val_loss": sum(found["loss"] for found in per_task.values())}
    for metric in MEAN_METRICS:
        values = np.array([found[metric] for found in per_task.values()], dtype=np.float64)
        row[f"val_{metric}"] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    for name, found in per_task.items():
        row.update({f"val_{name}_{key}": value for key, value in found.items()})
    return row
