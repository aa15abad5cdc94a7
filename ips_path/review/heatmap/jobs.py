"""Heatmaps of many slides: which stores and score arrays (tile stores or a prediction folder), rendered as jobs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.review.heatmap.render import check_heatmap_options, check_scores, render_slide_heatmaps
from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.jobs import SlideOutcome, Status, run_job
from ips_path.runtime.locks import probe_writable
from ips_path.runtime.progress import progress_bar
from ips_path.stores.tile_store import TileStore, slide_id_from_path

__all__ = ["TASK_SCORES_GROUP", "HeatmapJob", "jobs_from_predictions", "jobs_from_tiles", "load_scores",
           "load_task_scores", "render_heatmaps"]

#: Store group of the per-task attention logits of multi-task runs: ``task_scores/<run>``, (T, N) float32
#: with the task names in the attribute ``tasks``; ``scores/<run>`` holds their mean.
TASK_SCORES_GROUP = "task_scores"


@dataclass(frozen=True)
class HeatmapJob:
    """One slide to render: its tile store, the score run and the output folder; or, with ``error``, a
    slide that cannot be rendered (its store is damaged or lacks the run's scores), said in one line."""

    slide_id: str
    store: Path
    run: str
    out_dir: Path
    error: str = ""


def _find_stores(tiles: Path) -> list[Path]:
    if not tiles.exists():
        raise BadInputError(f"{tiles}: no such tile store or folder; give the --out folder of `ipspath tile`")
    if tiles.suffix == ".zarr" or (tiles / "zarr.json").exists():
        return [tiles]
    stores = sorted(p for p in tiles.glob("*.zarr") if p.is_dir())
    if not stores:
        raise BadInputError(f"{tiles}: no tile stores (*.zarr) in this folder; run `ipspath tile` first")
    return stores


def load_scores(store: TileStore, run: str) -> np.ndarray:
    """The attention logits ``scores/<run>`` of a store, checked.

    Raises
    ------
    BadInputError
        When the store has no such scores (naming the runs it has and ``ipspath predict``),
        or they do not match its patches.
    """
    name = f"scores/{run}"
    if not store.has_array(name):
        runs = ", ".join(store.array_names("scores")) or "none"
        raise BadInputError(f"{store.path}: no attention scores {name!r} (score runs in the store: {runs}); "
                            f"score the slide first with `ipspath predict`, or pick a run with --run")
    return check_scores(store, store.read_array(name))


def load_task_scores(store: TileStore, run: str) -> tuple[list[str], np.ndarray] | None:
    """The task names and ``(T, N)`` attention logits of each task of a multi-task run, checked.

    None when the run has one task (or was predicted before per-task scores were kept).

    Raises
    ------
    BadInputError
        They do not match the store's patches or the task names.
    """
    name = f"{TASK_SCORES_GROUP}/{run}"
    if not store.has_array(name):
        return None
    tasks = [str(t) for t in store.array_attrs(name).get("tasks", [])]
    scores = np.asarray(store.read_array(name), dtype=np.float32)
    if scores.ndim != 2 or len(tasks) != scores.shape[0]:
        raise BadInputError(f"{store.path}: {name} has shape {scores.shape} for tasks {tasks}; run `ipspath predict` "
                            "again")
    return tasks, np.stack([check_scores(store, row) for row in scores])


def jobs_from_tiles(tiles: str | os.PathLike, run: str | None, out_dir: str | os.PathLike,
                    slide_ids: Sequence[str] = ()) -> list[HeatmapJob]:
    """The slides to render from tile stores: ``out_dir/<slide_id>/`` for each.

    Parameters
    ----------
    tiles : path-like
        One ``.zarr`` tile store or a folder of them.
    run : str, optional
        Score run (``scores/<run>`` in the stores); default: the only run the stores have.
    out_dir : path-like
        Parent of the per-slide folders.
    slide_ids : sequence of str
        Only these slides (default: every store).

    Returns
    -------
    list of HeatmapJob
        One per slide; a slide whose store does not open or lacks the run's scores is a job with
        ``error`` (one line), so that it never blocks the others.

    Raises
    ------
    BadInputError
        Unknown slide ids, no common run, or no slide that can be rendered; all checked before
        anything is rendered.
    """
    stores: dict[str, TileStore] = {}
    broken: dict[str, tuple[Path, str]] = {}
    for path in _find_stores(Path(tiles)):
        try:
            store = TileStore.open(path)
        except BadInputError as exc:
            broken[slide_id_from_path(path)] = (path, str(exc))
            continue
        stores[str(store.attrs.get("slide_id") or slide_id_from_path(path))] = store
    if slide_ids:
        unknown = [s for s in slide_ids if s not in stores and s not in broken]
        if unknown:
            raise BadInputError(f"{tiles}: no tile store for slide(s) {listing(unknown)} "
                                f"({len(stores) + len(broken)} stores there, e.g. {next(iter(stores or broken))})")
        wanted = dict.fromkeys(slide_ids)
        stores = {s: stores[s] for s in wanted if s in stores}
        broken = {s: broken[s] for s in wanted if s in broken}
    run = _resolve_run(tiles, stores, run)
    unsafe = [s for s in stores if Path(s).name != s or s in (".", "..")]
    if unsafe:
        raise BadInputError(f"{tiles}: slide id {unsafe[0]!r} is not a safe file name; tile the slide again under "
                            "an id without '/'")
    for slide_id, store in list(stores.items()):
        if not store.has_array(f"scores/{run}"):
            runs = ", ".join(store.array_names("scores")) or "none"
            broken[slide_id] = (store.path, f"{store.path}: no attention scores 'scores/{run}' (score runs in the "
                                             f"store: {runs}); score the slide with `ipspath predict` (again)")
            del stores[slide_id]
    if not stores:
        first = next(iter(broken.values()))[1] if broken else f"{tiles}: no slide to draw"
        more = f" (and {len(broken) - 1} more store(s))" if len(broken) > 1 else ""
        raise BadInputError(first + more)
    jobs = {slide_id: HeatmapJob(slide_id, store.path, run, Path(out_dir) / slide_id)
            for slide_id, store in stores.items()}
    jobs.update({slide_id: HeatmapJob(slide_id, path, run, Path(out_dir) / slide_id, error)
                 for slide_id, (path, error) in broken.items()})
    order = list(dict.fromkeys(slide_ids)) if slide_ids else sorted(jobs)
    return [jobs[s] for s in order]


def _resolve_run(tiles: str | os.PathLike, stores: dict[str, TileStore], run: str | None) -> str:
    """The score array name: ``run`` itself, or the one ``<run>-<model key>`` that predict wrote for
    a run folder named ``run``; without ``run``, the only score array the stores hold.

    Raises
    ------
    BadInputError
        No such array, or several (models of one run name): names them and asks for one.
    """
    runs = sorted({name for store in stores.values() for name in store.array_names("scores")})
    if run is not None:
        if run in runs:
            return run
        matching = [name for name in runs if re.fullmatch(rf"{re.escape(run)}-[0-9a-f]{{16}}", name)]
        if len(matching) == 1:
            return matching[0]
        if len(matching) > 1:
            raise BadInputError(f"{tiles}: scores of {len(matching)} models of run {run!r}: "
                                f"{', '.join(matching)}; give one of them with --run, or use --predictions PRED")
        return run  # missing: refused below, naming the store and the runs it has
    if len(runs) != 1:
        raise BadInputError(f"{tiles}: give --run: the stores hold score runs: {', '.join(runs) or 'none'}"
                            + ("" if runs else "; score the slides first with `ipspath predict`"))
    return runs[0]


def jobs_from_predictions(pred_dir: str | os.PathLike, slide_ids: Sequence[str] = (),
                          out_dir: str | os.PathLike | None = None) -> list[HeatmapJob]:
    """The slides to render for an ``ipspath predict`` output folder.

    Reads ``run.json`` (keys "run" and "tiles") and takes the slides whose status is "done" in
    ``predictions.csv`` (every store in the tiles folder when there is no CSV), or ``slide_ids``.
    Output goes to ``out_dir/<slide_id>/``, by default ``PRED_DIR/heatmaps/<slide_id>/``.

    Raises
    ------
    BadInputError
        No or unreadable run.json, a tiles folder that is gone, and as :func:`jobs_from_tiles`.
    """
    from ips_path.inference.predictions import PredictionFolder

    folder = PredictionFolder(pred_dir)
    if not folder.run_file.exists():
        raise BadInputError(f"{pred_dir}: not an `ipspath predict` output folder (no run.json)")
    info = folder.read_run()
    missing_keys = [k for k in ("run", "tiles") if not info.get(k)]
    if missing_keys:
        raise BadInputError(f"{folder.run_file}: no {' or '.join(missing_keys)} recorded; use "
                            "`ipspath heatmap --tiles TILES --run RUN -o OUT` instead")
    tiles = Path(info["tiles"])
    if not tiles.is_absolute() and (folder.root / tiles).exists():
        tiles = folder.root / tiles
    if not slide_ids and folder.predictions_csv.exists():
        slide_ids = [row.slide_id for row in folder.read_predictions()[1] if row.ok]
        if not slide_ids:
            raise BadInputError(f"{folder.predictions_csv}: no slide was predicted (status done or reused)")
    return jobs_from_tiles(tiles, str(info["run"]), folder.root / "heatmaps" if out_dir is None else out_dir,
                           slide_ids)


def render_heatmaps(jobs: Sequence[HeatmapJob], *, progress: bool = True, **options: Any) -> list[SlideOutcome]:
    """Render each job with :func:`render_slide_heatmaps`; a failing slide does not stop the others.

    Parameters
    ----------
    jobs : sequence of HeatmapJob
    progress : bool
        Show a progress bar over the slides.
    **options
        Passed to :func:`render_slide_heatmaps` (thumbnail_size, smooth_sigma_um, colormap,
        alpha, top_k, geojson, tiff_mpp, threads); checked before any slide.

    Returns
    -------
    list of SlideOutcome, in job order
        Status done or failed (one line in ``error``); ``extra``: ``out_dir`` and ``files``
        (kind -> path) written.

    Raises
    ------
    BadInputError
        A bad option, or an output folder that cannot be written.
    """
    check_heatmap_options(options)
    for folder in sorted({job.out_dir.parent for job in jobs}):  # a read-only folder is found before any slide
        probe_writable(folder)
    outcomes = []
    with progress_bar(len(jobs), "heatmaps", unit="slide", enabled=progress) as bar:
        for job in jobs:
            def work(job: HeatmapJob = job) -> SlideOutcome:
                if job.error:
                    raise BadInputError(job.error)
                store = TileStore.open(job.store)
                files = render_slide_heatmaps(store, load_scores(store, job.run), job.out_dir, **options)
                return SlideOutcome(job.slide_id, Status.DONE, extra={
                    "out_dir": str(job.out_dir), "files": {kind: str(path) for kind, path in files.items()}})

            outcomes.append(run_job(job.slide_id, job.store, work, extra={"out_dir": str(job.out_dir)}))
            bar.update()
    return outcomes
