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
from ips_path.progress import progress_bar
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
    start = 0
    for chunk in streamer.stream(store):
        emb = encoder(chunk.patches)
        out[start:start + len(emb)] = emb.float().cpu().numpy()
        start += len(emb)
    return out


def extract_features(stores: Sequence[str | os.PathLike], encoder_name: str, *, name: str | None = None,
                     pretrained: str | os.PathLike | None = None, device: str = "cpu", chunk_size: int = 64,
                     threads: int = 4, overwrite: bool = False, progress: bool = True) -> list[FeatureResult]:
    """Embed the patches of every tile store with a frozen encoder and cache them in the store.

    Parameters
    ----------
    stores : sequence of path-like
        ``.zarr`` tile stores (made by ``ipspath tile``).
    encoder_name : str
        Encoder, as for :func:`~ips_path.model.encoders.build_encoder` (``resnet50``, ``timm:...``).
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
    progress : bool
        Show a progress bar over patches.

    Returns
    -------
    list of FeatureResult
        One per store, in order. A failing slide is recorded and the others go on.
    """
    name = name or encoder_name.replace(":", "_")
    digest = weights_digest(pretrained)
    encoder = build_encoder(encoder_name, pretrained=pretrained).to(device).eval()
    identity = {"encoder": encoder_name, "weights_sha256": digest, "dim": int(encoder.out_dim)}
    results: list[FeatureResult] = []
    opened = [(Path(p), _open_or_error(p)) for p in stores]
    total = sum(s.n_patches for _, s in opened if isinstance(s, TileStore))
    with PatchStreamer(chunk_size=chunk_size, threads=threads, device=device) as streamer, \
            progress_bar(total, "features", unit="patch", enabled=progress) as bar:
        for path, store in opened:
            if not isinstance(store, TileStore):
                results.append(FeatureResult(path, "failed", error=store))
                continue
            array = f"features/{name}"
            if not overwrite and store.has_array(array) and _matches(store, array, identity):
                results.append(FeatureResult(path, "skipped", store.n_patches))
                bar.update(store.n_patches)
                continue
            started = time.perf_counter()
            try:
                features = embed_store(encoder, store, streamer)
                store.write_array(array, features, attrs=identity)
            except IpspathError as exc:
                log.error("%s", exc)
                results.append(FeatureResult(path, "failed", error=str(exc)))
                continue
            finally:
                bar.update(store.n_patches)
            results.append(FeatureResult(path, "extracted", store.n_patches, time.perf_counter() - started))
    return results


def _open_or_error(path: str | os.PathLike) -> TileStore | str:
    try:
        return TileStore.open(path)
    except IpspathError as exc:
        return str(exc)


def _matches(store: TileStore, array: str, identity: dict) -> bool:
    attrs = store.array_attrs(array)
    return all(attrs.get(k) == v for k, v in identity.items())
