"""The prediction folder: the one owner of what ``ipspath predict`` writes and others read.

``predict`` writes through :class:`PredictionFolder`; ``report``, ``heatmap --predictions`` and
the viewer read through it. Layout (:data:`PREDICTION_FILES`)::

    run.json                     the model (path and identity), classes, tiles folder, score array name
    status/<slide_id>.json       per-slide done record (jobs.SlideOutcome): status, identity, probabilities
    predictions.csv              one row per slide of the last run
    metrics.json, roc.png, reliability.png  with labels (several label columns: roc_<task>.png,
                                 reliability_<task>.png)
    patients.csv                 survival models: risk (and curve) per patient
    survival_metrics.json, km.png  survival models with time/event: C-index, Kaplan-Meier curves
    scores/<slide_id>_scores.h5  coords + attention_scores (the layout CLAM users know); multi-task
                                 models also task_attention_scores (T, N), task names in its attrs
    heatmaps/<slide_id>/         pictures of ``ipspath heatmap``
    tiles/                       tile stores made here for slides that had none

A folder holds the results of one model: ``run.json`` names it by identity (checkpoint digest,
configuration, classes), and a run with another model is refused unless it may replace them
(:meth:`PredictionFolder.clear_results`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.jobs import SlideOutcome, Status, read_outcome, write_done_record

__all__ = [
    "PREDICTION_FILES",
    "PREDICTIONS_NAME",
    "PROB_PREFIX",
    "PredictionFolder",
    "SlidePrediction",
    "read_predictions",
]

log = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.csv"
#: ``ipspath report``'s page and its pictures, style and script, written into the folder by default.
REPORT_PAGE, REPORT_ASSETS = "report.html", "report_assets"
PROB_PREFIX = "prob_"
STATUSES = tuple(s.value for s in Status)

#: What ``ipspath predict`` writes into its output folder.
PREDICTION_FILES = {
    "predictions.csv": "slide_id, label, predicted, prob_<class> per class (a cross-validated model: the mean of "
                       "its folds, then fold<i>_prob_<class> per fold), n_patches, status, error; a model of several "
                       "label columns: label_<task> and predicted_<task> per task after predicted, "
                       "prob_<task>=<class>, and label/predicted as task=class pairs joined by '; '",
    "run.json": "model path and identity, score array name, classes (several label columns: also tasks, task -> "
                "classes), tiles folder, target_mpp, patch_size",
    "metrics.json": "with labels: auc, auprc, balanced_accuracy with <name>_ci95 (bootstrap), accuracy, ece with "
                    "calibration_bins, confusion_matrix (rows: true class); with case_ids also patients (the same "
                    "over patients); several label columns: tasks (task -> the same) and mean (over the tasks)",
    "roc.png": "with labels: ROC curve (several label columns: roc_<task>.png per task)",
    "reliability.png": "with labels: reliability diagram (accuracy against confidence) and expected calibration error",
    "status/<slide_id>.json": "per-slide done record: status, identity of slide, store and model, probabilities",
    "scores/<slide_id>_scores.h5": "coords (N, 2) level-0 x, y and attention_scores (N,); multi-task models also "
                                   "task_attention_scores (T, N) with attrs tasks",
    "heatmaps/<slide_id>/": "thumbnail.png, overlay.png, patches.geojson, top_patches.png",
    "tiles/": "tile stores made here for slides that had none",
    "report.html, report_assets/": "written by `ipspath report`; removed with the other results when predict "
                                   "--overwrite replaces the model",
    "patients.csv": "survival models: case_id, n_slides, risk, risk_group (survival_to_<t> per time bin), time, "
                    "event",
    "survival_metrics.json": "survival models with time/event: C-index (Harrell, Uno) with 95 % CI, time-dependent "
                             "AUC, integrated Brier score, log-rank p",
    "km.png": "survival models with time/event: Kaplan-Meier curves of the risk groups",
}


@dataclass(frozen=True)
class SlidePrediction:
    """One row of ``predictions.csv``.

    Attributes
    ----------
    slide_id : str
    label : str
        True label, ``""`` when unknown.
    predicted : str
        Predicted class name, ``""`` for slides without a result.
    probabilities : tuple of float or None
        Probability per class, in the order of the model's class names; ``None`` where empty.
    n_patches : str
        Number of patches scored, as written (empty for failed slides).
    status : str
        One of :class:`~ips_path.runtime.jobs.Status` (done, reused, failed, refused).
    error : str
        Why the slide failed or was refused, ``""`` otherwise.
    """

    slide_id: str
    label: str
    predicted: str
    probabilities: tuple[float | None, ...]
    n_patches: str
    status: str
    error: str

    @property
    def ok(self) -> bool:
        """Whether the slide has a prediction (done in its run or reused from an earlier one)."""
        return self.status in (Status.DONE.value, Status.REUSED.value)

    @property
    def outcome(self) -> str:
        """``"correct"``, ``"wrong"`` or ``"unlabelled"`` (no true label)."""
        if not self.label:
            return "unlabelled"
        return "correct" if self.label == self.predicted else "wrong"

    def probability_of(self, classes: list[str], name: str) -> float | None:
        """Probability of class ``name`` (``None`` if unknown)."""
        return self.probabilities[classes.index(name)] if name in classes else None


def read_predictions(csv_path: str | os.PathLike) -> tuple[list[str], list[SlidePrediction]]:
    """Read a ``predictions.csv`` written by ``ipspath predict``.

    Parameters
    ----------
    csv_path : path
        The CSV: columns ``slide_id, label, predicted, prob_<class>..., n_patches, status, error``.

    Returns
    -------
    classes : list of str
        Class names in the order of the ``prob_<class>`` columns (the model's order).
    rows : list of SlidePrediction
        In file order.

    Raises
    ------
    BadInputError
        Missing file or column, unknown status, a row with more or fewer cells than the header, or
        a probability that is not a number.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BadInputError(f"{csv_path}: no predictions here; run `ipspath predict ... -o {csv_path.parent}` first")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, restkey="\0extra")
        header = reader.fieldnames or []
        missing = [c for c in ("slide_id", "predicted", "status") if c not in header]
        if missing:
            raise BadInputError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                                "expected the predictions.csv that `ipspath predict` writes")
        prob_columns = [c for c in header if c.startswith(PROB_PREFIX)]
        rows = [_parse_row(csv_path, line, record, prob_columns) for line, record in enumerate(reader, start=2)]
    return [c[len(PROB_PREFIX):] for c in prob_columns], rows


