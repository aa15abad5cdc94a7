"""What an outcome kind is: the one interface training, prediction, cross-validation and review ask.

An outcome kind (one label column or several, survival, regression) owns everything that differs
between kinds: the manifest columns it reads and their checks, how splits and folds are stratified,
each slide's target, the heads and losses of its model, the batches and class weights, the
validation metrics and what ``--monitor`` reads, the step after training, what it keeps in a
checkpoint, the columns of ``predictions.csv``, its metrics files and pictures, and its section of
the report. :mod:`ips_path.training.train`, :mod:`ips_path.inference.predict` and the others hold no branch on the kind:
they ask the object :func:`kind_for` returns.

A kind is a subclass of :class:`OutcomeKind` in its own module, registered under the name that
``--task`` gives (``@register_kind("regression")``); ``ips_path/tasks/__init__.py`` imports each
kind's module, one line per kind. See ``docs/outcome_kinds.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ips_path.config import TrainConfig
from ips_path.model import Task
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow, assign_splits, validation_split_problems

__all__ = ["KINDS", "OutcomeKind", "ReportSection", "SlideScores", "kind_for", "kind_of_checkpoint", "kind_of_run",
           "number", "register_kind"]

#: ``--task`` name -> the outcome kind's class, filled by :func:`register_kind`.
KINDS: dict[str, type[OutcomeKind]] = {}


def register_kind(name: str):
    """Class decorator: make an :class:`OutcomeKind` subclass the kind of ``--task name``."""
    def register(cls: type[OutcomeKind]) -> type[OutcomeKind]:
        cls.name = name
        KINDS[name] = cls
        return cls
    return register


def _kind_class(task: str) -> type[OutcomeKind]:
    if task not in KINDS:
        raise BadInputError(f"--task {task!r} is not one of {', '.join(KINDS)}")
    return KINDS[task]


def kind_of_run(run: Mapping[str, Any]) -> type[OutcomeKind]:
    """The outcome kind of a prediction folder's ``run.json`` (one written before it named its kind is of the
    default ``--task``: a classifier's, or a model without classes)."""
    return _kind_class(run.get("task") or TrainConfig().task)


def kind_for(config: TrainConfig) -> OutcomeKind:
    """The outcome kind of a training configuration (not yet fitted to a manifest)."""
    return _kind_class(config.task)(config)


