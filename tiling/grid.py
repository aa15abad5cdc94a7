"""The patch grid: which pyramid level to read, patch sizes, and the patches that hold tissue.

Conventions: resolutions in µm/px; patch coordinates are level-0 top-left (x, y), int64,
sorted row-major (by y, then x); ``patch_size`` and ``stride`` are in pixels at the target
resolution, the ``*_level0`` sizes in level-0 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ips_path.runtime.errors import BadInputError

__all__ = [
    "MPP_TOLERANCE", "PatchGeometry", "grid_coords", "mpp_for_magnification", "patch_geometry",
    "patch_resolution", "patch_stride", "read_level_for_mpp", "same_mpp", "select_patches",
    "summed_area_table", "tissue_fraction",
]

MPP_TOLERANCE = 0.02
"""Relative slack when comparing resolutions, the one used everywhere: a level at 0.51 µm/px serves
a 0.5 µm/px target, and a store tiled at 0.5 µm/px serves a model of 0.505 µm/px."""


def same_mpp(a: float, b: float) -> bool:
    """Whether two resolutions in µm/px are the same within :data:`MPP_TOLERANCE`."""
    return abs(a - b) <= MPP_TOLERANCE * max(abs(a), abs(b))


def mpp_for_magnification(magnification: float) -> float:
    """Resolution for an objective magnification, µm/px: 10 µm/px at 1x, so 20x -> 0.5."""
    if not (math.isfinite(magnification) and magnification > 0):
        raise ValueError(f"magnification must be a positive number, got {magnification}")
    return 10.0 / magnification


def patch_resolution(mpp: float | None = None, mag: float | None = None, default: float = 0.5) -> float:
    """The patch resolution in µm/px from ``--mpp`` or ``--mag`` (at most one), else ``default``.

    Raises
    ------
    BadInputError
        Both given, or a magnification that is not a positive number.
    """
    if mpp is not None and mag is not None:
        raise BadInputError("give either --mpp or --mag, not both")
    if mag is None:
        return default if mpp is None else mpp
    if not (math.isfinite(mag) and mag > 0):
        raise BadInputError(f"--mag must be a positive magnification (20 = 0.5 µm/px), got {mag}")
    return mpp_for_magnification(mag)


def patch_stride(patch_size: int, stride: int | None = None, overlap: int | None = None) -> int | None:
    """The step between patches in px at the patch resolution, from ``--stride`` or ``--overlap``
    (at most one; stride = patch size - overlap); None = no overlap.

    Raises
    ------
    BadInputError
        Both given, or an overlap outside 0 .. patch_size - 1.
    """
    if stride is not None and overlap is not None:
        raise BadInputError("give either --stride or --overlap, not both")
    if overlap is None:
        return stride
    if not 0 <= overlap < patch_size:
        raise BadInputError(f"--overlap must be between 0 and --patch-size - 1 ({patch_size - 1}), got {overlap}")
    return patch_size - overlap


def read_level_for_mpp(
    level0_mpp: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    tolerance: float = MPP_TOLERANCE,
) -> int:
    """The coarsest pyramid level whose resolution is at least as fine as ``target_mpp``.

    Parameters
    ----------
    level0_mpp : float
        Level-0 resolution, µm/px.
    level_downsamples : sequence of float
        Downsample of each level relative to level 0.
    target_mpp : float
        Wanted resolution, µm/px.
    tolerance : float
        A level up to this fraction coarser than the target still counts (0.02 = 2 %).

    Returns
    -------
    int
        The level index; 0 when even level 0 is coarser than the target (the caller decides
        whether upsampling is acceptable).
    """
    best = 0
    for level, downsample in enumerate(level_downsamples):
        level_mpp = level0_mpp * downsample
        if level_mpp <= target_mpp * (1 + tolerance) and downsample >= level_downsamples[best]:
            best = level
    return best


@dataclass(frozen=True)
class PatchGeometry:
    """Sizes of one patch grid on one slide.

    Attributes
    ----------
    target_mpp : float
        Requested resolution, µm/px.
    effective_mpp : float
        Resolution actually delivered: level-0 mpp x ``patch_size_level0`` / ``patch_size``
        (differs from the target by the rounding of the level-0 size).
    patch_size, stride : int
        Patch side and step at the target resolution, px.
    patch_size_level0, stride_level0 : int
        The same in level-0 pixels.
    read_level : int
        Pyramid level the patches are read from (then resized to ``patch_size``).
    read_downsample : float
        Downsample of ``read_level``.
    read_size : int
        Patch side at ``read_level``, px.
    """

    target_mpp: float
    effective_mpp: float
    patch_size: int
    stride: int
    patch_size_level0: int
    stride_level0: int
    read_level: int
    read_downsample: float
    read_size: int

    def as_dict(self) -> dict[str, Any]:
        """The geometry as a JSON-able dict."""
        return asdict(self)


def patch_geometry(
    level0_mpp: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    patch_size: int,
    stride: int | None = None,
) -> PatchGeometry:
    """Patch sizes at level 0 and at the read level for a target resolution.

    Parameters
    ----------
    level0_mpp : float
        Mean level-0 resolution, µm/px.
    level_downsamples : sequence of float
        Downsample of each pyramid level.
    target_mpp : float
        Resolution of the patches, µm/px.
    patch_size : int
        Patch side at ``target_mpp``, px.
    stride : int, optional
        Step between patches at ``target_mpp``, px; default ``patch_size`` (no overlap).

    Raises
    ------
    ValueError
        Non-positive sizes, or a target finer than level 0 beyond the tolerance (that would
        need upsampling, which invents detail).
    """
    stride = patch_size if stride is None else stride
    if patch_size <= 0 or stride <= 0 or target_mpp <= 0 or level0_mpp <= 0:
        raise ValueError(
            f"sizes must be positive: patch_size={patch_size}, stride={stride}, "
            f"target_mpp={target_mpp}, level0_mpp={level0_mpp}"
        )
    if target_mpp * (1 + MPP_TOLERANCE) < level0_mpp:
        raise ValueError(f"target {target_mpp} µm/px is finer than the slide's level 0 ({level0_mpp:.4g} µm/px)")
    scale = target_mpp / level0_mpp
    patch_size_level0 = max(1, round(patch_size * scale))
    stride_level0 = max(1, round(stride * scale))
    read_level = read_level_for_mpp(level0_mpp, level_downsamples, target_mpp)
    read_downsample = float(level_downsamples[read_level])
    return PatchGeometry(
        target_mpp=target_mpp,
        effective_mpp=level0_mpp * patch_size_level0 / patch_size,
        patch_size=patch_size,
        stride=stride,
        patch_size_level0=patch_size_level0,
        stride_level0=stride_level0,
        read_level=read_level,
        read_downsample=read_downsample,
        read_size=max(1, round(patch_size_level0 / read_downsample)),
    )


def grid_coords(slide_size: tuple[int, int], patch_size_level0: int, stride_level0: int) -> np.ndarray:
    """Top-left corners of every patch that fits entirely inside the slide.

    Parameters
    ----------
    slide_size : tuple of int
        Level-0 (width, height), px.
    patch_size_level0, stride_level0 : int
        Patch side and step, level-0 px.

    Returns
    -------
    np.ndarray
        int64 (N, 2) level-0 (x, y), sorted row-major; empty when the slide is smaller than a patch.
    """
    width, height = slide_size
    xs = np.arange(0, width - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    ys = np.arange(0, height - patch_size_level0 + 1, stride_level0, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def summed_area_table(mask: np.ndarray) -> np.ndarray:
    """Integral image with a zero first row and column: ``table[r, c] = mask[:r, :c].sum()``.

    int32 while the mask has fewer than 2**31 pixels, int64 beyond.
    """
    height, width = mask.shape
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros((height + 1, width + 1), dtype)
    np.cumsum(mask.view(np.uint8) if mask.dtype == bool else mask, axis=0, dtype=dtype, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, dtype=dtype, out=table[1:, 1:])
    return table


def _integral_at(table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The integral image at fractional (row, col) positions.

    The mask is piecewise constant over pixels, so its integral is bilinear inside each pixel
    and bilinear interpolation of the table is exact.
    """
    max_row, max_col = table.shape[0] - 1, table.shape[1] - 1
    rows = np.clip(rows, 0, max_row)
    cols = np.clip(cols, 0, max_col)
    # The last row/column of the table is reached as the far end of the cell before it.
    r0 = np.minimum(np.floor(rows).astype(np.int64), max_row - 1)
    c0 = np.minimum(np.floor(cols).astype(np.int64), max_col - 1)
    fr = rows - r0
    fc = cols - c0
    r1, c1 = r0 + 1, c0 + 1
    top = table[r0, c0] * (1 - fc) + table[r0, c1] * fc
    bottom = table[r1, c0] * (1 - fc) + table[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def tissue_fraction(
    mask: np.ndarray, downsample: float, coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Fraction of each patch covered by tissue, from a summed-area table (no loop per patch).

    Parameters
    ----------
    mask : np.ndarray
        bool (h, w) tissue mask.
    downsample : float
        Level-0 pixels per mask pixel.
    coords : np.ndarray
        int (N, 2) level-0 top-left (x, y) of the patches.
    patch_size_level0 : int
        Patch side, level-0 px.

    Returns
    -------
    np.ndarray
        float32 (N,) in [0, 1]; partial mask pixels count by their overlapping area.
        Parts of a patch outside the mask count as background.
    """
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    table = summed_area_table(mask)
    left = coords[:, 0] / downsample
    top = coords[:, 1] / downsample
    side = patch_size_level0 / downsample
    right, bottom = left + side, top + side
    inside = (
        _integral_at(table, bottom, right)
        - _integral_at(table, top, right)
        - _integral_at(table, bottom, left)
        + _integral_at(table, top, left)
    )
    # Differences of the summed-area table carry round-off (about 1e-9 here): rounding to 1e-6 makes a
    # patch without tissue exactly 0, so it is never kept as "holding tissue".
    return np.clip(np.round(inside / (side * side), 6), 0.0, 1.0).astype(np.float32)


def select_patches(
    mask: np.ndarray,
    downsample: float,
    slide_size: tuple[int, int],
    geometry: PatchGeometry,
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid patches that hold enough tissue.

    Parameters
    ----------
    mask : np.ndarray
        bool (h, w) tissue mask covering the slide.
    downsample : float
        Level-0 pixels per mask pixel.
    slide_size : tuple of int
        Level-0 (width, height), px.
    geometry : PatchGeometry
        Patch sizes.
    min_tissue : float
        Keep patches whose tissue fraction is at least this (0-1); a patch without any
        tissue is never kept, even at 0.

    Returns
    -------
    coords : np.ndarray
        int64 (N, 2) level-0 top-left (x, y), sorted row-major.
    fractions : np.ndarray
        float32 (N,) tissue fraction of each kept patch.
    """
    candidates = grid_coords(slide_size, geometry.patch_size_level0, geometry.stride_level0)
    fractions = tissue_fraction(mask, downsample, candidates, geometry.patch_size_level0)
    keep = (fractions >= min_tissue) & (fractions > 0)
    return candidates[keep], fractions[keep]
