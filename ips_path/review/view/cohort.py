"""The slides a viewer may show: what a prediction folder records, nothing else.

:func:`open_cohort` reads an ``ipspath predict`` output folder once, at start: the predicted
slides (status done or reused in ``predictions.csv``), their tile stores and score run (``run.json``).
Everything the server later serves is looked up by slide id in this record, so a URL can never
name a file of its own: slide files are the ones the tile stores were made from, and the other
files are the report page and the pictures it references inside the folder.

Per slide, the heavier state (the open slide, scores, their percentile ranks on the patch grid,
per task too for a multi-task run, the tissue contour) is built on first use and kept (:meth:`Cohort.slide`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ips_path.inference.predictions import PREDICTIONS_NAME, PredictionFolder, SlidePrediction
from ips_path.review.heatmap import (
    ScoreGrid,
    jobs_from_predictions,
    load_scores,
    load_task_scores,
    open_store_slide,
    percentile_ranks,
    scale_values,
    score_grid,
)
from ips_path.runtime.errors import BadInputError
from ips_path.slides.slide import Slide
from ips_path.stores.tile_store import TileStore

__all__ = ["Cohort", "SlideView", "folder_state", "open_cohort"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# Contour vertices closer than this many mask pixels to the simplified line are dropped.
_CONTOUR_TOLERANCE_PX = 1.0
# Digits kept of each attention logit sent to the browser: enough to tell ranks apart.
_SCORE_DIGITS = 6


@dataclass
class SlideView:
    """One predicted slide, opened for viewing (see :meth:`Cohort.slide`).

    Attributes
    ----------
    slide_id : str
    prediction : SlidePrediction
        Its row of ``predictions.csv``.
    store : TileStore
        Patch coordinates and geometry.
    slide : Slide
        The slide file the store was made from, open for the whole session.
    scores : (N,) float32 array
        Attention logit of each patch.
    grid : ScoreGrid
        The percentile rank (0-1) of each patch's logit on the patch grid.
    tasks : list of str
        A multi-task run's task names (empty with one task: ``scores`` is its attention).
    task_scores : (T, N) float32 array or None
        Each task's attention logit of each patch (the mean over tasks is ``scores``).
    task_grids : list of ScoreGrid
        Their percentile ranks on the patch grid, one per task.
    weight_grid : ScoreGrid
        The attention weights on the scale shared by all slides (:func:`~ips_path.review.heatmap.scale_values`).
    task_weight_grids : list of ScoreGrid
        The same for each task.
    version : str
        Short digest of the slide file's identity and the scores: part of every tile URL, so a
        browser never shows tiles cached from another slide or run under the same id.
    """

    slide_id: str
    prediction: SlidePrediction
    store: TileStore
    slide: Slide
    scores: np.ndarray
    grid: ScoreGrid
    version: str
    tasks: list[str] = field(default_factory=list)
    task_scores: np.ndarray | None = None
    task_grids: list[ScoreGrid] = field(default_factory=list)
    weight_grid: ScoreGrid | None = None
    task_weight_grids: list[ScoreGrid] = field(default_factory=list)
    _contours: list[list[float]] | None = field(default=None, repr=False)

    def contours(self) -> list[list[float]]:
        """Tissue outlines from the store's mask, as flat [x0, y0, x1, y1, ...] level-0 px lists."""
        if self._contours is None:
            from skimage.measure import approximate_polygon, find_contours

            mask, _ = self.store.mask()
            scale = self.store.mask_downsample()
            padded = np.pad(mask, 1)  # closes outlines of tissue touching the border
            lines = []
            for contour in find_contours(padded.astype(np.float32), 0.5):
                simple = approximate_polygon(contour, _CONTOUR_TOLERANCE_PX)
                # (row, col) of padded mask pixel centres -> level-0 (x, y)
                xy = (simple[:, ::-1] - 1 + 0.5) * scale
                lines.append([round(float(v), 1) for v in xy.reshape(-1)])
            self._contours = lines
        return self._contours