def kind_of_checkpoint(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> OutcomeKind:
    """The fitted outcome kind a checkpoint was trained with (its classes, scales, cut points)."""
    config = TrainConfig.from_dict(checkpoint["config"], source=source)
    kind = _kind_class(config.task)(config)
    kind.load_state(checkpoint)
    return kind


@dataclass
class SlideScores:
    """What one model (one fold of an ensemble) predicted for a slide: task name -> ``(n_outputs,)`` logits
    and probabilities (float32, CPU)."""

    logits: dict[str, torch.Tensor]
    probabilities: dict[str, torch.Tensor]


@dataclass
class ReportSection:
    """A kind's section of the review page: key figures (name, value, note; plain text), pictures (file,
    caption) and, for classes, a confusion matrix."""

    title: str
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    pictures: list[tuple[Path, str]] = field(default_factory=list)
    confusion: tuple[list[str], list[list[int]]] | None = None
    css_class: str = "metrics"
    patient_figures: list[tuple[str, str, str]] = field(default_factory=list)


def number(value: object, digits: int = 3) -> str:
    """A metric as the report shows it: ``0.912``, or ``n/a`` when it is missing or not finite."""
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


class OutcomeKind:
    """One kind of slide-level outcome. Subclasses override what differs; the defaults suit a kind
    without classes, weights or a step after training.

    An instance is made from the run's configuration (:func:`kind_for`), then fitted: to the
    manifest (:meth:`fit_manifest`, all of its rows) and to the training slides (:meth:`fit_training`),
    or from a checkpoint (:meth:`load_state`).
    """

    name: ClassVar[str] = ""
    #: What ``--monitor auc`` (the default) means for this kind: the ``val_<metric>`` it reads.
    default_monitor: ClassVar[str] = "auc"
    #: The metrics a cross-validation summarises per fold (``val_<metric>``).
    cv_metrics: ClassVar[tuple[str, ...]] = ()
    #: Whether the folds of a cross-validation predict together (an ensemble).
    ensembles: ClassVar[bool] = True

    def __init__(self, config: TrainConfig):
        self.config = config

    # -- the manifest -------------------------------------------------------------------------------

    def read_manifest(self, manifest: str | os.PathLike, *, training: bool) -> list[ManifestRow]:
        """The manifest's rows with the columns this kind reads, every problem named at once.

        ``training``: the outcome columns are required; prediction reads them where given.
        """
        raise NotImplementedError

    def strata(self, rows: Sequence[ManifestRow]) -> dict[str, str] | None:
        """case_id -> what splits and folds keep in proportion; None: the first label."""
        return None

    def splits(self, rows: Sequence[ManifestRow], manifest: str | os.PathLike) -> dict[str, str]:
        """slide_id -> train/val/test: the manifest's split where given, else by patient, stratified."""
        splits = assign_splits(rows, val_fraction=self.config.val_fraction, test_fraction=0.0, seed=self.config.seed,
                               strata=self.strata(rows))
        self.check_splits(rows, splits, manifest)
        return splits

    def check_splits(self, rows: Sequence[ManifestRow], splits: Mapping[str, str], manifest: str | os.PathLike,
                     ) -> None:
        """Refuse splits (or a cross-validation fold's) this kind cannot train or measure on."""

    def check_folds(self, rows: Sequence[ManifestRow], folds: Mapping[str, int | str], k: int,
                    manifest: str | os.PathLike) -> None:
        """Refuse cross-validation folds this kind cannot measure (before any fold trains)."""

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The manifest columns read as labels (a row's ``labels``)."""
        return self.config.label_column_names

    def splits_columns(self, row: ManifestRow) -> dict[str, Any]:
        """A slide's label cells, as a training run's ``splits.csv`` records them."""
        return dict(zip(self.label_columns, row.labels, strict=True))

    def outcome_columns(self, row: ManifestRow) -> dict[str, Any]:
        """The columns of a cross-validation's ``splits.csv`` that hold a slide's outcome."""
        raise NotImplementedError

    def fit_manifest(self, rows: Sequence[ManifestRow], manifest: str | os.PathLike) -> None:
        """Learn what the whole manifest fixes (the classes)."""

    # -- the model ----------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """A checkpoint's ``class_names``: the ``prob_<class>`` columns of ``predictions.csv``."""
        return []

    def model_tasks(self) -> list[Task]:
        """The model's heads (:class:`~ips_path.model.Task`), in the model's order."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------------

    def fit_training(self, train_rows: Sequence[ManifestRow]) -> None:
        """Learn what the training slides fix (time bins, the target's scale)."""

    def target(self, row: ManifestRow) -> tuple:
        """A slide's target (numbers only; what :meth:`batch_targets` stacks)."""
        raise NotImplementedError

    def batch_targets(self, tasks: Sequence[Task], targets: Sequence[tuple]) -> dict[str, torch.Tensor]:
        """Task name -> the targets of a batch, from the slides' :meth:`target`."""
        raise NotImplementedError

    def class_weights(self, tasks: Sequence[Task], targets: Sequence[tuple], device: torch.device
                      ) -> dict[str, torch.Tensor] | None:
        """``--class-weights``: task name -> weights of its classes, from the training targets."""
        return None

    def batches(self, targets: Sequence[tuple], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
        """This epoch's batches of this process's shuffled slides (positions into ``targets``)."""
        return [list(range(i, min(i + batch_size, len(targets)))) for i in range(0, len(targets), batch_size)]

    def check_training_slides(self, train_targets: Sequence[tuple]) -> None:
        """Warn about training slides that leave part of the outcome unseen."""

    @property
    def class_columns(self) -> tuple[str, ...]:
        """The label columns whose every class a validation split should hold (none for a number or a time)."""
        return ()

    def validation_split_problems(self, rows: Sequence[ManifestRow], splits: Mapping[str, str]) -> list[str]:
        """What makes the validation split too weak to judge a model by, one line each (empty when none)."""
        return validation_split_problems(rows, splits, self.class_columns)

    def validation_metrics(self, tasks: Sequence[Task], logits: Mapping[str, torch.Tensor],
                           targets: Sequence[tuple]) -> dict[str, float]:
        """The validation row of an epoch: ``val_loss`` and the ``val_<metric>`` ``--monitor`` reads."""
        raise NotImplementedError

    def monitor_key(self) -> str:
        """The row key ``--monitor`` reads."""
        return f"val_{self.config.monitor}"

    def epoch_text(self, row: Mapping[str, float]) -> str:
        """What the epoch's log line says of its validation."""
        return f"  val loss {row['val_loss']:.4f}" if "val_loss" in row else ""

    @property
    def finishes(self) -> bool:
        """Whether :meth:`finish` has a step after training (it then gets the best weights' logits)."""
        return False

    def finish(self, tasks: Sequence[Task], train_logits: Mapping[str, torch.Tensor],
               train_targets: Sequence[tuple], val_logits: Mapping[str, torch.Tensor] | None,
               val_targets: Sequence[tuple], out_dir: Path) -> None:
        """The step after training, with the best weights (cut points, the run's metrics files)."""

    def finished(self, checkpoint: Mapping[str, Any], run_dir: Path) -> bool:
        """Whether a run whose ``last.pt`` is ``checkpoint`` has done :meth:`finish` (a cross-validation
        does not train or measure it again)."""
        return False

    # -- the checkpoint -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the kind, beside ``class_names`` (plain values, ``weights_only``)."""
        return {}

    def load_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Read back what :meth:`state` and ``class_names`` saved."""

    def run_info(self) -> dict[str, Any]:
        """What ``run.json`` of a prediction folder records of the kind, beside ``classes``."""
        return {}

    # -- cross-validation ---------------------------------------------------------------------------

    def fold_metrics(self, run_dir: Path, checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
        """``val_<metric>`` of :attr:`cv_metrics` of a fold (``checkpoint``: its ``best.pt``, if any)."""
        row = {f"val_{m}": float("nan") for m in self.cv_metrics}
        if checkpoint is not None:
            history = {int(h["epoch"]): h for h in checkpoint["history"]}[int(checkpoint["epoch"])]
            row.update({f"val_{m}": float(history.get(f"val_{m}", float("nan"))) for m in self.cv_metrics})
        return row

    # -- prediction ---------------------------------------------------------------------------------

    def truth(self, row: ManifestRow) -> dict[str, Any]:
        """What a predicted slide's outcome records of its truth (``label``: the ``label`` cell)."""
        raise NotImplementedError

    def slide_result(self, tasks: Sequence[Task], folds: Sequence[SlideScores]) -> dict[str, Any]:
        """A slide's prediction from each model of the ensemble: ``predicted`` (text or a number),
        ``probabilities`` (one per class name) and what the kind's columns need."""
        raise NotImplementedError

    def prediction_columns(self, n_folds: int) -> list[str]:
        """The columns of ``predictions.csv`` between ``predicted`` and ``n_patches``."""
        return []

    def prediction_cells(self, extra: Mapping[str, Any], ok: bool, n_folds: int) -> list[Any]:
        """A slide's cells of :meth:`prediction_columns`."""
        return []

    def write_metrics(self, out_dir: Path, scored: Sequence[tuple[str, Mapping[str, Any]]],
                      rows: Sequence[ManifestRow]) -> dict[str, Any] | None:
        """The metrics files and pictures over the predicted slides (``scored``: slide_id, extra), removing
        stale ones; the metrics, None where no slide has a known outcome."""
        raise NotImplementedError

    def summary_lines(self, metrics: Mapping[str, Any], out_dir: Path) -> list[str]:
        """What ``ipspath predict`` prints of the metrics."""
        return []

    # -- the folder's files, for every kind ------------------------------------------------------------

    #: The files of a prediction folder this kind writes (name -> what it holds), for the documentation.
    prediction_files: ClassVar[dict[str, str]] = {}
    #: What :meth:`prediction_columns` are, for the documentation.
    columns_doc: ClassVar[str] = ""

    @classmethod
    def output_files(cls, out_dir: Path) -> list[Path]:
        """Every metrics file and picture this kind may have written into a prediction folder."""
        return [out_dir / name for name in cls.prediction_files if "<" not in name]

    @classmethod
    def report_filters(cls, run: Mapping[str, Any], classes: list[str], rows: Sequence[Any]
                       ) -> tuple[list[str], list[str]]:
        """The review page's choices of true label and of prediction, given the ``prob_<class>`` columns'
        ``classes`` and the predicted rows (:class:`~ips_path.inference.predictions.SlidePrediction`): the classes,
        and labels outside them."""
        return classes + sorted({r.label for r in rows if r.label} - set(classes)), classes

    @classmethod
    def report_sections(cls, out_dir: Path, run: Mapping[str, Any]) -> list[ReportSection]:
        """This kind's sections of the review page of a prediction folder (none where it wrote nothing)."""
        return []

