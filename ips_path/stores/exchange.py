"""A tile store's patch grid written as a CLAM/TRIDENT-style coordinate h5 file
(read back by :func:`ips_path.tiling.from_coords.import_h5`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ips_path.runtime.atomic import write_atomically
from ips_path.stores.tile_store import TileStore, slide_id_from_path

__all__ = ["export_h5"]


def export_h5(store: TileStore, h5_path: str | os.PathLike) -> None:
    """Write the coordinates as a CLAM/TRIDENT-style h5 file.

    Dataset ``coords`` int64 (N, 2), level-0 (x, y), with attrs ``patch_size`` (px at
    ``patch_level``, as CLAM reads them), ``patch_level``, ``downsample``,
    ``downsampled_level_dim``, ``level_dim``, ``name`` (CLAM) and ``patch_size_level0``,
    ``target_magnification``, ``level0_magnification``, ``overlap`` (TRIDENT), plus
    ``target_mpp`` and ``level0_mpp``. Written to a temporary file and renamed.
    """
    import h5py

    h5_path = Path(h5_path)
    attrs = store.attrs
    level_dim = attrs.get("read_level_dimensions") or attrs.get("slide_dimensions") or [0, 0]
    read_downsample = float(attrs.get("read_downsample", 1.0))
    level0_mpp = float(np.mean(store.level0_mpp))
    h5_path.parent.mkdir(parents=True, exist_ok=True)

    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            dataset = f.create_dataset("coords", data=store.coords)
            dataset.attrs.update({
                "patch_size": store.read_size,
                "patch_level": store.read_level,
                "downsample": np.array([read_downsample, read_downsample]),
                "downsampled_level_dim": np.asarray(level_dim, dtype=np.int64),
                "level_dim": np.asarray(level_dim, dtype=np.int64),
                "name": str(attrs.get("slide_id", slide_id_from_path(store.slide_path))),
                "patch_size_level0": store.patch_size_level0,
                "target_magnification": 10.0 / store.target_mpp,
                "level0_magnification": 10.0 / level0_mpp,
                "overlap": max(0, store.patch_size_level0 - store.stride_level0),
                "target_mpp": store.target_mpp,
                "level0_mpp": np.asarray(store.level0_mpp),
            })

    write_atomically(h5_path, write)
