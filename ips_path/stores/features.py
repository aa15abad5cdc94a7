"""The feature cache: embeddings of every patch by a frozen encoder, stored in the tile store.

``ipspath features`` runs the encoder once over each slide's patches (streamed by the
:class:`~ips_path.stores.loader.PatchStreamer`) and writes ``features/<name>`` (float16, ``(N, D)``)
into the slide's tile store. Training with ``--features <name>`` then runs IPS on these
embeddings (the paper's CAMELYON16 mode): epochs read no pixels.

Each slide is a job on the contract of :mod:`ips_path.runtime.jobs`. The array's attributes hold the
identity of what made it (encoder, SHA-256 of its weights file, output dimension, and the patch grid:
the SHA-256 of the store's coordinates) and are written with it, atomically: a killed run leaves no
half-written features, and a store tiled again while they were computed gets none (checked at the
write). Features are checked against their store's grid again wherever they are read. A store that
already holds features of that name with the same identity is reused, so an interrupted run resumes
where it stopped; features of an older grid are computed again; features of that name made by
another encoder or other weights are refused with one line (``--overwrite`` replaces them): a
model trained on them would otherwise read other embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.model.encoders import MEASUREMENT_ENCODERS, build_encoder
from ips_path.model.foundation import require_preset_weights
from ips_path.model.presets import ENCODER_PRESETS, native_tiles_note
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.identity import file_digest
from ips_path.runtime.jobs import SlideOutcome, Status, check_identity, run_job
from ips_path.runtime.locks import probe_writable
from ips_path.runtime.names import check_feature_name
from ips_path.runtime.parallel import map_slides, process_object
from ips_path.runtime.progress import advance
from ips_path.stores.feature_grid import open_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import GRID_ATTR, StoreMismatchError, TileStore, promised_patches, slide_id_from_path

__all__ = ["FeatureSettings", "cache_features", "embed_store", "extract_features", "store_features"]

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_store(encoder: torch.nn.Module, store: TileStore, streamer: PatchStreamer) -> np.ndarray:
    """Embeddings of every patch of ``store``: float16 ``(N, encoder.out_dim)``, in store order.

    On a GPU the encoder runs under autocast, in its preset's precision (foundation models) or bf16 (as
    training and prediction run), and each chunk's embeddings are copied without waiting into pinned
    host memory: the host synchronises once per slide, not once per chunk.
    """
    cuda = streamer.device.type == "cuda"
    out = torch.empty((store.n_patches, encoder.out_dim), dtype=torch.float16, pin_memory=cuda)
    preset_dtype = getattr(getattr(encoder, "preset", None), "dtype", None)
    dtype = getattr(torch, preset_dtype) if preset_dtype else torch.bfloat16
    start = 0
    for chunk in streamer.stream(store):
        device = chunk.patches.device.type
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
            emb = encoder(chunk.patches)
        out[start:start + len(emb)].copy_(emb.to(torch.float16), non_blocking=cuda)
        start += len(emb)
        advance(len(emb))
    if cuda:
        torch.cuda.synchronize(streamer.device)
    return out.numpy()


@dataclass(frozen=True)
class FeatureSettings:
    """What every store of a run shares (sent to each worker)."""

    encoder: str
    name: str
    pretrained: str | None
    identity: dict[str, Any]
    device: str = "cpu"
    chunk_size: int = 64
    threads: int | None = None  # None: the CPU cores of the process that reads
    overwrite: bool = False
    stain_norm: bool = False
    encoder_options: tuple[tuple[str, Any], ...] = ()  # keywords of build_encoder, e.g. (("window", 128),)


def extract_features(stores: Sequence[str | os.PathLike], encoder_name: str, *, name: str | None = None,
                     pretrained: str | os.PathLike | None = None, device: str = "cpu", chunk_size: int = 64,
                     threads: int | None = None, overwrite: bool = False, scheduler: str | None = None,
                     progress: bool = True, stain_norm: bool | None = None,
                     encoder_options: Mapping[str, Any] | None = None) -> list[SlideOutcome]:
    """Embed the patches of every tile store with a frozen encoder and cache them in the store.

    Parameters
    ----------
    stores : sequence of path-like
        ``.zarr`` tile stores (made by ``ipspath tile``).
    encoder_name : str
        Encoder, as for :func:`~ips_path.model.encoders.build_encoder` (``resnet50``, ``timm:...``, or a
        foundation-model preset such as ``uni_v1``, which needs ``pretrained``).
    name : str, optional
        Name of the cached array (``features/<name>``); default: the encoder name, with ``:``
        replaced by ``_``.
    pretrained : path-like, optional
        Local weights file of the encoder, or the model folder of a Hugging Face preset (phikon_v2);
        no download ever happens.
    device : str
        Where the encoder runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    chunk_size, threads : int
        Patches per forward pass; reader threads (both >= 1; threads default: the CPU cores each
        process that reads may use).
    overwrite : bool
        Recompute features that are already cached, and replace features of that name made by
        another encoder or other weights (refused without it).
    scheduler : str, optional
        Dask scheduler address or ``local:N`` (see :mod:`ips_path.runtime.parallel`); GPU workers need
        the resource ``GPU=1``. Default: this process, one store after the other.
    progress : bool
        Show progress, counted in patches.
    stain_norm : bool, optional
        Bring each slide's staining to one reference before the encoder (:mod:`ips_path.slides.stain`); part
        of the features' identity. Default: only for measurement encoders
        (:data:`~ips_path.model.encoders.MEASUREMENT_ENCODERS`, such as ``stain_density``), whose
        numbers compare slides only on one staining; learned encoders see patches as they are.
    encoder_options : mapping, optional
        Keywords of :func:`~ips_path.model.encoders.build_encoder`, with hashable values
        (``stain_density``: ``window``, ``quantiles`` as a tuple); what the encoder records of them is part
        of the features' identity.

    Returns
    -------
    list of SlideOutcome
        One per store, in order (``extra``: ``store``, ``n_patches``); status done, reused, failed
        or refused. A failing slide is recorded and the others go on.

    Raises
    ------
    BadInputError
        A bad option, device, name, encoder or weights file, before any store is touched.
    """
    from ips_path.training.distributed import resolve_device

    for option, value in (("--chunk-size", chunk_size), ("--threads", threads)):
        if (value is not None or option == "--chunk-size") and (not isinstance(value, int) or value < 1):
            raise BadInputError(f"{option} {value!r}: must be at least 1")
    name = name or encoder_name.replace(":", "_")
    check_feature_name(name)
    if scheduler is None or device == "auto":  # Dask workers check the device they are given themselves
        device = str(resolve_device(device))
    require_preset_weights(encoder_name, pretrained)
    if stain_norm is None:
        stain_norm = encoder_name in MEASUREMENT_ENCODERS
    weights = None if pretrained is None else Path(pretrained).resolve()
    folder_ok = encoder_name in ENCODER_PRESETS and ENCODER_PRESETS[encoder_name].library == "transformers"
    if weights is not None and not (weights.is_file() or (folder_ok and weights.is_dir())):
        raise BadInputError(f"{pretrained}: weights file not found; give the local file of the encoder's weights"
                            + (" (or its model folder)" if folder_ok else ""))
    identity: dict[str, Any] = {"encoder": encoder_name,
                                "weights_sha256": None if weights is None else weights_digest(weights)}
    if stain_norm:  # only then: features made before the option existed keep their identity
        identity["stain_norm"] = True
    settings = FeatureSettings(encoder_name, name, None if weights is None else str(weights), identity, device,
                               chunk_size, threads, overwrite, stain_norm,
                               tuple(sorted((encoder_options or {}).items())))
    if pretrained is None and encoder_name not in MEASUREMENT_ENCODERS:  # these have no weights
        log.warning("no --pretrained weights: %s keeps its random (seeded) initialisation; such features are "
                    "only good for trying the pipeline", encoder_name)
    _encoder(settings)  # a bad encoder name or weights file fails here, once, before any slide
    paths = [Path(p).resolve() for p in stores]
    for path in paths:  # the features go into each store: a read-only one is found before any slide is embedded
        if not os.access(path, os.W_OK):  # cheap for a cohort; the probe then says why (read-only, permissions)
            probe_writable(path, "TILES")
    if encoder_name in ENCODER_PRESETS:
        _note_native_tiles(ENCODER_PRESETS[encoder_name], paths)
    gpu = {"GPU": 1} if scheduler and device.startswith("cuda") else None
    shared = paths + ([Path(settings.pretrained)] if settings.pretrained else [])
    return map_slides(store_features, paths, settings, scheduler=scheduler, resources=gpu, shared_paths=shared,
                      progress=progress, desc="features", on_lost=_lost, patches=[promised_patches(p) for p in paths])


def store_features(path: Path, settings: FeatureSettings) -> SlideOutcome:
    """Cache the features of one tile store; never raises for a problem of the slide."""
    return run_job(slide_id_from_path(path), path, lambda: cache_features(path, settings), extra={"store": str(path)})


def cache_features(path: Path, settings: FeatureSettings) -> SlideOutcome:
    """Cache the features of one tile store (reused when equal ones are there); raises what goes wrong.

    Returns
    -------
    SlideOutcome
        DONE or REUSED, with the features' ``identity`` (``extra``: ``store``, ``n_patches``).
    """
    array = f"features/{settings.name}"
    store = TileStore.open(path)
    encoder = _encoder(settings)
    identity = {**settings.identity, **getattr(encoder, "identity", {}), "dim": int(encoder.out_dim),
                GRID_ATTR: store.grid_sha256}
    extra = {"store": str(path), "n_patches": store.n_patches}
    if not settings.overwrite and _reusable(store, settings.name, identity):
        return SlideOutcome(slide_id_from_path(path), Status.REUSED, identity=identity, extra=extra)
    streamer = process_object("streamer", (settings.chunk_size, settings.threads, settings.device,
                                           settings.stain_norm),
                              lambda: PatchStreamer(chunk_size=settings.chunk_size, threads=settings.threads,
                                                    device=settings.device, stain_norm=settings.stain_norm))
    store.write_array(array, embed_store(encoder, store, streamer), attrs={**identity, "identity": identity})
    return SlideOutcome(slide_id_from_path(path), Status.DONE, identity=identity, extra=extra)


def _reusable(store: TileStore, name: str, identity: dict[str, Any]) -> bool:
    """Whether the store's ``features/<name>`` are these features: made by this encoder on this patch grid.

    Features of an older grid (the slide was tiled again) are computed again; features of another encoder
    are refused (RefusedError). Features recorded before grids were (no digest) are taken at their row count.
    """
    array = f"features/{name}"
    if not store.has_array(array):
        return False
    try:
        open_features(store, name)
    except StoreMismatchError as exc:
        log.info("%s; computing them again", str(exc).split("; ")[0])
        return False
    recorded = {GRID_ATTR: store.grid_sha256, **(store.array_attrs(array).get("identity") or {})}
    return check_identity(store.path / array, recorded, identity, what="features",
                          instead="give these features another --name")


def weights_digest(path: Path) -> str:
    """SHA-256 (hex) of a weights file, or of a model folder's files (names and contents)."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{child.name}\0{file_digest(child)}\n".encode())
    return digest.hexdigest()


