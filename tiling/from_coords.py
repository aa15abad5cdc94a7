"""Tile stores for patch grids made elsewhere: CLAM/TRIDENT-style coordinate h5 files, and any list
of patch coordinates (the feature files of other tools are imported through it). The tissue mask is
detected as ``ipspath tile`` detects it, for QC and tissue fractions; every coordinate is kept.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ips_path.runtime.errors import BadInputError
from ips_path.slides.slide import Slide
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.tiling.grid import patch_geometry, tissue_fraction
from ips_path.tiling.run import tile_attrs
from ips_path.tiling.tissue import TissueParams, tissue_mask_for_slide

__all__ = ["import_h5", "tile_store_for_coords"]


def import_h5(
    h5_path: str | os.PathLike,
    slide_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    target_mpp: float,
    patch_size: int | None = None,
    backend: str = "auto",
    slide_mpp: float | None = None,
) -> TileStore:
    """Make a tile store from coordinates in a CLAM/TRIDENT-style h5 file.

    Every coordinate is kept; the tissue mask is detected on the slide (default
    :class:`~ips_path.tiling.tissue.TissueParams`) for QC and tissue fractions.

    Parameters
    ----------
    h5_path : path-like
        File with a ``coords`` (N, 2) dataset of level-0 (x, y) and attrs ``patch_size`` and
        ``patch_level`` (CLAM), or ``patch_size_level0`` (TRIDENT; preferred when present).
    slide_path : path-like
        The slide the coordinates belong to.
    out_path : path-like
        The ``.zarr`` store to write; its name without ``.zarr`` is the slide id it is made for.
    target_mpp : float
        Resolution the patches are to be used at, µm/px.
    patch_size : int, optional
        Patch side at ``target_mpp``, px; default: the level-0 patch size converted to
        ``target_mpp``.
    backend, slide_mpp
        As for :class:`~ips_path.slides.slide.Slide`.

    Raises
    ------
    BadInputError
        Unreadable h5 file, missing ``coords`` or patch size attributes.
    """
    h5_path = Path(h5_path)
    try:
        with h5py.File(h5_path, "r") as f:
            if "coords" not in f:
                raise BadInputError(f"{h5_path}: no 'coords' dataset (expected a CLAM/TRIDENT patch file)")
            coords = np.asarray(f["coords"][...], dtype=np.int64).reshape(-1, 2)
            h5_attrs = dict(f["coords"].attrs)
    except OSError as exc:
        raise BadInputError(f"{h5_path}: cannot read as HDF5: {exc}") from exc
    with Slide(slide_path, backend=backend, slide_mpp=slide_mpp) as slide:
        if "patch_size_level0" in h5_attrs:
            patch_size_level0 = int(h5_attrs["patch_size_level0"])
        elif "patch_size" in h5_attrs:
            level = int(h5_attrs.get("patch_level", 0))
            patch_size_level0 = round(int(h5_attrs["patch_size"]) * slide.level_downsamples[level])
        else:
            raise BadInputError(f"{h5_path}: 'coords' has neither a patch_size nor a patch_size_level0 attribute")
        return tile_store_for_coords(slide, coords, patch_size_level0, out_path, target_mpp=target_mpp,
                                     patch_size=patch_size, attrs={"imported_from": str(h5_path.resolve())})


def tile_store_for_coords(slide: Any, coords: np.ndarray, patch_size_level0: int, out_path: str | os.PathLike, *,
                          target_mpp: float, patch_size: int | None = None, slide_id: str | None = None,
                          attrs: dict[str, Any] | None = None) -> TileStore:
    """Write the tile store of an open slide for a grid of patches made elsewhere.

    Every coordinate is kept; the tissue mask is detected on the slide (default
    :class:`~ips_path.tiling.tissue.TissueParams`) for QC and tissue fractions.

    Parameters
    ----------
    slide : ips_path.slides.slide.Slide
        The open slide the coordinates belong to.
    coords : np.ndarray
        int (N, 2) level-0 top-left (x, y).
    patch_size_level0 : int
        Patch side in level-0 px.
    out_path : path-like
        The ``.zarr`` store to write.
    target_mpp : float
        Resolution the patches are to be used at, µm/px.
    patch_size : int, optional
        Patch side at ``target_mpp``, px; default: the level-0 patch size converted to ``target_mpp``.
    slide_id : str, optional
        The slide's id (as in the manifest) the store is made for; default: the store's name
        without ``.zarr``.
    attrs : dict, optional
        Extra JSON-able store attributes (where the grid came from).
    """
    level0_mpp = float(np.mean(slide.require_mpp()))
    if patch_size is None:
        patch_size = max(1, round(patch_size_level0 * level0_mpp / target_mpp))
    geometry = patch_geometry(level0_mpp, slide.level_downsamples, target_mpp, patch_size)
    # the given level-0 patch size is the truth; the rest of the geometry follows from it
    geometry = dataclasses.replace(
        geometry,
        patch_size_level0=patch_size_level0,
        stride_level0=patch_size_level0,
        read_size=max(1, round(patch_size_level0 / geometry.read_downsample)),
        effective_mpp=level0_mpp * patch_size_level0 / patch_size,
    )
    params = TissueParams()
    tissue, _ = tissue_mask_for_slide(slide, params)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    fractions = tissue_fraction(tissue.mask, tissue.downsample, coords, patch_size_level0)
    slide_id = slide_id or Path(out_path).name.removesuffix(".zarr")
    store_attrs = {**tile_attrs(slide, slide_id, geometry, params.method, params.as_dict()),
                   **(attrs or {})}
    return write_tile_store(out_path, coords, fractions, tissue.mask, tissue.mpp, store_attrs,
                            mask_downsample=tissue.downsample)
