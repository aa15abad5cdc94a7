"""Low-resolution pictures of a slide: a region at any downsample, and whole-slide thumbnails.

Both read through :func:`ips_path.slides.slide.read_low_resolution` with bilinear resampling onto
the exact grid asked for.
"""

from __future__ import annotations

import numpy as np

from ips_path.slides.slide import Slide, read_low_resolution

__all__ = ["BLOCK", "read_downsampled", "slide_thumbnail"]

# A pyramid level up to this fraction coarser than wanted is read and scaled up a little:
# invisible in a picture, and up to 16x fewer pixels than the next finer level.
_LEVEL_TOLERANCE = 0.05

BLOCK = 512  # output pixels per side of a block read or composed at once


def read_downsampled(slide: Slide, origin: tuple[float, float], size: tuple[int, int],
                     downsample: tuple[float, float]) -> np.ndarray:
    """A region of the slide at a chosen resolution, read from the best pyramid level.

    Reads the coarsest level at most 5 % coarser than wanted, in pieces of at most
    2048 x 2048 level pixels, and resamples each (bilinear, antialiased) to the output grid.
    Raises :class:`~ips_path.runtime.errors.BadInputError` naming the region when the file is damaged.

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
    image, _ = read_low_resolution(slide, downsample, origin, size, level_tolerance=_LEVEL_TOLERANCE)
    return image


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
    image, _ = read_low_resolution(slide, downsample, (0.0, 0.0), (width, height), level_tolerance=_LEVEL_TOLERANCE,
                                   compose_block=BLOCK, threads=max(1, threads))
    return image, downsample
