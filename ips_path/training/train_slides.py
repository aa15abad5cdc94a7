"""The slides of a training run: their tile stores, checked all at once before training, and their patches.

:func:`check_tile_stores` opens (and so verifies) the tile store of every slide of the run and
refuses, in one message listing every problem, stores that are missing, damaged, of another slide,
made at another resolution or patch size, or without the cached features a ``--features`` run reads.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ips_path.config import TrainConfig
from ips_path.model import PatchChunk
from ips_path.model.encoders import MEASUREMENT_ENCODERS
from ips_path.runtime.errors import MAX_LISTED, BadInputError, listing
from ips_path.slides.manifest import ManifestRow
from ips_path.stores.feature_grid import open_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.model_features import features_recipe
from ips_path.stores.tile_store import StoreMismatchError, TileStore, store_path
from ips_path.tiling.grid import same_mpp

log = logging.getLogger(__name__)

__all__ = ["CachedFeatures", "SlideItem", "check_tile_stores", "resolve_feature_norm", "slide_chunks"]

@dataclass(frozen=True)
class SlideItem:
    """A slide of the run: where its patches are, its class index (-1 without one) and its target (what the
    outcome kind's :meth:`~ips_path.tasks.OutcomeKind.target` gives it: numbers only)."""

    slide_id: str
    store: Path
    label: int
    n_patches: int
    slide_mpp: float | None = None
    target: tuple | None = None


@dataclass(frozen=True)
class CachedFeatures:
    """The cached features a ``--features`` run trains on: their dimension, the encoders that made them
    (as their identity names them; None where it names none), and what made them all, which checkpoints
    record so that prediction can make the same for new slides (:mod:`ips_path.stores.model_features`; None
    when the stores' features were made differently)."""

    dim: int
    encoders: frozenset[str | None]
    recipe: dict[str, Any] | None = None


def check_tile_stores(rows: Sequence[ManifestRow], tiles_dir: Path, manifest: Path, config: TrainConfig,
                      classes: Sequence[str]) -> tuple[dict[str, SlideItem], dict[str, Any], CachedFeatures | None]:
    """Open the tile store of every slide and check that they fit the run, all problems at once.

    Returns
    -------
    items : dict
        slide_id -> SlideItem, for slides with at least one patch (the others are skipped with a warning).
    tiling : dict
        ``target_mpp`` (µm/px) and ``patch_size`` (px) of the stores, as the run records them; in features
        mode also ``features``, the recipe of the cached features (:attr:`CachedFeatures.recipe`).
    features : CachedFeatures or None
        What the cached features are, in features mode.

    Raises
    ------
    BadInputError
        Listing every slide without a usable store or whose tiled slide file is gone (with the
        ``ipspath tile`` command that makes them),
        stores made at another mpp/patch size than asked or disagreeing among themselves, and, in
        features mode, stores without the features (with the ``ipspath features`` command).
    """
    missing, broken, stores = [], [], {}
    for row in rows:
        path = store_path(tiles_dir, row.slide_id)
        if not path.exists():
            missing.append(row.slide_id)
            continue
        try:
            store = TileStore.open(path, slide_id=row.slide_id, slide_path=row.slide_path)
        except BadInputError as exc:
            broken.append(str(exc))
            continue
        if config.features is None and not store.slide_path.exists():  # the loader reads the tiled file
            broken.append(f"{path}: its slide file {store.slide_path} is gone (moved since tiling?)")
            continue
        stores[row.slide_id] = store
    geometries = Counter((s.target_mpp, s.patch_size) for s in stores.values())
    # The run's mpp and patch size: as asked, else the stores' when they all agree on it.
    mpps, sizes = {m for m, _ in geometries}, {p for _, p in geometries}
    mpp = config.mpp or (mpps.pop() if len(mpps) == 1 else None)
    size = config.patch_size or (sizes.pop() if len(sizes) == 1 else None)
    if missing or broken:
        shown = "".join(f"\n  {m}" for m in broken[:MAX_LISTED])
        shown += f"\n  ... and {len(broken) - MAX_LISTED} more" if len(broken) > MAX_LISTED else ""
        if missing:
            shown += f"\n  no tile store in {tiles_dir} for {len(missing)} slide(s): {listing(missing)}"
        raise BadInputError(
            f"{len(missing) + len(broken)} slide(s) of {manifest} have no usable tile store:{shown}\n"
            f"make them with: ipspath tile --manifest {manifest} -o {tiles_dir} --mpp {mpp or 0.5:g} "
            f"--patch-size {size or 256}")
    if mpp is None or size is None:
        groups = [f"{m:g} µm/px and {p} px: {n} slide(s)" for (m, p), n in sorted(geometries.items())]
        raise BadInputError(f"the tile stores in {tiles_dir} were made with different settings ({'; '.join(groups)}); "
                            "give --mpp and --patch-size to choose, and re-tile the other slides")
    mismatched = [f"{slide_id} ({s.target_mpp:g} µm/px, {s.patch_size} px)" for slide_id, s in stores.items()
                  if not same_mpp(s.target_mpp, mpp) or s.patch_size != size]
    if mismatched:
        raise BadInputError(
            f"{len(mismatched)} tile store(s) were made at another resolution or patch size than the run's "
            f"{mpp:g} µm/px and {size} px: {listing(mismatched)}; re-tile them with `ipspath tile --manifest "
            f"{manifest} -o {tiles_dir} --mpp {mpp:g} --patch-size {size} --overwrite`, or train at the stores' "
            "settings")

    features = _check_features(stores, tiles_dir, config.features) if config.features else None
    empty = sorted(slide_id for slide_id, s in stores.items() if s.n_patches == 0)
    if empty:
        log.warning("%d slide(s) have no patches (no tissue found) and are left out: %s", len(empty),
                    listing(empty))
    index = {name: i for i, name in enumerate(classes)}
    items = {r.slide_id: SlideItem(r.slide_id, stores[r.slide_id].path, index.get(r.label, -1),
                                   stores[r.slide_id].n_patches, r.mpp)
             for r in rows if stores[r.slide_id].n_patches > 0}
    tiling = {"target_mpp": float(mpp), "patch_size": int(size)}
    if features is not None:
        tiling["features"] = features.recipe
    return items, tiling, features


def _check_features(stores: Mapping[str, TileStore], tiles_dir: Path, name: str) -> CachedFeatures:
    array = f"features/{name}"
    missing = sorted(slide_id for slide_id, s in stores.items() if s.n_patches and not s.has_array(array))
    if missing:
        encoder = name if name in ("resnet18", "resnet34", "resnet50", "smallcnn") else "ENCODER"
        raise BadInputError(
            f"{len(missing)} tile store(s) have no cached features {array!r}: {listing(missing)}; "
            f"make them with: ipspath features {tiles_dir} --encoder {encoder} --name {name}")
    stale = []
    for store in (s for s in stores.values() if s.n_patches):
        try:
            open_features(store, name)
        except StoreMismatchError as exc:
            stale.append(str(exc))
    if stale:
        more = f" (and {len(stale) - 1} more store(s) alike)" if len(stale) > 1 else ""
        raise BadInputError(stale[0] + more)
    dims = {slide_id: int(s.open_array(array).shape[1]) for slide_id, s in stores.items() if s.n_patches}
    if len(set(dims.values())) > 1:
        shown = listing(f"{k} ({v})" for k, v in sorted(dims.items()))
        raise BadInputError(f"cached features {array!r} differ in dimension between slides: {shown}; "
                            f"recompute them with `ipspath features {tiles_dir} --name {name} --overwrite`")
    identities = [s.array_attrs(array).get("identity") for s in stores.values() if s.n_patches]
    encoders = frozenset((i or {}).get("encoder") for i in identities)
    return CachedFeatures(next(iter(dims.values())), encoders, features_recipe(identities))


def resolve_feature_norm(config: TrainConfig, features: CachedFeatures | None) -> TrainConfig:
    """``config`` with ``feature_norm="auto"`` made concrete: ``"none"`` when a measurement encoder
    (``stain_density``) made the cached features of every slide, else ``"layer"``."""
    if config.feature_norm != "auto" or features is None:
        return config
    return replace(config, feature_norm="none" if features.encoders <= MEASUREMENT_ENCODERS else "layer")


def slide_chunks(streamer: PatchStreamer, item: SlideItem, features: str | None) -> Iterator[PatchChunk]:
    """The patches of one slide (or their cached features), opened when first asked for."""
    store = TileStore.open(item.store)
    if features is not None:
        yield from streamer.stream_features(store, features)
    else:
        yield from streamer.stream(store, slide_mpp=item.slide_mpp)