def _note_native_tiles(preset: Any, paths: Sequence[Path]) -> None:
    """Say once per tile geometry when the stores' tiles are not those the preset was trained on."""
    seen: set[tuple[float, int]] = set()
    for path in paths:
        try:
            store = TileStore.open(path)
        except (BadInputError, OSError, KeyError, ValueError):
            continue  # the store's own job reports it
        geometry = (store.target_mpp, store.patch_size)
        note = None if geometry in seen else native_tiles_note(preset, *geometry)
        seen.add(geometry)
        if note:
            log.warning(note)


def _encoder(settings: FeatureSettings) -> torch.nn.Module:
    def build() -> torch.nn.Module:
        # Without weights the initialisation is seeded, so every worker (and every rerun) embeds alike.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = build_encoder(settings.encoder, pretrained=settings.pretrained, **dict(settings.encoder_options))
        return encoder.to(settings.device).eval()

    # keyed by the weights' digest, not their path: a file rewritten in place is another encoder
    return process_object("encoder", (settings.encoder, settings.identity["weights_sha256"], settings.device,
                                       settings.encoder_options), build)


def _lost(path: Path, exc: BaseException) -> SlideOutcome:
    return SlideOutcome(slide_id_from_path(path), Status.FAILED, exit_code=1, extra={"store": str(path)},
                        error=f"{path}: the worker embedding it died ({type(exc).__name__}: {exc})")