def _parse_row(csv_path: Path, line: int, record: dict[str, Any], prob_columns: list[str]) -> SlidePrediction:
    def text(column: str) -> str:
        return (record.get(column) or "").strip()

    if "\0extra" in record or any(v is None for v in record.values()):
        raise BadInputError(f"{csv_path}: line {line}: the row does not have one cell per column of the header; "
                            "run `ipspath predict` again")
    status = text("status")
    if status not in STATUSES:
        raise BadInputError(f"{csv_path}: line {line}: status {status!r} is not one of {', '.join(STATUSES)}")
    probabilities = []
    for column in prob_columns:
        raw = text(column)
        try:
            probabilities.append(float(raw) if raw else None)
        except ValueError:
            raise BadInputError(f"{csv_path}: line {line}: {column} {raw!r} is not a number") from None
    return SlidePrediction(slide_id=record.get("slide_id") or "", label=text("label"), predicted=text("predicted"),
                           probabilities=tuple(p if p is None or math.isfinite(p) else None for p in probabilities),
                           n_patches=text("n_patches"), status=status, error=text("error"))


class PredictionFolder:
    """Paths and files of one prediction folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def predictions_csv(self) -> Path:
        return self.root / PREDICTIONS_NAME

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    @property
    def roc_file(self) -> Path:
        return self.root / "roc.png"

    @property
    def reliability_file(self) -> Path:
        return self.root / "reliability.png"

    @property
    def patients_csv(self) -> Path:
        return self.root / "patients.csv"

    @property
    def survival_metrics_file(self) -> Path:
        return self.root / "survival_metrics.json"

    @property
    def km_file(self) -> Path:
        return self.root / "km.png"

    @property
    def own_tiles(self) -> Path:
        """Where predict tiles slides that have no store elsewhere."""
        return self.root / "tiles"

    def task_roc_file(self, task: str) -> Path:
        """ROC curve of one task of a model of several label columns."""
        return self._inside(".", f"roc_{task}", ".png")

    def task_reliability_file(self, task: str) -> Path:
        """Reliability diagram of one task of a model of several label columns."""
        return self._inside(".", f"reliability_{task}", ".png")

    def _task_pictures(self) -> list[Path]:
        return [*self.root.glob("roc_*.png"), *self.root.glob("reliability_*.png")]

    def _inside(self, folder: str, slide_id: str, suffix: str = "") -> Path:
        """``root/folder/<slide_id><suffix>``, refused for an id that is not a plain file name (``..``, ``/``, NUL)."""
        if not slide_id or "\0" in slide_id or "/" in slide_id or os.sep in slide_id or slide_id in (".", ".."):
            raise BadInputError(f"slide id {slide_id!r} is not a safe file name; rename the slide or fix the manifest")
        return self.root / folder / f"{slide_id}{suffix}"

    def status_file(self, slide_id: str) -> Path:
        return self._inside("status", slide_id, ".json")

    def scores_file(self, slide_id: str) -> Path:
        return self._inside("scores", slide_id, "_scores.h5")

    def heatmap_dir(self, slide_id: str) -> Path:
        return self._inside("heatmaps", slide_id)

    def slide_outputs(self, slide_id: str, store: Path, run: str, *, heatmaps: bool) -> list[Path]:
        """What a slide's done record stands for: the scores in its tile store (``scores/<run>``), its
        scores file and, when predicted with heatmaps, its heatmap folder."""
        return [store / "scores" / run, self.scores_file(slide_id), *([self.heatmap_dir(slide_id)] if heatmaps else [])]

    def make_folders(self) -> None:
        """Create ``status/`` and ``scores/`` (heatmap folders are made per slide)."""
        for folder in ("status", "scores"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # -- run.json ----------------------------------------------------------------------------------

    def read_run(self) -> dict[str, Any]:
        """``run.json``; an empty dict when there is none.

        Raises
        ------
        BadInputError
            It exists but cannot be read as a JSON object.
        """
        return _read_json(self.run_file)

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``; an empty dict when there is none (no labelled slide)."""
        return _read_json(self.metrics_file)

    def read_survival_metrics(self) -> dict[str, Any]:
        """``survival_metrics.json``; an empty dict when there is none (no survival model, or no outcomes)."""
        return _read_json(self.survival_metrics_file)

    def write_run(self, info: dict[str, Any]) -> None:
        _write_json(self.run_file, info)

    # -- per slide ---------------------------------------------------------------------------------

    def read_outcome(self, slide_id: str) -> SlideOutcome | None:
        """The slide's recorded outcome (None when there is none or it cannot be read)."""
        return read_outcome(self.status_file(slide_id))

    def write_outcome(self, outcome: SlideOutcome) -> None:
        """Record a slide's outcome; for a done slide, call it after every other output of the slide."""
        write_done_record(self.status_file(outcome.slide_id), outcome)

    def clear_results(self) -> None:
        """Remove every output of an earlier model: status records, score files, heatmaps, CSV, metrics and
        their pictures, and the report made of them (``report.html``, ``report_assets/``).

        Tile stores (``tiles/``) and ``run.json`` are kept; nothing else in the folder is touched.
        """
        for folder in ("status", "scores", "heatmaps", REPORT_ASSETS):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        (self.root / REPORT_PAGE).unlink(missing_ok=True)
        for path in (self.predictions_csv, self.metrics_file, self.roc_file, self.reliability_file, self.patients_csv,
                     self.survival_metrics_file, self.km_file, *self._task_pictures()):
            path.unlink(missing_ok=True)

    # -- whole run ---------------------------------------------------------------------------------

    def write_predictions_csv(self, outcomes: Sequence[SlideOutcome], classes: Sequence[str],
                              survival_columns: Sequence[str] | None = None, n_folds: int = 0,
                              tasks: Sequence[str] = ()) -> None:
        """``predictions.csv``: one row per outcome, one ``prob_<class>`` column per class.

        A model of several label columns (``tasks``, its task names) also gets ``label_<task>`` and
        ``predicted_<task>`` of each task after ``predicted`` (its ``classes`` are ``<task>=<class>``).

        An ensemble of ``n_folds`` fold models (cross-validation) also gets each fold's probabilities,
        ``fold<i>_prob_<class>``, after the ensemble's (their mean).

        Survival models (``survival_columns`` given, ``classes`` empty): ``predicted`` is the risk
        group, then ``risk`` and the survival curve columns (``survival_to_<t>``, discrete time).

        Raises
        ------
        ValueError
            An outcome's probabilities do not have one value per class (never written half-matching).
        """
        survival = [] if survival_columns is None else ["risk", *survival_columns]
        fold_columns = [f"fold{i}_{PROB_PREFIX}{c}" for i in range(n_folds) for c in classes]
        task_columns = [f"{what}_{task}" for task in tasks for what in ("label", "predicted")]
        columns = ["slide_id", "label", "predicted", *task_columns, *(f"{PROB_PREFIX}{c}" for c in classes),
                   *fold_columns, *survival, "n_patches", "status", "error"]
        rows = []
        for o in outcomes:
            probabilities = o.extra.get("probabilities") if o.ok else None
            if probabilities is not None and len(probabilities) != len(classes):
                raise ValueError(f"{o.slide_id}: {len(probabilities)} probabilities for {len(classes)} classes")
            folds = [p for fold in o.extra.get("fold_probabilities") or [] for p in fold] if o.ok and n_folds else []
            if len(folds) != len(fold_columns):
                folds = [""] * len(fold_columns)  # a slide predicted before the ensemble's record had folds
            risk = [o.extra.get("risk", ""), *o.extra.get("survival", [])] if o.ok and survival else []
            task_labels, task_predicted = o.extra.get("task_labels") or {}, o.extra.get("task_predicted") or {}
            per_task = [(task_labels.get(t) or "", task_predicted.get(t) or "" if o.ok else "") for t in tasks]
            rows.append([o.slide_id, o.extra.get("label") or "", o.extra.get("predicted") or "" if o.ok else "",
                         *(value for pair in per_task for value in pair), *(probabilities or [""] * len(classes)),
                         *folds, *(risk or [""] * len(survival)),
                         o.extra.get("n_patches", 0) if o.ok else "", o.status.value, o.error])

        def write(partial: Path) -> None:
            with partial.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(rows)

        write_atomically(self.predictions_csv, write)

    def read_predictions(self) -> tuple[list[str], list[SlidePrediction]]:
        """:func:`read_predictions` of this folder's CSV."""
        return read_predictions(self.predictions_csv)

    def write_metrics(self, metrics: dict[str, Any] | None) -> None:
        """``metrics.json``; without metrics (no labelled slide) an older one is removed with its pictures."""
        if metrics is None:
            for path in (self.metrics_file, self.roc_file, self.reliability_file, *self._task_pictures()):
                path.unlink(missing_ok=True)
            return
        _write_json(self.metrics_file, metrics)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not readable JSON ({exc}); run `ipspath predict` again") from None
    if not isinstance(values, dict):
        raise BadInputError(f"{path}: not a JSON object; run `ipspath predict` again")
    return values


def _write_json(path: Path, values: dict[str, Any]) -> None:
    text = json.dumps(values, indent=2) + "\n"
    write_atomically(path, lambda partial: partial.write_text(text))
