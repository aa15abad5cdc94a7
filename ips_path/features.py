"""The feature cache: embeddings of every patch by a frozen encoder, stored in the tile store.

``ipspath features`` runs the encoder once over each slide's patches (streamed by the
:class:`~ips_path.loader.PatchStreamer`) and writes ``features/<name>`` (float16, ``(N, D)``)
into the slide's tile store. Training with ``--features <name>`` then runs IPS on these
embeddings (the paper's CAMELYON16 mode): epochs read no pixels.

A slide whose store already holds complete features of that name, from the same encoder and
weights, is skipped, so an interrupted run resumes where it stopped; each array is written
atomically, so a killed run leaves no half-written features.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ips_path.errors import IpspathError
from ips_path.loader import PatchStreamer
from ips_path.model.encoders import build_encoder
from ips_path.model.foundation import require_preset_weights
from ips_path.parallel import map_slides, process_object
from ips_path.store import TileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureResult:
    """What happened to one slide: ``status`` is "extracted", "skipped" or "failed"."""

    store: Path
    status: str
    n_patches: int = 0
    seconds: float = 0.0
    error: str | None = None


def weights_digest(path: str | os.PathLike | None) -> str | None:
    """Short SHA-256 of a weights file, recorded with the features so other weights are not mixed up."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@torch.inference_mode()
def embed_store(encoder: torch.nn.Module, store: TileStore, streamer: PatchStreamer) -> np.ndarray:
    """Embeddings of every patch of ``store``: float16 ``(N, encoder.out_dim)``, in store order."""
    out = np.empty((store.n_patches, encoder.out_dim), dtype=np.float16)
    # a foundation-model preset runs in the precision it was made for (autocast, on a GPU)
    dtype = getattr(torch, getattr(getattr(encoder, "preset", None), "dtype", "float32"))
    start = 0
    for chunk in streamer.stream(store):
        device = chunk.patches.device.type
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
            emb = encoder(chunk.patches)
        out[start:start + len(emb)] = emb.float().cpu().numpy()
        start += len(emb)
    return out


@dataclass(frozen=True)
class FeatureSettings:
    """What every store of a run shares (sent to each worker)."""

    encoder: str
    name: str
    pretrained: str | None
    weights_sha256: str | None
    device: str = "cpu"
    chunk_size: int = 64
    threads: int = 4
    overwrite: bool = False


def extract_features(stores: Sequence[str | os.PathLike], encoder_name: str, *, name: str | None = None,
                     pretrained: str | os.PathLike | None = None, device: str = "cpu", chunk_size: int = 64,
                     threads: int = 4, overwrite: bool = False, scheduler: str | None = None,
                     progress: bool = True) -> list[FeatureResult]:
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
        Local weights file of the encoder (no download ever happens).
    device : str
        Where the encoder runs.
    chunk_size, threads : int
        Patches per forward pass; reader threads.
    overwrite : bool
        Recompute features that are already cached.
    scheduler : str, optional
        Dask scheduler address or ``local:N`` (see :mod:`ips_path.parallel`); GPU workers need
        the resource ``GPU=1``. Default: this process, one store after the other.
    progress : bool
        Show a progress bar over stores.

    Returns
    -------
    list of FeatureResult
        One per store, in order. A failing slide is recorded and the others go on.
    """
    settings = FeatureSettings(encoder_name, name or encoder_name.replace(":", "_"),
                               None if pretrained is None else str(Path(pretrained).resolve()),
                               weights_digest(pretrained), device, chunk_size, threads, overwrite)
    require_preset_weights(encoder_name, pretrained)
    if pretrained is None:
        log.warning("no --pretrained weights: %s keeps its random (seeded) initialisation; such features are "
                    "only good for trying the pipeline", encoder_name)
    _encoder(settings)  # a bad encoder name or weights file fails here, once, before any slide
    paths = [Path(p).resolve() for p in stores]
    gpu = {"GPU": 1} if scheduler and device.startswith("cuda") else None
    shared = paths + ([Path(settings.pretrained)] if settings.pretrained else [])
    return map_slides(store_features, paths, settings, scheduler=scheduler, resources=gpu, shared_paths=shared,
                      progress=progress, desc="features", on_lost=_lost)


def store_features(path: Path, settings: FeatureSettings) -> FeatureResult:
    """Cache the features of one tile store; never raises for a problem of the slide."""
    array = f"features/{settings.name}"
    started = time.perf_counter()
    try:
        store = TileStore.open(path)
        encoder = _encoder(settings)
        identity = {"encoder": settings.encoder, "weights_sha256": settings.weights_sha256,
                    "dim": int(encoder.out_dim)}
        if not settings.overwrite and store.has_array(array) and _matches(store, array, identity):
            return FeatureResult(path, "skipped", store.n_patches)
        streamer = process_object("streamer", (settings.chunk_size, settings.threads, settings.device),
                                  lambda: PatchStreamer(chunk_size=settings.chunk_size, threads=settings.threads,
                                                        device=settings.device))
        store.write_array(array, embed_store(encoder, store, streamer), attrs=identity)
    except IpspathError as exc:
        log.error("%s", exc)
        return FeatureResult(path, "failed", error=str(exc))
    return FeatureResult(path, "extracted", store.n_patches, time.perf_counter() - started)


def _encoder(settings: FeatureSettings) -> torch.nn.Module:
    def build() -> torch.nn.Module:
        # Without weights the initialisation is seeded, so every worker (and every rerun) embeds alike.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = build_encoder(settings.encoder, pretrained=settings.pretrained)
        return encoder.to(settings.device).eval()

    return process_object("encoder", (settings.encoder, settings.pretrained, settings.device), build)


def _lost(path: Path, exc: BaseException) -> FeatureResult:
    return FeatureResult(path, "failed", error=f"{path}: the worker embedding it died ({type(exc).__name__}: {exc})")


def _matches(store: TileStore, array: str, identity: dict) -> bool:
    attrs = store.array_attrs(array)
    return all(attrs.get(k) == v for k, v in identity.items())
