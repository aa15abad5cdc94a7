"""Quality-control outputs of tiling: one PNG per slide and one CSV per run.

The picture is the low-resolution image tissue was detected on (no further slide reads),
with the tissue contour in green and the outline of every kept patch in blue: the grid
must cover the tissue and leave white background alone.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.runtime.atomic import write_atomically

__all__ = [
    "CONTOUR_RGB", "GRID_RGB", "QC_LONG_SIDE", "SUMMARY_COLUMNS", "qc_picture", "write_qc_png",
    "write_summary_csv",
]

QC_LONG_SIDE = 1024
"""Approximate long side of a QC picture, px (whole factors of the detection image)."""
CONTOUR_RGB = (0, 170, 0)
GRID_RGB = (30, 60, 230)
SUMMARY_COLUMNS = (
    "slide_id", "path", "status", "n_patches", "level0_mpp", "mpp_source", "target_mpp", "seconds", "error",
)


def _scale_factor(long_side: int, wanted: int) -> tuple[int, int]:
    """(up, down) whole factors that bring ``long_side`` close to ``wanted`` px."""
    if long_side > wanted:
        return 1, -(-long_side // wanted)
    return max(1, wanted // max(1, long_side)), 1


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px of its edge (inner contour)."""
    from scipy.ndimage import minimum_filter

    return mask & ~minimum_filter(mask.view(np.uint8), size=2 * width + 1, mode="nearest").astype(bool)


def _paint_outlines(picture: np.ndarray, left: np.ndarray, top: np.ndarray, side: int, rgb: tuple) -> None:
    """Draw square outlines (top-left ``left``, ``top``; ``side`` px) without a loop per square."""
    height, width = picture.shape[:2]
    steps = np.arange(side)
    right, bottom = left + side - 1, top + side - 1
    for xs, ys in (
        (left[:, None] + steps, np.broadcast_to(top[:, None], (len(top), side))),  # top edge
        (left[:, None] + steps, np.broadcast_to(bottom[:, None], (len(top), side))),  # bottom edge
        (np.broadcast_to(left[:, None], (len(left), side)), top[:, None] + steps),  # left edge
        (np.broadcast_to(right[:, None], (len(left), side)), top[:, None] + steps),  # right edge
    ):
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        picture[ys[inside], xs[inside]] = rgb


def qc_picture(
    image: np.ndarray,
    image_downsample: float,
    mask: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    long_side: int = QC_LONG_SIDE,
) -> np.ndarray:
    """A QC picture: slide image, tissue contour and patch grid.

    Parameters
    ----------
    image : np.ndarray
        uint8 (h, w, 3) low-resolution image of the whole slide.
    image_downsample : float
        Level-0 pixels per ``image`` pixel.
    mask : np.ndarray
        bool tissue mask over the whole slide, any resolution (resized to the picture).
    coords : np.ndarray
        int (N, 2) level-0 top-left (x, y) of the kept patches.
    patch_size_level0 : int
        Patch side, level-0 px.
    long_side : int
        Approximate long side of the result, px.

    Returns
    -------
    np.ndarray
        uint8 (H, W, 3).
    """
    from PIL import Image

    up, down = _scale_factor(max(image.shape[:2]), long_side)
    picture = image if down == 1 else np.asarray(Image.fromarray(image).reduce(down))
    if up > 1:
        picture = np.repeat(np.repeat(picture, up, axis=0), up, axis=1)
    picture = np.array(picture)  # writable copy
    height, width = picture.shape[:2]
    mask_on_picture = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    ) > 0
    picture[_boundary(mask_on_picture, max(1, round(max(height, width) / 500)))] = CONTOUR_RGB

    picture_downsample = image_downsample * down / up
    if len(coords):
        left = np.round(coords[:, 0] / picture_downsample).astype(np.int64)
        top = np.round(coords[:, 1] / picture_downsample).astype(np.int64)
        side = max(1, round(patch_size_level0 / picture_downsample))
        _paint_outlines(picture, left, top, side, GRID_RGB)
    return picture


def write_qc_png(path: str | os.PathLike, picture: np.ndarray) -> None:
    """Save a QC picture as PNG (fast compression), creating the folder; written via a temporary file."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: Image.fromarray(picture).save(partial, format="PNG", compress_level=1))


def write_summary_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write the per-run tiling summary, one row per slide, columns :data:`SUMMARY_COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(partial: Path) -> None:
        with partial.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)
