"""Batch slide inference (``ipspath predict``): predictions for a cohort, attention for review.

For every slide, one self-contained unit of work (:func:`predict_slide`, which a Dask worker can
run as well as this process):

1. find its tile store in the tiles folder, or tile the slide there with the model's own
   resolution and patch size; a store made at another resolution is re-tiled when the folder is
   the run's own (``<out>/tiles``) and refused when the user gave it;
2. stream its patches through the model (:meth:`IPSModel.predict_slide`): class probabilities
   and the attention logit of every patch;
3. write the logits into the store (``scores/<run>``), into ``scores/<slide_id>_scores.h5``
   (coords + attention_scores, the layout CLAM users know) and, unless turned off, the heatmaps
   (``heatmaps/<slide_id>/``);
4. write ``status/<slide_id>.json`` last: a slide with a "done" status is never predicted again,
   so a killed run resumes where it stopped and predicts every slide exactly once.

Then ``predictions.csv`` is written from all status files and, where labels are known,
``metrics.json`` (AUC with a bootstrap 95 % interval, balanced accuracy, confusion matrix) and
``roc.png``. Output layout: see ``PREDICTION_FILES``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ips_path import __version__
from ips_path.atomic import write_atomically
from ips_path.errors import BadInputError, IpspathError
from ips_path.parallel import map_slides, process_object
from ips_path.store import StoreMismatchError, TileStore, store_path

log = logging.getLogger(__name__)

#: What ``ipspath predict`` writes into its output folder.
PREDICTION_FILES = {
    "predictions.csv": "slide_id, label, predicted, prob_<class> per class, n_patches, status, error",
    "run.json": "model, run name, classes, tiles folder, target_mpp, patch_size",
    "metrics.json": "with labels: auc, auc_ci95, balanced_accuracy, confusion_matrix (rows: true class)",
    "roc.png": "with labels: ROC curve",
    "status/<slide_id>.json": "per-slide status, probabilities and timing",
    "scores/<slide_id>_scores.h5": "coords (N, 2) level-0 x, y and attention_scores (N,)",
    "heatmaps/<slide_id>/": "thumbnail.png, overlay.png, patches.geojson, top_patches.png",
    "tiles/": "tile stores made here for slides that had none",
}
MPP_RTOL = 1e-3


@dataclass(frozen=True)
class PredictJob:
    """One slide to predict."""

    slide_id: str
    slide_path: Path
    label: str | None = None
    mpp: float | None = None


@dataclass(frozen=True)
class PredictSettings:
    """What every slide of a run shares (sent to each worker)."""

    model_path: Path
    run: str
    out_dir: Path
    tiles_dir: Path
    own_tiles: bool
    device: str = "cpu"
    threads: int = 4
    chunk_size: int | None = None
    backend: str = "auto"
    heatmaps: bool = True
    heatmap_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SlideRecord:
    """What happened to one slide; ``status`` is "done" or "failed"."""

    slide_id: str
    label: str | None
    status: str
    predicted: str | None = None
    probabilities: list[float] | None = None
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    exit_code: int = 0


@dataclass
class PredictResult:
    """The records of all slides (input order), the metrics (None without labels), the output folder."""

    records: list[SlideRecord]
    metrics: dict[str, Any] | None
    out_dir: Path

    @property
    def exit_code(self) -> int:
        failed = [r for r in self.records if r.status != "done"]
        if not failed:
            return 0
        return 2 if len(failed) == len(self.records) and all(r.exit_code == 2 for r in failed) else 1


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


def run_name(checkpoint: Path) -> str:
    """Name of the scores a model writes: the run folder's name for best.pt/last.pt, else the file stem."""
    return checkpoint.parent.name if checkpoint.name in ("best.pt", "last.pt") else checkpoint.stem


