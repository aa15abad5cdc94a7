"""Batch slide inference (``ipspath predict``): predictions for a cohort, attention for review.

Everything is checked before any slide is touched: the options, the device, the checkpoint (read
and its model built: a head that does not match its class names is refused), the slide ids, and the
output folder, which holds the results of one model only (:mod:`ips_path.inference.predictions` owns its
layout) and is locked against a second run (:func:`~ips_path.runtime.locks.output_lock`).

Then, for every slide, one self-contained job (:func:`predict_slide`, which a Dask worker can run
as well as this process) on the contract of :mod:`ips_path.runtime.jobs`:

1. find its tile store in the tiles folder, or tile the slide there with the model's own
   resolution and patch size; a store made at another resolution is re-tiled when the folder is
   the run's own (``<out>/tiles``) and refused when the user gave it;
2. if the slide's done record holds this prediction's identity (slide file, store, model), reuse
   it; another identity is refused with one line (``--overwrite`` redoes it);
3. stream its patches through the model (:meth:`IPSModel.predict_slide`): class probabilities
   and the attention logit of every patch;
4. write the logits into the store (``scores/<run>-<model key>``: two models never share an
   array, whatever their folders are called; a multi-task model also each task's logits,
   ``task_scores/<run>-<model key>``), into ``scores/<slide_id>_scores.h5`` and, unless
   turned off, the heatmaps (``heatmaps/<slide_id>/``);
5. write the done record ``status/<slide_id>.json`` last, so a killed run resumes where it
   stopped and predicts every slide exactly once.

Then ``predictions.csv`` is written from the outcomes of this run's slides: ``slide_id``, ``label``,
``predicted``, the model's outcome kind's columns (:meth:`~ips_path.tasks.OutcomeKind.prediction_columns`:
class probabilities, a risk, each fold's prediction of an ensemble), ``n_patches``, ``status``,
``error``; and where the manifest gives the truth, the kind's metrics files and pictures
(:meth:`~ips_path.tasks.OutcomeKind.write_metrics`: ``metrics.json`` with ``roc.png`` and
``reliability.png`` for classes, with bootstrap 95 % intervals, also over patients by ``case_id``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ips_path import __version__
from ips_path.inference.predictions import PREDICTION_FILES, PredictionFolder
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, IpspathError, RefusedError
from ips_path.runtime.faults import fault_point
from ips_path.runtime.identity import (
    check_verify,
    file_digest,
    identity_differences,
    identity_key,
    lacks_full_hash,
    slide_identity,
)
from ips_path.runtime.jobs import SlideOutcome, Status, check_done_record, run_exit_code, run_job
from ips_path.runtime.parallel import map_slides, process_object
from ips_path.stores.model_features import check_features_makeable, ensure_features
from ips_path.stores.tile_store import StoreMismatchError, TileStore, store_path
from ips_path.tasks import OutcomeKind, SlideScores, kind_of_checkpoint
from ips_path.training.trained_runs import finished_folds, is_cross_validation, require_trained

__all__ = ["PREDICTION_FILES", "PredictJob", "PredictResult", "PredictSettings", "predict", "predict_slide",
           "resolve_checkpoint", "resolve_checkpoints", "run_name"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PredictJob:
    """One slide to predict."""

    slide_id: str
    slide_path: Path
    mpp: float | None = None
    truth: dict[str, Any] = field(default_factory=lambda: {"label": None})  # the outcome kind's truth()

    @property
    def extra(self) -> dict[str, Any]:
        """What the slide's outcome records of its truth, whatever becomes of it."""
        return dict(self.truth)


@dataclass(frozen=True)
class PredictSettings:
    """What every slide of a run shares (sent to each worker).

    ``checkpoints`` are the model's checkpoint files with their SHA-256 (one, or one per fold of a
    cross-validated run, whose probabilities and attention logits are averaged); ``model_identity``
    is what they are (:func:`~ips_path.training.checkpoint.models_identity`); ``model_key`` names it, and
    ``scores_name`` is the array ``scores/<scores_name>`` it writes.
    """

    model_path: Path
    checkpoints: tuple[tuple[Path, str], ...]
    model_identity: dict[str, Any]
    model_key: str
    scores_name: str
    out_dir: Path
    tiles_dir: Path
    own_tiles: bool
    device: str = "cpu"
    threads: int | None = None  # None: the CPU cores of the process that reads
    chunk_size: int | None = None
    backend: str = "auto"
    heatmaps: bool = True
    heatmap_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    verify: str = "fast"  # how slide files are recognised (ips_path.runtime.identity.VERIFY_MODES)