class Cohort:
    """The predicted slides of a prediction folder, in slide-id order (natural: S-2 before S-10).

    Parameters
    ----------
    pred_dir : Path
    classes : list of str
        The model's class names, in probability order.
    rows : dict
        Slide id -> its :class:`SlidePrediction` (done or reused only).
    stores : dict
        Slide id -> its tile store folder.
    run : str
        The score run (``scores/<run>`` in the stores).
    """

    def __init__(self, pred_dir: Path, classes: list[str], rows: dict[str, SlidePrediction],
                 stores: dict[str, Path], run: str):
        self.pred_dir = pred_dir
        self.classes = classes
        self.run = run
        self.ids = sorted(rows, key=_natural_key)
        self._rows = rows
        self._stores = stores
        self._views: dict[str, SlideView] = {}
        self._locks = {slide_id: threading.Lock() for slide_id in self.ids}

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._rows

    def neighbours(self, slide_id: str) -> tuple[str | None, str | None]:
        """The previous and next slide ids (None at either end)."""
        index = self.ids.index(slide_id)
        return (self.ids[index - 1] if index > 0 else None,
                self.ids[index + 1] if index + 1 < len(self.ids) else None)

    def slide(self, slide_id: str) -> SlideView:
        """The slide's view state, built on first use (thread-safe); KeyError for an unknown id.

        Raises
        ------
        BadInputError
            Its slide file is missing or changed, or its scores do not match its patches.
        """
        if slide_id not in self._rows:
            raise KeyError(slide_id)
        view = self._views.get(slide_id)
        if view is not None:
            return view
        with self._locks[slide_id]:
            if slide_id not in self._views:
                self._views[slide_id] = self._open(slide_id)
            return self._views[slide_id]

    def _open(self, slide_id: str) -> SlideView:
        store = TileStore.open(self._stores[slide_id])
        scores = load_scores(store, self.run)
        tasks, task_scores = load_task_scores(store, self.run) or ([], None)

        def grid_of(values: np.ndarray, scale: str = "rank") -> ScoreGrid:
            colour = percentile_ranks(values) if scale == "rank" else scale_values(values, scale)
            return score_grid(store.coords, colour, store.stride_level0, store.patch_size_level0)

        slide = open_store_slide(store)
        stat = slide.path.stat()
        digest = hashlib.sha256(f"{slide.path}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        digest.update(np.ascontiguousarray(scores).tobytes())
        if task_scores is not None:
            digest.update(np.ascontiguousarray(task_scores).tobytes())
        rows = list(task_scores) if task_scores is not None else []
        return SlideView(slide_id, self._rows[slide_id], store, slide, scores, grid_of(scores), digest.hexdigest()[:12],
                         tasks, task_scores, [grid_of(row) for row in rows], grid_of(scores, "weight"),
                         [grid_of(row, "weight") for row in rows])

    def report_files(self) -> dict[str, Path]:
        """The report page and the files it references inside the folder, by URL path.

        Read again on every call: the report may be rewritten while the viewer runs. Every file,
        the page itself included, passes one check: it is a file inside the folder once links are
        followed, so a link to a file elsewhere is never served.
        """
        report = _file_inside(self.pred_dir, REPORT_NAME)
        if report is None:
            return {}
        files = {REPORT_NAME: report}
        for ref in _references(report.read_text(encoding="utf-8", errors="replace")):
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
                continue
            target = _file_inside(self.pred_dir, unquote(parts.path))
            if target is not None:
                files[parts.path] = target
        return files

    def close(self) -> None:
        """Close every slide opened so far."""
        for view in self._views.values():
            view.slide.close()
        self._views.clear()


def open_cohort(pred_dir: str | Path) -> Cohort:
    """Read an ``ipspath predict`` output folder for viewing; every problem is found here.

    Raises
    ------
    BadInputError
        Not a prediction folder, or no predicted slide that can be shown. A slide whose tile store
        or scores are gone is left out with a warning naming the file and the fix.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise BadInputError(f"{pred_dir}: not a folder; give the output folder of `ipspath predict`")
    folder = PredictionFolder(pred_dir)
    classes, all_rows = folder.read_predictions()
    rows = {row.slide_id: row for row in all_rows if row.ok}
    if not rows:
        raise BadInputError(f"{folder.predictions_csv}: no slide was predicted (done or reused); nothing to view")
    jobs = jobs_from_predictions(pred_dir, list(rows))
    for job in jobs:
        if job.error:  # one slide that cannot be shown never keeps the others from review
            log.warning("skipping slide %s: %s", job.slide_id, job.error)
    shown = {job.slide_id: job.store for job in jobs if not job.error}
    return Cohort(pred_dir, classes, {s: rows[s] for s in shown}, shown, jobs[0].run)


def folder_state(pred_dir: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when ``ipspath predict`` rewrites a prediction folder: (inode, size, mtime in ns) of
    its ``run.json`` and ``predictions.csv``, None for one that is absent. Two ``stat`` calls."""
    state = []
    for name in ("run.json", PREDICTIONS_NAME):
        try:
            stat = (pred_dir / name).stat()
        except OSError:
            state.append(None)
            continue
        state.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def _file_inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` with links followed, when it is a file inside ``root`` (also followed); else None."""
    target = (root / relative).resolve()
    return target if target.is_relative_to(root.resolve()) and target.is_file() else None


class _RefParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for key, value in attrs if key in ("src", "href") and value]


def _references(html_text: str) -> list[str]:
    parser = _RefParser()
    parser.feed(html_text)
    return parser.refs


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders digit runs by value: S-2 before S-10."""
    return [(0, int(part), "") if part.isdigit() else (1, math.inf, part.lower())
            for part in re.split(r"(\d+)", text) if part]
