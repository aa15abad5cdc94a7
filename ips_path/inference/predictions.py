"""The prediction folder: the one owner of what ``ipspath predict`` writes and others read.

``predict`` writes through :class:`PredictionFolder`; ``report``, ``heatmap --predictions`` and
the viewer read through it. Layout (:data:`PREDICTION_FILES`)::

    run.json                     the model (path and identity), classes, tiles folder, score array name
    status/<slide_id>.json       per-slide done record (jobs.SlideOutcome): status, identity, probabilities
    predictions.csv              one row per slide of the last run
    metrics files and pictures   what the model's outcome kind writes where the truth is known
                                 (:meth:`ips_path.tasks.OutcomeKind.write_metrics`; classes:
                                 metrics.json, roc.png, reliability.png)
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
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips_path.runtime.atomic import read_json, write_atomically, write_json
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.jobs import SlideOutcome, Status, read_outcome, write_done_record
from ips_path.tasks import KINDS

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

#: What ``ipspath predict`` writes into its output folder (each outcome kind adds its metrics files).
PREDICTION_FILES = {
    "predictions.csv": "slide_id, label, predicted, the outcome kind's columns, n_patches, status, error; "
                       + "; ".join(f"{name}: {kind.columns_doc}" for name, kind in KINDS.items()),
    "run.json": "model path and identity, score array name, classes and what the outcome kind records, tiles "
                "folder, target_mpp, patch_size",
    "status/<slide_id>.json": "per-slide done record: status, identity of slide, store and model, probabilities",
    "scores/<slide_id>_scores.h5": "coords (N, 2) level-0 x, y and attention_scores (N,); multi-task models also "
                                   "task_attention_scores (T, N) with attrs tasks",
    "heatmaps/<slide_id>/": "thumbnail.png, overlay.png, patches.geojson, top_patches.png",
    "tiles/": "tile stores made here for slides that had none",
    "report.html, report_assets/": "written by `ipspath report`; removed with the other results when predict "
                                   "--overwrite replaces the model",
    **{name: what for kind in KINDS.values() for name, what in kind.prediction_files.items()},
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
        """``"correct"``, ``"wrong"``, ``"unlabelled"`` (no true label), or ``"valued"``: a true value
        that is no class (a number), which the prediction is not right or wrong about."""
        if not self.label:
            return "unlabelled"
        if not self.probabilities:
            return "valued"
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
    def own_tiles(self) -> Path:
        """Where predict tiles slides that have no store elsewhere."""
        return self.root / "tiles"

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
        return read_json(self.run_file)

    def write_run(self, info: dict[str, Any]) -> None:
        write_json(self.run_file, info)

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
        self.predictions_csv.unlink(missing_ok=True)
        self.clear_metrics()

    def clear_metrics(self) -> None:
        """Remove every metrics file and picture an outcome kind writes (before they are written anew)."""
        for kind in KINDS.values():
            for path in kind.output_files(self.root):
                path.unlink(missing_ok=True)

    # -- whole run ---------------------------------------------------------------------------------

    def write_predictions_csv(self, outcomes: Sequence[SlideOutcome], columns: Sequence[str],
                              cells: Callable[[SlideOutcome], Sequence[Any]]) -> None:
        """``predictions.csv``: one row per outcome: ``slide_id``, ``label``, ``predicted``, then ``columns``
        (the outcome kind's, :meth:`~ips_path.tasks.OutcomeKind.prediction_columns`) with an outcome's
        ``cells``, then ``n_patches``, ``status``, ``error``.

        Raises
        ------
        ValueError
            An outcome's cells do not fit the columns (never written half-matching).
        """
        header = ["slide_id", "label", "predicted", *columns, "n_patches", "status", "error"]
        rows = []
        for o in outcomes:
            try:
                middle = list(cells(o))
            except ValueError as exc:
                raise ValueError(f"{o.slide_id}: {exc}") from None
            if len(middle) != len(columns):
                raise ValueError(f"{o.slide_id}: {len(middle)} values for the {len(columns)} columns of its model")
            rows.append([o.slide_id, o.extra.get("label") or "", _cell(o.extra.get("predicted")) if o.ok else "",
                         *middle, o.extra.get("n_patches", 0) if o.ok else "", o.status.value, o.error])

        def write(partial: Path) -> None:
            with partial.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)

        write_atomically(self.predictions_csv, write)

    def read_predictions(self) -> tuple[list[str], list[SlidePrediction]]:
        """:func:`read_predictions` of this folder's CSV."""
        return read_predictions(self.predictions_csv)


def _cell(value: Any) -> Any:
    """A predicted class name, or number, as ``predictions.csv`` writes it (empty for none)."""
    return "" if value is None or value == "" else value