@dataclass
class PredictResult:
    """The outcomes of all slides (input order), the metrics (None without labels), the output folder.

    An outcome's ``extra`` holds ``label``, and for predicted slides ``predicted``,
    ``probabilities`` (one per class, in the model's order) and ``n_patches``, and what the model's
    outcome kind adds (:meth:`~ips_path.tasks.OutcomeKind.slide_result`). The metrics are those the
    kind wrote (:meth:`~ips_path.tasks.OutcomeKind.write_metrics`; None without known outcomes).
    """

    outcomes: list[SlideOutcome]
    metrics: dict[str, Any] | None
    out_dir: Path
    kind: OutcomeKind | None = None  # the model's outcome kind

    @property
    def exit_code(self) -> int:
        """0 all slides predicted; 2 every slide failed on bad input; 1 otherwise."""
        return run_exit_code(self.outcomes)


def resolve_checkpoint(model: str | os.PathLike) -> Path:
    """The checkpoint file of ``model``: the file itself, or ``best.pt`` (else ``last.pt``) of a run folder."""
    path = Path(model)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise BadInputError(f"{path}: no best.pt or last.pt in this folder; give a training run folder or a .pt file")
    if not path.is_file():
        raise BadInputError(f"{path}: model not found; give a training run folder or a checkpoint .pt file")
    return path


def resolve_checkpoints(model: str | os.PathLike) -> list[Path]:
    """The checkpoint files of ``model``: one per fold (``fold_<i>/best.pt``) of a cross-validated run
    folder (``ipspath train --folds K``), else the one of :func:`resolve_checkpoint`.

    Raises
    ------
    BadInputError
        The run has not finished an epoch, or a cross-validated run has not finished all its folds.
    """
    path = Path(model)
    if path.is_dir() and is_cross_validation(path):
        return [resolve_checkpoint(fold) for fold in finished_folds(path)]
    checkpoint = resolve_checkpoint(path)
    require_trained(checkpoint)
    return [checkpoint]


def run_name(checkpoint: Path) -> str:
    """Readable name of a model: the run folder's name for best.pt/last.pt, else the file stem."""
    return checkpoint.parent.name if checkpoint.name in ("best.pt", "last.pt") else checkpoint.stem


