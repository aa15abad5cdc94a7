"""Prediction tasks of a slide classifier: their heads' output size, probabilities and losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BadInputError

TASK_KINDS = ("multiclass", "binary", "multilabel")


@dataclass(frozen=True)
class Task:
    """One slide-level prediction target.

    Attributes
    ----------
    name : str
        Unique name, used as key of logits, targets and losses (no ``.``).
    n_classes : int
        Number of classes: >= 2 for ``"multiclass"``, exactly 2 for ``"binary"``, >= 1 labels for
        ``"multilabel"``.
    kind : {"multiclass", "binary", "multilabel"}
        ``"multiclass"``: softmax over classes, cross-entropy, target = class index (int64).
        ``"binary"``: one logit, sigmoid, BCE, target = 0/1. ``"multilabel"``: one logit per label,
        sigmoid each, BCE, target = ``(n_classes,)`` 0/1 vector.
    """

    name: str
    n_classes: int
    kind: str = "multiclass"

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise BadInputError(f"task name {self.name!r} must be non-empty and contain no '.'")
        if self.kind not in TASK_KINDS:
            raise BadInputError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        minimum = {"multiclass": 2, "binary": 2, "multilabel": 1}[self.kind]
        if self.n_classes < minimum or (self.kind == "binary" and self.n_classes != 2):
            raise BadInputError(f"task {self.name!r}: a {self.kind} task cannot have {self.n_classes} classes")

    @property
    def n_outputs(self) -> int:
        """Logits of the task's head: 1 for binary, ``n_classes`` otherwise."""
        return 1 if self.kind == "binary" else self.n_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., n_outputs)`` (binary: ``(...)``) -> probabilities ``(..., n_classes)``.

        Binary tasks give ``[1 - p, p]``, so every task has one probability per class name.
        """
        logits = logits.float()
        if self.kind == "multiclass":
            return logits.softmax(-1)
        p = logits.sigmoid()
        return torch.stack((1 - p, p), dim=-1) if self.kind == "binary" else p

    def loss(self, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean loss over the batch.

        Parameters
        ----------
        logits : Tensor
            ``(B, n_classes)``; binary ``(B,)``.
        target : Tensor
            multiclass ``(B,)`` class indices; binary ``(B,)`` 0/1; multilabel ``(B, n_classes)`` 0/1.
        class_weight : Tensor, optional
            ``(n_classes,)``. multiclass: cross-entropy class weights; binary: weight of the negative and
            positive class (weighted mean, as cross-entropy does); multilabel: ``pos_weight`` of each label.
        """
        logits = logits.float()
        target = target.to(logits.device)
        expected = (logits.shape[0], self.n_classes) if self.kind == "multilabel" else (logits.shape[0],)
        if tuple(target.shape) != expected:
            raise BadInputError(f"task {self.name!r}: targets have shape {tuple(target.shape)}, "
                                f"expected {expected} for a {self.kind} task")
        if class_weight is not None:
            class_weight = class_weight.to(logits.device, torch.float32)
            if class_weight.shape != (self.n_classes,):
                raise BadInputError(f"task {self.name!r}: class weights need {self.n_classes} values, "
                                    f"got shape {tuple(class_weight.shape)}")
        if self.kind == "multiclass":
            return F.cross_entropy(logits, target.long(), weight=class_weight)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=class_weight)
        losses = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        if class_weight is None:
            return losses.mean()
        weights = class_weight[target.long()]
        return (weights * losses).sum() / weights.sum()


def task_losses(logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], tasks: Sequence[Task],
                class_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Loss of every task, keyed by task name (see :meth:`Task.loss`)."""
    missing = [t.name for t in tasks if t.name not in targets]
    if missing:
        raise BadInputError(f"no targets for task(s) {', '.join(missing)}")
    class_weights = class_weights or {}
    return {t.name: t.loss(logits[t.name], targets[t.name], class_weights.get(t.name)) for t in tasks}


def compute_loss(logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], tasks: Sequence[Task],
                 class_weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum of the task losses (cross-entropy for multiclass, BCE-with-logits for binary/multilabel).

    Parameters
    ----------
    logits : dict
        Task name -> logits, as returned by the model.
    targets : dict
        Task name -> targets, see :meth:`Task.loss`.
    tasks : sequence of Task
    class_weights : dict, optional
        Task name -> ``(n_classes,)`` weights, see :meth:`Task.loss`.

    Returns
    -------
    Tensor
        Scalar float32 loss.
    """
    return torch.stack(list(task_losses(logits, targets, tasks, class_weights).values())).sum()
