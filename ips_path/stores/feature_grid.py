"""Cached features read only with the patch grid they were computed on.

``features/<name>`` holds one row per patch of its tile store, in the store's order. Its writer records
the grid (``GRID_ATTR``: the SHA-256 of the store's coordinates,
:attr:`~ips_path.stores.tile_store.TileStore.grid_sha256`); a store tiled again afterwards has other
patches, so every reader goes through :func:`open_features`.
"""

from __future__ import annotations

from typing import Any

from ips_path.stores.tile_store import GRID_ATTR, StoreMismatchError, TileStore

__all__ = ["open_features"]


def open_features(store: TileStore, name: str) -> Any:
    """The cached features ``features/<name>`` of ``store`` as a read-only ``zarr.Array``, checked to belong
    to its patch grid: one row per patch, computed on these coordinates (where their writer recorded them;
    features written before grids were recorded are checked by their row count only).

    Raises
    ------
    KeyError
        No such features.
    StoreMismatchError
        They were computed on another grid (the slide was tiled again after them): one line naming the
        store and the ``ipspath features`` command that computes them again.
    """
    array = store.open_array(f"features/{name}")
    grid = array.attrs.get(GRID_ATTR)
    if array.shape[0] != store.n_patches or grid not in (None, store.grid_sha256):
        found = (f"{array.shape[0]} rows for its {store.n_patches} patches" if array.shape[0] != store.n_patches
                 else "the same number of rows, at other coordinates")
        raise StoreMismatchError(
            f"{store.path}: features {name!r} were computed on another patch grid ({found}: the slide was tiled "
            f"again after them); compute them again with `ipspath features {store.path} --name {name} "
            "--encoder ... --overwrite`")
    return array