def predict(model: str | os.PathLike, out_dir: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (),
            manifest: str | os.PathLike | None = None, tiles_dir: str | os.PathLike | None = None,
            device: str = "cpu", threads: int | None = None, chunk_size: int | None = None, backend: str = "auto",
            heatmaps: bool = True, heatmap_options: dict[str, Any] | None = None, scheduler: str | None = None,
            overwrite: bool = False, progress: bool = True, verify: str = "fast") -> PredictResult:
    """Predict every slide of ``inputs`` and/or ``manifest`` with a trained model.

    Parameters
    ----------
    model : path-like
        A training run folder (its ``best.pt``) or a checkpoint file.
    out_dir : path-like
        Output folder (see :data:`~ips_path.inference.predictions.PREDICTION_FILES`); running again with
        the same model resumes.
    inputs : sequence of path-like
        Slide files, folders (searched recursively) or glob patterns.
    manifest : path-like, optional
        CSV with ``slide_id``, ``slide_path`` and optional ``label``, ``mpp``.
    tiles_dir : path-like, optional
        Existing tile stores (``ipspath tile``); slides without one are tiled into it. Default:
        ``<out_dir>/tiles``.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
    threads, chunk_size : int, optional
        Reader threads (>= 1; default: the CPU cores of each process that reads); patches per chunk
        (default: the model's chunk size).
    backend : str
        Slide backend.
    heatmaps : bool
        Also render heatmaps (``heatmap_options`` as for
        :func:`~ips_path.review.heatmap.render_slide_heatmaps`).
    scheduler : str, optional
        Dask scheduler address or ``local:N`` (see :mod:`ips_path.runtime.parallel`); slides, tiles and
        ``out_dir`` must be on storage all workers see. GPU workers need the resource ``GPU=1``.
    overwrite : bool
        Replace results in ``out_dir`` made by another model or from other slide files (without
        it they are refused), and predict every slide again.
    progress : bool
        Progress bar over slides.
    verify : {"fast", "full"}
        How a slide file is recognised as the one its tile store and earlier predictions were made
        from: ``fast`` (size and content fingerprint) or ``full`` (also the SHA-256 of the whole file;
        stores and predictions made without it are made again, or refused for tile stores not made here).

    Raises
    ------
    BadInputError
        A bad option, device, checkpoint, input or output folder, before any slide is touched;
        :class:`~ips_path.runtime.errors.RefusedError` when ``out_dir`` holds another model's results.
    """
    from ips_path.runtime.locks import output_lock, probe_writable
    from ips_path.tiling.run import collect_inputs
    from ips_path.training.distributed import resolve_device

    _check_options(threads, chunk_size, heatmap_options if heatmaps else None)
    check_verify(verify)
    if scheduler is None or device == "auto":  # Dask workers check the device they are given themselves
        device = str(resolve_device(device))
    checkpoint_paths = [p.resolve() for p in resolve_checkpoints(model)]
    checkpoint_path = checkpoint_paths[0] if len(checkpoint_paths) == 1 else Path(model).resolve()
    identity, checkpoint, checkpoints = _model_identity(checkpoint_paths, device if scheduler is None else "cpu")
    kind = kind_of_checkpoint(checkpoint, source=str(checkpoint_path))
    key = identity_key(identity)
    out_dir = Path(out_dir).resolve()
    folder = PredictionFolder(out_dir)
    own_tiles = tiles_dir is None
    tiles = (folder.own_tiles if own_tiles else Path(tiles_dir)).resolve()
    rows = kind.read_manifest(manifest, training=False) if manifest is not None else []
    truth = {r.slide_id: kind.truth(r) for r in rows}
    jobs = [PredictJob(i.slide_id, i.path.resolve(), i.mpp, truth.get(i.slide_id, {"label": None}))
            for i in collect_inputs(inputs, manifest)]
    for job in jobs:
        folder.status_file(job.slide_id)  # an unsafe id is refused before any work
    check_features_makeable(checkpoint, [store_path(tiles, j.slide_id) for j in jobs], tiles,
                            " ".join([*map(str, inputs), *(["--manifest", str(manifest)] if manifest else [])]))
    settings = PredictSettings(checkpoint_path, checkpoints, identity, key, f"{run_name(checkpoint_path)}-{key}",
                               out_dir, tiles, own_tiles, device, threads, chunk_size, backend, heatmaps,
                               dict(heatmap_options or {}), overwrite, verify)
    if not own_tiles:  # the scores go into the stores: a read-only tiles folder is found before any slide
        probe_writable(tiles, "--tiles")
    with output_lock(out_dir):
        _claim_folder(folder, settings, overwrite)
        folder.make_folders()
        tiles.mkdir(parents=True, exist_ok=True)
        folder.write_run({
            "model": str(checkpoint_path), "model_key": key, "model_identity": identity, "run": settings.scores_name,
            "task": kind.name, "classes": kind.class_names, **kind.run_info(), "tiles": str(tiles),
            "target_mpp": checkpoint["tiling"]["target_mpp"],
            "patch_size": checkpoint["tiling"]["patch_size"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ipspath_version": __version__})
        gpu = {"GPU": 1} if scheduler and device.startswith("cuda") else None
        outcomes = map_slides(predict_slide, jobs, settings, scheduler=scheduler, resources=gpu,
                              shared_paths=[out_dir, tiles, *(j.slide_path for j in jobs if j.slide_path.exists())],
                              progress=progress, desc="predict", on_lost=_lost)
        n_folds = len(checkpoints) if len(checkpoints) > 1 else 0
        folder.write_predictions_csv(outcomes, kind.prediction_columns(n_folds),
                                     lambda o: kind.prediction_cells(o.extra, o.ok, n_folds))
        folder.clear_metrics()  # an earlier run's, which its slides may no longer give
        metrics = kind.write_metrics(out_dir, [(o.slide_id, o.extra) for o in outcomes if o.ok], rows)
    return PredictResult(outcomes, metrics, out_dir, kind)


def _check_options(threads: int | None, chunk_size: int | None, heatmap_options: dict[str, Any] | None) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BadInputError(f"--threads {threads!r}: must be at least 1 reader thread")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise BadInputError(f"--chunk-size {chunk_size!r}: must be at least 1 patch")
    if heatmap_options:
        from ips_path.review.heatmap import check_heatmap_options

        check_heatmap_options(heatmap_options)


def _model_identity(paths: Sequence[Path], device: str
                    ) -> tuple[dict[str, Any], dict[str, Any], tuple[tuple[Path, str], ...]]:
    """The identity of the model (one checkpoint or the folds of a cross-validation), the first
    checkpoint, and each checkpoint file with its digest.

    Builds every model (kept for this process's slides), so a checkpoint whose weights do not fit
    its configuration or class names is refused here, before any slide.
    """
    from ips_path.training.checkpoint import checkpoint_identity, models_identity

    identity = models_identity(paths)
    checkpoints = tuple((p, checkpoint_identity(p).sha256) for p in paths)
    loaded = [_load_model(p, sha256, device)[1] for p, sha256 in checkpoints]
    kind = kind_of_checkpoint(loaded[0], source=str(paths[0]))
    if len(loaded) > 1 and not kind.ensembles:
        raise BadInputError(f"{paths[0].parent.parent}: an ensemble of {kind.name} models is not supported; give one "
                            "fold's run folder")
    return identity, loaded[0], checkpoints


def _claim_folder(folder: PredictionFolder, settings: PredictSettings, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear) a prediction folder that holds another model's results."""
    recorded = folder.read_run()
    if not recorded.get("model_key") or recorded["model_key"] == settings.model_key:
        return
    if not overwrite:
        differs = ", ".join(identity_differences(recorded.get("model_identity") or {}, settings.model_identity))
        raise RefusedError(f"{folder.root}: holds predictions of another model ({recorded.get('model')}; differs in "
                           f"{differs}); pass --overwrite to replace them, or choose another output folder")
    log.warning("%s: replacing the predictions of %s", folder.root, recorded.get("model"))
    folder.clear_results()


# -- one slide ----------------------------------------------------------------------------------

def predict_slide(job: PredictJob, settings: PredictSettings) -> SlideOutcome:
    """Predict one slide and write its outputs; never raises for a problem of the slide."""
    folder = PredictionFolder(settings.out_dir)
    outcome = run_job(job.slide_id, job.slide_path, lambda: _predict_slide(job, settings, folder), extra=job.extra)
    if outcome.status is Status.FAILED:
        with contextlib.suppress(OSError, IpspathError):  # the outcome still reaches the CSV
            folder.write_outcome(outcome)
    return outcome


def _predict_slide(job: PredictJob, settings: PredictSettings, folder: PredictionFolder) -> SlideOutcome:
    import torch

    started = time.perf_counter()
    status_file = folder.status_file(job.slide_id)
    if not job.slide_path.is_file():
        raise BadInputError(f"{job.slide_path}: no such file; check the path (or the manifest's slide_path)")
    models = [_load_model(path, sha256, settings.device) for path, sha256 in settings.checkpoints]
    checkpoint = models[0][1]
    store = _tile_store(job, settings, checkpoint["tiling"])
    features = checkpoint["config"].get("features")
    if features is not None:  # before the store's identity, which holds that of its features
        ensure_features(store, features, checkpoint, device=settings.device, threads=settings.threads,
                        chunk_size=settings.chunk_size or int(checkpoint["config"]["chunk_size"]))
    # The slide's size and content, not its mtime: a copy of the same file is the same slide.
    slide = {k: v for k, v in slide_identity(job.slide_path, settings.verify).items() if k != "mtime_ns"}
    identity = {"slide": slide, "store": _store_identity(store, features), "model": settings.model_key}
    recorded = folder.read_outcome(job.slide_id)  # made without --verify full: redone to be verified
    unverified = recorded is not None and lacks_full_hash(recorded.identity.get("slide"), slide)
    reused = check_done_record(status_file, identity, overwrite=settings.overwrite or unverified, what="predictions",
                               outputs=folder.slide_outputs(job.slide_id, store.path, settings.scores_name,
                                                            heatmaps=settings.heatmaps))
    if reused is not None:
        reused.extra.update(job.extra)  # the manifest may have gained labels since
        return reused
    if store.n_patches == 0:
        raise BadInputError(f"{job.slide_path}: no tissue patches to predict from (its tile store {store.path} "
                            "is empty); check the QC picture of `ipspath tile`")
    chunks = _slide_chunks(store, settings, checkpoint, job)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if settings.device.startswith("cuda")
                else contextlib.nullcontext())
    folds, fold_logits, fold_tasks = [], [], []
    for i, (model, _) in enumerate(models):  # the folds of an ensemble, each over the whole slide
        chunks = chunks if i == 0 else _slide_chunks(store, settings, checkpoint, job)
        with torch.inference_mode(), autocast:
            prediction = model.predict_slide(chunks)
        folds.append(SlideScores({t.name: prediction.logits[t.name].float().cpu() for t in model.tasks},
                                 {t.name: prediction.probabilities[t.name].float().cpu() for t in model.tasks}))
        fold_logits.append(prediction.selection.all_logits.float().cpu().numpy())
        fold_tasks.append(prediction.selection.task_logits)
    result = kind_of_checkpoint(checkpoint).slide_result(models[0][0].tasks, folds)
    logits = np.mean(fold_logits, axis=0).astype(np.float32)  # the ensemble's attention: the folds' mean
    tasks = None  # several tasks: each task token's attention too (the folds' mean), for the viewer's task chooser
    if fold_tasks[0] is not None:
        from ips_path.review.heatmap import TASK_SCORES_GROUP

        tasks = ([t.name for t in models[0][0].tasks], np.mean([t.numpy() for t in fold_tasks], axis=0)
                 .astype(np.float32))
        store.write_array(f"{TASK_SCORES_GROUP}/{settings.scores_name}", tasks[1],
                          attrs={"model": str(settings.model_path), "model_key": settings.model_key,
                                 "tasks": tasks[0]})
    store.write_array(f"scores/{settings.scores_name}", logits,
                      attrs={"model": str(settings.model_path), "model_key": settings.model_key})
    fault_point("predict.store_scores_written")
    _write_scores_h5(folder.scores_file(job.slide_id), store, logits, tasks, settings)
    fault_point("predict.scores_h5_written")
    if settings.heatmaps:
        from ips_path.review.heatmap import render_slide_heatmaps

        render_slide_heatmaps(store, logits, folder.heatmap_dir(job.slide_id), **settings.heatmap_options)
        fault_point("predict.heatmaps_written")
    outcome = SlideOutcome(job.slide_id, Status.DONE, seconds=round(time.perf_counter() - started, 3),
                           identity=identity, extra={**job.extra, **result, "n_patches": store.n_patches})
    folder.write_outcome(outcome)
    fault_point("predict.slide_recorded")
    return outcome


def _store_identity(store: TileStore, features: str | None) -> dict[str, Any]:
    """What the prediction read from the store: its grid (digest of the coordinates) and cached features."""
    identity = {"target_mpp": store.target_mpp, "patch_size": store.patch_size, "n_patches": store.n_patches,
                "coords_sha256": store.grid_sha256}
    if features is not None and store.has_array(f"features/{features}"):
        identity["features"] = store.array_attrs(f"features/{features}")
    return identity


def _slide_chunks(store: TileStore, settings: PredictSettings, checkpoint: dict[str, Any], job: PredictJob):
    streamer = _streamer(settings, checkpoint)
    features = checkpoint["config"].get("features")
    if features is None:
        return streamer.stream(store, slide_mpp=job.mpp)
    return streamer.stream_features(store, features)


def _tile_store(job: PredictJob, settings: PredictSettings, tiling: dict[str, Any]) -> TileStore:
    """The slide's tile store at the model's resolution, tiling the slide when needed."""
    from ips_path.tiling.grid import same_mpp
    from ips_path.tiling.run import SlideInput, TilingParams, tile_slide

    target_mpp, patch_size = float(tiling["target_mpp"]), int(tiling["patch_size"])
    path = store_path(settings.tiles_dir, job.slide_id)
    overwrite = False
    if path.exists():
        try:
            store = TileStore.open(path, slide_id=job.slide_id, slide_path=job.slide_path, verify=settings.verify)
        except StoreMismatchError:
            if not settings.own_tiles:
                raise
            store = None
        if store is not None and same_mpp(store.target_mpp, target_mpp) and store.patch_size == patch_size:
            return store
        made = "from another slide file" if store is None else f"at {store.target_mpp:g} µm/px, {store.patch_size} px"
        if not settings.own_tiles:
            raise BadInputError(
                f"{path}: tiled {made} but the model needs {target_mpp:g} µm/px, {patch_size} px; tile it again "
                f"with `ipspath tile {job.slide_path} -o DIR --mpp {target_mpp:g} --patch-size {patch_size}` "
                "or leave out --tiles")
        log.info("%s: tiled %s; tiling again at the model's %g µm/px, %d px", path, made, target_mpp, patch_size)
        overwrite = True
    params = TilingParams(target_mpp=target_mpp, patch_size=patch_size, backend=settings.backend,
                          verify=settings.verify, for_model=True)
    result = tile_slide(SlideInput(job.slide_id, job.slide_path, job.mpp), settings.tiles_dir, params, overwrite,
                        log_error=False)  # the slide's job logs it, once
    if result.status == "failed":
        raise (BadInputError if result.exit_code == 2 else IpspathError)(result.error)
    return TileStore.open(path)


def _load_model(path: Path, sha256: str, device: str) -> tuple[Any, dict[str, Any]]:
    """This process's model of the checkpoint with digest ``sha256`` (cached by content, never by path).

    Raises
    ------
    BadInputError
        The weights do not fit the checkpoint's configuration or class names.
    IpspathError
        The file is no longer the checkpoint the run started with.
    """
    from ips_path.training.checkpoint import load_model

    def build() -> tuple[Any, dict[str, Any]]:
        try:
            loaded = load_model(path, device)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"{path}: its weights do not fit its configuration or class names ({reason}); use "
                                "the checkpoint as `ipspath train` wrote it") from None
        if file_digest(path) != sha256:
            raise IpspathError(f"{path}: the checkpoint changed while predicting; run again when training has "
                               "finished writing it")
        return loaded

    return process_object("model", (sha256, device), build)


def _streamer(settings: PredictSettings, checkpoint: dict[str, Any]) -> Any:
    from ips_path.stores.loader import PatchStreamer

    chunk_size = settings.chunk_size or int(checkpoint["config"]["chunk_size"])
    stain_norm = bool(checkpoint["config"].get("stain_norm", False))  # as the model was trained
    return process_object("streamer", (chunk_size, settings.threads, settings.device, settings.backend, stain_norm),
                          lambda: PatchStreamer(chunk_size=chunk_size, threads=settings.threads,
                                                device=settings.device, backend=settings.backend,
                                                stain_norm=stain_norm))


def _lost(job: PredictJob, exc: BaseException) -> SlideOutcome:
    return SlideOutcome(job.slide_id, Status.FAILED, exit_code=1, extra=job.extra,
                        error=f"{job.slide_path}: the worker predicting it died ({type(exc).__name__}: {exc})")


# -- files --------------------------------------------------------------------------------------

def _write_scores_h5(path: Path, store: TileStore, logits: np.ndarray, tasks: tuple[list[str], np.ndarray] | None,
                     settings: PredictSettings) -> None:
    import h5py

    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            coords = f.create_dataset("coords", data=store.coords.astype(np.int64))
            coords.attrs.update({"patch_size": store.patch_size_level0, "patch_level": 0,
                                 "target_mpp": store.target_mpp})
            f.create_dataset("attention_scores", data=logits)
            if tasks is not None:
                f.create_dataset("task_attention_scores", data=tasks[1]).attrs["tasks"] = tasks[0]
            f.attrs.update({"run": settings.scores_name, "model_key": settings.model_key,
                            "patch_size_level0": store.patch_size_level0, "slide_path": str(store.slide_path)})

    write_atomically(path, write)
