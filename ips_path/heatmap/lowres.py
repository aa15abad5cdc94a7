"""Block-wise low-resolution reads of a slide: a region at any downsample, and whole-slide thumbnails."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ips_path.slide import Slide

__all__ = ["BLOCK", "read_downsampled", "slide_thumbnail"]

# A pyramid level up to this fraction coarser than wanted is read and scaled up a little:
# invisible in a picture, and up to 16x fewer pixels than the next finer level.
_LEVEL_TOLERANCE = 0.05

BLOCK = 512  # output pixels per side of a block read or composed at once

_MAX_LEVEL_READ = 2048  # level pixels per side of one read_region call


def read_downsampled(slide: Slide, origin: tuple[float, float], size: tuple[int, int],
                     downsample: tuple[float, float]) -> np.ndarray:
    """A region of the slide at a chosen resolution, read from the best pyramid level.

    Reads the coarsest level at most 5 % coarser than wanted, in pieces of at most
    2048 x 2048 level pixels, and resamples each (bilinear, antialiased) to the output grid.

    Parameters
    ----------
    slide : Slide
    origin : (float, float)
        Level-0 (x, y) of the region's top-left corner, px.
    size : (int, int)
        (width, height) of the result, px.
    downsample : (float, float)
        Level-0 px per result px along x and y.

    Returns
    -------
    (height, width, 3) uint8 array
        White outside the slide.
    """
    from PIL import Image

    from ips_path.tiling.grid import read_level_for_mpp

    width, height = (int(v) for v in size)
    downsample_x, downsample_y = (float(v) for v in downsample)
    level = read_level_for_mpp(1.0, slide.level_downsamples, min(downsample_x, downsample_y), _LEVEL_TOLERANCE)
    level_downsample = slide.level_downsamples[level]
    scale_x, scale_y = downsample_x / level_downsample, downsample_y / level_downsample  # level px per px
    step_x = max(1, int(_MAX_LEVEL_READ // scale_x))
    step_y = max(1, int(_MAX_LEVEL_READ // scale_y))
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, step_y):
        for left in range(0, width, step_x):
            piece_w, piece_h = min(step_x, width - left), min(step_y, height - top)
            # the piece in (fractional) level pixels, and the whole-pixel region that holds it
            x0 = (origin[0] + left * downsample_x) / level_downsample
            y0 = (origin[1] + top * downsample_y) / level_downsample
            x1, y1 = x0 + piece_w * scale_x, y0 + piece_h * scale_y
            read_x, read_y = math.floor(x0), math.floor(y0)
            read_w, read_h = max(1, math.ceil(x1) - read_x), max(1, math.ceil(y1) - read_y)
            region = slide.read_region((round(read_x * level_downsample), round(read_y * level_downsample)),
                                       level, (read_w, read_h))
            if region.shape[:2] != (piece_h, piece_w) or (x0, y0) != (read_x, read_y):
                region = np.asarray(Image.fromarray(region).resize(
                    (piece_w, piece_h), Image.Resampling.BILINEAR,
                    box=(x0 - read_x, y0 - read_y, x1 - read_x, y1 - read_y)))
            out[top:top + piece_h, left:left + piece_w] = region
    return out


def _blocks(width: int, height: int, block: int) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height) of the blocks covering a width x height raster, row-major."""
    return [(left, top, min(block, width - left), min(block, height - top))
            for top in range(0, height, block) for left in range(0, width, block)]


def slide_thumbnail(slide: Slide, max_size: int = 2048, threads: int = 2) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide with its long side ``max_size`` px (never enlarged), read block by block.

    Parameters
    ----------
    slide : Slide
    max_size : int
        Long side of the result, px.
    threads : int
        Blocks read in parallel.

    Returns
    -------
    image : (h, w, 3) uint8 array
    downsample : (float, float)
        Level-0 px per image px along x and y.
    """
    if max_size < 1:
        raise ValueError(f"thumbnail size must be positive, got {max_size}")
    width0, height0 = slide.dimensions
    scale = max(1.0, max(width0, height0) / max_size)
    width, height = max(1, round(width0 / scale)), max(1, round(height0 / scale))
    downsample = (width0 / width, height0 / height)
    image = np.empty((height, width, 3), dtype=np.uint8)

    def read_block(block: tuple[int, int, int, int]) -> None:
        left, top, block_w, block_h = block
        image[top:top + block_h, left:left + block_w] = read_downsampled(
            slide, (left * downsample[0], top * downsample[1]), (block_w, block_h), downsample)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(read_block, _blocks(width, height, BLOCK)))
    return image, downsample