def predict(model: str | os.PathLike, out_dir: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (),
            manifest: str | os.PathLike | None = None, tiles_dir: str | os.PathLike | None = None,
            device: str = "cpu", threads: int = 4, chunk_size: int | None = None, backend: str = "auto",
            heatmaps: bool = True, heatmap_options: dict[str, Any] | None = None, scheduler: str | None = None,
            progress: bool = True) -> PredictResult:
    """Predict every slide of ``inputs`` and/or ``manifest`` with a trained model.

    Parameters
    ----------
    model : path-like
        A training run folder (its ``best.pt``) or a checkpoint file.
    out_dir : path-like
        Output folder (see :data:`PREDICTION_FILES`); running again resumes.
    inputs : sequence of path-like
        Slide files, folders (searched recursively) or glob patterns.
    manifest : path-like, optional
        CSV with ``slide_id``, ``slide_path`` and optional ``label``, ``mpp``.
    tiles_dir : path-like, optional
        Existing tile stores (``ipspath tile``); slides without one are tiled into it. Default:
        ``<out_dir>/tiles``.
    device : str
        ``cpu``, ``cuda``, ``cuda:1``.
    threads, chunk_size : int
        Reader threads; patches per chunk (default: the model's chunk size).
    backend : str
        Slide backend.
    heatmaps : bool
        Also render heatmaps (``heatmap_options`` as for
        :func:`~ips_path.heatmap.render_slide_heatmaps`).
    scheduler : str, optional
        Dask scheduler address or ``local:N`` (see :mod:`ips_path.parallel`); slides, tiles and
        ``out_dir`` must be on storage all workers see. GPU workers need the resource ``GPU=1``.
    progress : bool
        Progress bar over slides.
    """
    from ips_path.checkpoint import load_checkpoint
    from ips_path.tiling.run import collect_inputs

    checkpoint_path = resolve_checkpoint(model)
    checkpoint = load_checkpoint(checkpoint_path)  # refuse a foreign file before any work
    classes = list(checkpoint["class_names"])
    out_dir = Path(out_dir).resolve()
    own_tiles = tiles_dir is None
    tiles = (out_dir / "tiles" if own_tiles else Path(tiles_dir)).resolve()
    labels: dict[str, str | None] = {}
    if manifest is not None:
        from ips_path.manifest import read_manifest

        labels = {r.slide_id: r.label for r in read_manifest(manifest, require_label=False, check_files=False)}
    jobs = [PredictJob(i.slide_id, i.path.resolve(), labels.get(i.slide_id), i.mpp)
            for i in collect_inputs(inputs, manifest)]
    settings = PredictSettings(checkpoint_path.resolve(), run_name(checkpoint_path), out_dir, tiles, own_tiles,
                               device, threads, chunk_size, backend, heatmaps, dict(heatmap_options or {}))
    for folder in (out_dir / "status", out_dir / "scores", tiles):
        folder.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "run.json", {
        "model": str(checkpoint_path.resolve()), "run": settings.run, "classes": classes, "tiles": str(tiles),
        "target_mpp": checkpoint["tiling"]["target_mpp"], "patch_size": checkpoint["tiling"]["patch_size"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ipspath_version": __version__})

    gpu = {"GPU": 1} if scheduler and device.startswith("cuda") else None
    records = map_slides(predict_slide, jobs, settings, scheduler=scheduler, resources=gpu,
                         shared_paths=[out_dir, tiles, *(j.slide_path for j in jobs if j.slide_path.exists())],
                         progress=progress, desc="predict", on_lost=_lost)
    _write_predictions_csv(out_dir / "predictions.csv", records, classes)
    metrics = _write_metrics(out_dir, records, classes)
    return PredictResult(records, metrics, out_dir)


# -- one slide ----------------------------------------------------------------------------------

def predict_slide(job: PredictJob, settings: PredictSettings) -> SlideRecord:
    """Predict one slide and write its outputs; never raises for a problem of the slide."""
    status_file = settings.out_dir / "status" / f"{job.slide_id}.json"
    done = _read_done_status(status_file, job)
    if done is not None:
        return done
    started = time.perf_counter()
    record = SlideRecord(job.slide_id, job.label, "failed")
    try:
        _predict_slide(job, settings, record)
        record.status = "done"
    except IpspathError as exc:
        record.error, record.exit_code = str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one slide must never stop the others
        log.exception("%s: unexpected error", job.slide_path)
        record.error, record.exit_code = f"{job.slide_path}: {type(exc).__name__}: {exc}", 1
    record.seconds = round(time.perf_counter() - started, 3)
    if record.status == "failed":
        log.error("%s", record.error)
    _write_json(status_file, asdict(record))
    return record


def _predict_slide(job: PredictJob, settings: PredictSettings, record: SlideRecord) -> None:
    import torch

    model, checkpoint = _load_model(settings.model_path, settings.device)
    store = _tile_store(job, settings, checkpoint["tiling"])
    if store.n_patches == 0:
        raise BadInputError(f"{job.slide_path}: no tissue patches to predict from (its tile store {store.path} "
                            "is empty); check the QC picture of `ipspath tile`")
    record.n_patches = store.n_patches
    chunks = _slide_chunks(store, settings, checkpoint, job)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if settings.device.startswith("cuda")
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        prediction = model.predict_slide(chunks)
    from ips_path.checkpoint import TASK_NAME

    probabilities = prediction.probabilities[TASK_NAME].float().cpu().reshape(-1).tolist()
    logits = prediction.selection.all_logits.float().cpu().numpy().astype(np.float32)
    classes = checkpoint["class_names"]
    record.probabilities = [round(p, 6) for p in probabilities]
    record.predicted = classes[int(np.argmax(probabilities))]
    store.write_array(f"scores/{settings.run}", logits, attrs={"model": str(settings.model_path)})
    _write_scores_h5(settings.out_dir / "scores" / f"{job.slide_id}_scores.h5", store, logits, settings.run)
    if settings.heatmaps:
        from ips_path.heatmap import render_slide_heatmaps

        render_slide_heatmaps(store, logits, settings.out_dir / "heatmaps" / job.slide_id, **settings.heatmap_options)


def _slide_chunks(store: TileStore, settings: PredictSettings, checkpoint: dict[str, Any], job: PredictJob):
    streamer = _streamer(settings, checkpoint)
    features = checkpoint["config"].get("features")
    if features is None:
        return streamer.stream(store, slide_mpp=job.mpp)
    if not store.has_array(f"features/{features}"):
        raise BadInputError(f"{store.path}: the model reads cached features {features!r}, which this store lacks; "
                            f"run `ipspath features {store.path.parent} --name {features} --encoder ...` "
                            "with the encoder the model was trained on")
    return streamer.stream_features(store, features)


def _tile_store(job: PredictJob, settings: PredictSettings, tiling: dict[str, Any]) -> TileStore:
    """The slide's tile store at the model's resolution, tiling the slide when needed."""
    from ips_path.tiling.run import SlideInput, TilingParams, tile_slide

    target_mpp, patch_size = float(tiling["target_mpp"]), int(tiling["patch_size"])
    path = store_path(settings.tiles_dir, job.slide_id)
    overwrite = False
    if path.exists():
        try:
            store = TileStore.open(path, slide_id=job.slide_id, slide_path=job.slide_path)
        except StoreMismatchError:
            if not settings.own_tiles:
                raise
            store = None
        if store is not None and _close(store.target_mpp, target_mpp) and store.patch_size == patch_size:
            return store
        made = "from another slide file" if store is None else f"at {store.target_mpp:g} µm/px, {store.patch_size} px"
        if not settings.own_tiles:
            raise BadInputError(
                f"{path}: tiled {made} but the model needs {target_mpp:g} µm/px, {patch_size} px; tile it again "
                f"with `ipspath tile {job.slide_path} -o DIR --mpp {target_mpp:g} --patch-size {patch_size}` "
                "or leave out --tiles")
        log.info("%s: tiled %s; tiling again at the model's %g µm/px, %d px", path, made, target_mpp, patch_size)
        overwrite = True
    params = TilingParams(target_mpp=target_mpp, patch_size=patch_size, backend=settings.backend)
    result = tile_slide(SlideInput(job.slide_id, job.slide_path, job.mpp), settings.tiles_dir, params, overwrite)
    if result.status == "failed":
        raise (BadInputError if result.exit_code == 2 else IpspathError)(result.error)
    return TileStore.open(path)


def _close(a: float, b: float) -> bool:
    """Whether two resolutions in µm/px are the same (tile stores made with the same --mpp agree closely)."""
    return abs(a - b) <= MPP_RTOL * max(abs(a), abs(b))


def _load_model(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    from ips_path.checkpoint import load_model

    return process_object("model", (str(path), device), lambda: load_model(path, device))


def _streamer(settings: PredictSettings, checkpoint: dict[str, Any]) -> Any:
    from ips_path.loader import PatchStreamer

    chunk_size = settings.chunk_size or int(checkpoint["config"]["chunk_size"])
    return process_object("streamer", (chunk_size, settings.threads, settings.device, settings.backend),
                          lambda: PatchStreamer(chunk_size=chunk_size, threads=settings.threads,
                                                device=settings.device, backend=settings.backend))


def _read_done_status(path: Path, job: PredictJob) -> SlideRecord | None:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if values.get("status") != "done":
        return None
    record = SlideRecord(**{k: values.get(k) for k in SlideRecord.__dataclass_fields__ if k in values})
    record.label = job.label  # the manifest may have gained labels since
    return record


def _lost(job: PredictJob, exc: BaseException) -> SlideRecord:
    return SlideRecord(job.slide_id, job.label, "failed", exit_code=1,
                       error=f"{job.slide_path}: the worker predicting it died ({type(exc).__name__}: {exc})")


# -- files --------------------------------------------------------------------------------------

def _write_json(path: Path, values: dict[str, Any]) -> None:
    text = json.dumps(values, indent=2) + "\n"
    write_atomically(path, lambda partial: partial.write_text(text))


def _write_scores_h5(path: Path, store: TileStore, logits: np.ndarray, run: str) -> None:
    import h5py

    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            coords = f.create_dataset("coords", data=store.coords.astype(np.int64))
            coords.attrs.update({"patch_size": store.patch_size_level0, "patch_level": 0,
                                 "target_mpp": store.target_mpp})
            f.create_dataset("attention_scores", data=logits)
            f.attrs.update({"run": run, "patch_size_level0": store.patch_size_level0,
                            "slide_path": str(store.slide_path)})

    write_atomically(path, write)


def _write_predictions_csv(path: Path, records: Sequence[SlideRecord], classes: Sequence[str]) -> None:
    columns = ["slide_id", "label", "predicted", *(f"prob_{c}" for c in classes), "n_patches", "status", "error"]

    def write(partial: Path) -> None:
        with partial.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in records:
                probs = r.probabilities or [""] * len(classes)
                writer.writerow([r.slide_id, r.label or "", r.predicted or "", *probs, r.n_patches, r.status,
                                 r.error])

    write_atomically(path, write)


def _write_metrics(out_dir: Path, records: Sequence[SlideRecord], classes: Sequence[str]) -> dict[str, Any] | None:
    """metrics.json and roc.png over the predicted slides whose label is one of the model's classes."""
    from ips_path.metrics import auc_confidence_interval, balanced_accuracy, confusion_matrix, macro_auc

    scored = [r for r in records if r.status == "done" and r.label in classes]
    unknown = sorted({r.label for r in records if r.label and r.label not in classes})
    if unknown:
        log.warning("labels %s are not classes of the model (%s); those slides are left out of the metrics",
                    ", ".join(unknown), ", ".join(classes))
    if not scored:
        return None
    labels = np.array([classes.index(r.label) for r in scored])
    probabilities = np.array([r.probabilities for r in scored], dtype=np.float64)
    predictions = probabilities.argmax(axis=1)
    low, high = auc_confidence_interval(labels, probabilities)
    metrics = {
        "n_slides": len(scored), "classes": list(classes), "auc": _finite(macro_auc(labels, probabilities)),
        "auc_ci95": [_finite(low), _finite(high)],
        "balanced_accuracy": _finite(balanced_accuracy(labels, predictions, len(classes))),
        "accuracy": float((predictions == labels).mean()),
        "confusion_matrix": confusion_matrix(labels, predictions, len(classes)).tolist(),
    }
    _write_json(out_dir / "metrics.json", metrics)
    from ips_path.plots import plot_roc

    plot_roc(labels, probabilities, classes, out_dir / "roc.png", auc=metrics["auc"], ci=metrics["auc_ci95"])
    return metrics


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
