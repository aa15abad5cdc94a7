"""Prediction tasks of a slide model: their heads' output size, probabilities (or risks) and losses.

The model knows three head kinds of its own (``multiclass``, ``binary``, ``multilabel``). An outcome
kind with another head (survival, regression; :mod:`ips_path.tasks`) registers it here with
:func:`register_head_kind`, so that the model layer depends on no outcome kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime.errors import BadInputError

__all__ = ["MISSING_TARGET", "TASK_KINDS", "HeadKind", "Task", "compute_loss", "register_head_kind", "task_losses"]

#: Target of a multiclass or binary task for a slide without a label for it: left out of the task's loss.
MISSING_TARGET = -1


@dataclass(frozen=True)
class HeadKind:
    """What a head kind registered by an outcome kind computes (see :class:`Task`).

    Attributes
    ----------
    min_classes : int
        The fewest outputs a task of this kind may have.
    loss : callable
        ``(task, logits (B, n_outputs) float32, target, class_weight or None) -> scalar``.
    probabilities : callable
        ``(task, logits float32) -> (..., n_classes)``.
    risk : callable, optional
        ``(task, logits float32) -> (...)`` risk scores, for kinds that rank slides by risk.
    """

    min_classes: int
    loss: Callable[..., torch.Tensor]
    probabilities: Callable[..., torch.Tensor]
    risk: Callable[..., torch.Tensor] | None = None


_HEAD_KINDS: dict[str, HeadKind] = {}
#: The model's own head kinds; :func:`register_head_kind` adds to what :class:`Task` accepts.
TASK_KINDS = ("multiclass", "binary", "multilabel")


def register_head_kind(name: str, head: HeadKind) -> None:
    """Let :class:`Task` take ``kind=name`` (an outcome kind's head; registering a name again replaces it)."""
    if name in TASK_KINDS:
        raise ValueError(f"head kind {name!r} is one of the model's own")
    _HEAD_KINDS[name] = head


def _kinds() -> tuple[str, ...]:
    return (*TASK_KINDS, *_HEAD_KINDS)


@dataclass(frozen=True)
class Task:
    """One slide-level prediction target.

    Attributes
    ----------
    name : str
        Unique name, used as key of logits, targets and losses (no ``.``).
    n_classes : int
        Number of classes: >= 2 for ``"multiclass"``, exactly 2 for ``"binary"``, >= 1 labels for
        ``"multilabel"``; the outputs of a registered kind's head (survival: 1 = a Cox risk score,
        K >= 2 = hazards of K time bins).
    kind : str
        ``"multiclass"``: softmax over classes, cross-entropy, target = class index (int64).
        ``"binary"``: one logit, sigmoid, BCE, target = 0/1. ``"multilabel"``: one logit per label,
        sigmoid each, BCE, target = ``(n_classes,)`` 0/1 vector. Other kinds are registered by the
        outcome kinds (:func:`register_head_kind`): ``"survival"`` (a Cox risk, or discrete-time
        hazards; :mod:`ips_path.tasks.survival`), ``"regression"`` (:mod:`ips_path.tasks.regression`).
    """

    name: str
    n_classes: int
    kind: str = "multiclass"

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise BadInputError(f"task name {self.name!r} must be non-empty and contain no '.'")
        if self.kind not in _kinds():
            raise BadInputError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(_kinds())}")
        minimum = {"multiclass": 2, "binary": 2, "multilabel": 1}.get(self.kind) or _HEAD_KINDS[self.kind].min_classes
        if self.n_classes < minimum or (self.kind == "binary" and self.n_classes != 2):
            raise BadInputError(f"task {self.name!r}: a {self.kind} task cannot have {self.n_classes} classes")

    @property
    def n_outputs(self) -> int:
        """Logits of the task's head: 1 for binary, ``n_classes`` otherwise."""
        return 1 if self.kind == "binary" else self.n_classes

    @property
    def is_cox(self) -> bool:
        """A survival task whose head is one Cox risk score."""
        return self.kind == "survival" and self.n_classes == 1

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., n_outputs)`` (binary: ``(...)``) -> probabilities ``(..., n_classes)``.

        Binary tasks give ``[1 - p, p]``, so every task has one probability per class name; a
        registered kind gives what its head defines (survival: the survival past the end of each time
        bin, or the Cox risk itself).
        """
        logits = logits.float()
        if self.kind in _HEAD_KINDS:
            return _HEAD_KINDS[self.kind].probabilities(self, logits)
        if self.kind == "multiclass":
            return logits.softmax(-1)
        p = logits.sigmoid()
        return torch.stack((1 - p, p), dim=-1) if self.kind == "binary" else p

    def risk(self, logits: torch.Tensor) -> torch.Tensor:
        """Survival logits ``(..., n_outputs)`` -> risk scores ``(...)``: higher means an earlier event."""
        head = _HEAD_KINDS.get(self.kind)
        if head is None or head.risk is None:
            raise BadInputError(f"task {self.name!r}: a {self.kind} task has no risk score")
        return head.risk(self, logits.float())

    def loss(self, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean loss over the batch.

        Parameters
        ----------
        logits : Tensor
            ``(B, n_classes)``; binary ``(B,)``.
        target : Tensor
            multiclass ``(B,)`` class indices; binary ``(B,)`` 0/1; multilabel ``(B, n_classes)`` 0/1;
            a registered kind what its head takes (survival ``(B, 3)``: time, event, bin). A multiclass or binary
            target :data:`MISSING_TARGET` leaves its slide out (the mean is over the other slides; with
            none left the loss is 0, still part of the graph).
        class_weight : Tensor, optional
            ``(n_classes,)``. multiclass: cross-entropy class weights; binary: weight of the negative and
            positive class (weighted mean, as cross-entropy does); multilabel: ``pos_weight`` of each label.
        """
        logits = logits.float()
        target = target.to(logits.device)
        if self.kind in _HEAD_KINDS:
            return _HEAD_KINDS[self.kind].loss(self, logits, target, class_weight)
        expected = (logits.shape[0], self.n_classes) if self.kind == "multilabel" else (logits.shape[0],)
        if tuple(target.shape) != expected:
            raise BadInputError(f"task {self.name!r}: targets have shape {tuple(target.shape)}, "
                                f"expected {expected} for a {self.kind} task")
        if class_weight is not None:
            class_weight = class_weight.to(logits.device, torch.float32)
            if class_weight.shape != (self.n_classes,):
                raise BadInputError(f"task {self.name!r}: class weights need {self.n_classes} values, "
                                    f"got shape {tuple(class_weight.shape)}")
        if self.kind != "multilabel":
            known = target != MISSING_TARGET
            if not bool(known.all()):
                if not bool(known.any()):
                    return logits.sum() * 0.0
                logits, target = logits[known], target[known]
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
    """Sum of the task losses (cross-entropy for multiclass, BCE-with-logits for binary/multilabel, what a
    registered kind's head defines for the others).

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
