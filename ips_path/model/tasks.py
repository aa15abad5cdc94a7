"""Prediction tasks of a slide model: their heads' output size, probabilities (or risks) and losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime.errors import BadInputError
from ..survival.losses import cox_partial_nll, discrete_risk, discrete_survival, discrete_time_nll

__all__ = ["MISSING_TARGET", "SURVIVAL_TARGET_COLUMNS", "TASK_KINDS", "Task", "compute_loss", "task_losses"]

TASK_KINDS = ("multiclass", "binary", "multilabel", "survival")
#: Target of a multiclass or binary task for a slide without a label for it: left out of the task's loss.
MISSING_TARGET = -1
SURVIVAL_TARGET_COLUMNS = ("time", "event", "bin")


@dataclass(frozen=True)
class Task:
    """One slide-level prediction target.

    Attributes
    ----------
    name : str
        Unique name, used as key of logits, targets and losses (no ``.``).
    n_classes : int
        Number of classes: >= 2 for ``"multiclass"``, exactly 2 for ``"binary"``, >= 1 labels for
        ``"multilabel"``. For ``"survival"``: 1 = a Cox risk score, K >= 2 = hazards of K time bins.
    kind : {"multiclass", "binary", "multilabel", "survival"}
        ``"multiclass"``: softmax over classes, cross-entropy, target = class index (int64).
        ``"binary"``: one logit, sigmoid, BCE, target = 0/1. ``"multilabel"``: one logit per label,
        sigmoid each, BCE, target = ``(n_classes,)`` 0/1 vector. ``"survival"``: target = ``(3,)``
        float (time, event 0/1, time bin); one output: the Cox partial likelihood of the batch
        (Breslow ties); K outputs: the discrete-time hazard likelihood (see :mod:`ips_path.survival`).
    """

    name: str
    n_classes: int
    kind: str = "multiclass"

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise BadInputError(f"task name {self.name!r} must be non-empty and contain no '.'")
        if self.kind not in TASK_KINDS:
            raise BadInputError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        minimum = {"multiclass": 2, "binary": 2, "multilabel": 1, "survival": 1}[self.kind]
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

        Binary tasks give ``[1 - p, p]``, so every task has one probability per class name.
        Survival tasks give the survival past the end of each time bin (discrete time), or the risk
        score itself (Cox, which predicts no probability).
        """
        logits = logits.float()
        if self.kind == "survival":
            return logits if self.is_cox else discrete_survival(logits)
        if self.kind == "multiclass":
            return logits.softmax(-1)
        p = logits.sigmoid()
        return torch.stack((1 - p, p), dim=-1) if self.kind == "binary" else p

    def risk(self, logits: torch.Tensor) -> torch.Tensor:
        """Survival logits ``(..., n_outputs)`` -> risk scores ``(...)``: higher means an earlier event."""
        if self.kind != "survival":
            raise BadInputError(f"task {self.name!r}: a {self.kind} task has no risk score")
        logits = logits.float()
        return logits[..., 0] if self.is_cox else discrete_risk(logits)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean loss over the batch.

        Parameters
        ----------
        logits : Tensor
            ``(B, n_classes)``; binary ``(B,)``.
        target : Tensor
            multiclass ``(B,)`` class indices; binary ``(B,)`` 0/1; multilabel ``(B, n_classes)`` 0/1;
            survival ``(B, 3)``: time, event 0/1, time bin (unused by Cox). A multiclass or binary
            target :data:`MISSING_TARGET` leaves its slide out (the mean is over the other slides; with
            none left the loss is 0, still part of the graph).
        class_weight : Tensor, optional
            ``(n_classes,)``. multiclass: cross-entropy class weights; binary: weight of the negative and
            positive class (weighted mean, as cross-entropy does); multilabel: ``pos_weight`` of each label.
        """
        logits = logits.float()
        target = target.to(logits.device)
        if self.kind == "survival":
            return self._survival_loss(logits, target, class_weight)
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

    def _survival_loss(self, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None
                       ) -> torch.Tensor:
        if class_weight is not None:
            raise BadInputError(f"task {self.name!r}: survival tasks take no class weights")
        if tuple(target.shape) != (logits.shape[0], len(SURVIVAL_TARGET_COLUMNS)):
            raise BadInputError(f"task {self.name!r}: survival targets have shape {tuple(target.shape)}, expected "
                                f"({logits.shape[0]}, 3): {', '.join(SURVIVAL_TARGET_COLUMNS)}")
        time, event, bin_index = target.unbind(dim=1)
        if self.is_cox:
            return cox_partial_nll(logits.reshape(-1), time, event)
        return discrete_time_nll(logits, bin_index.round().long(), event)


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
    """Sum of the task losses (cross-entropy for multiclass, BCE-with-logits for binary/multilabel, the
    Cox or discrete-time likelihood for survival).

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
