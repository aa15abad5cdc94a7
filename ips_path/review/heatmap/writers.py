"""File writers: PNG pictures, the QuPath GeoJSON of the patches, the pyramidal TIFF overlay; all atomic."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.review.heatmap.drawing import (
    blend_overlay,
    colormap_lut,
)
from ips_path.review.heatmap.grid import ScoreGrid, percentile_ranks, pixel_centres, sample_grid
from ips_path.review.heatmap.lowres import read_downsampled
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.progress import progress_bar
from ips_path.slides.slide import Slide

__all__ = ["save_png", "write_overlay_tiff", "write_patches_geojson"]

_TIFF_TILE = 256

_TIFF_JPEG_QUALITY = 90

_GEOJSON_CHUNK = 20_000  # features formatted per write


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    # zlib level 3: a third of the time of the default 6 for about 7 % more bytes on slide pictures
    return write_atomically(path, lambda target: Image.fromarray(image).save(target, format="PNG",
                                                                               compress_level=3))


def write_patches_geojson(path: str | os.PathLike, coords: np.ndarray, patch_size_level0: int, scores: np.ndarray,
                          *, ranks: np.ndarray | None = None, colormap: str = "viridis") -> Path:
    """Write the patches as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

    One Polygon per patch in level-0 pixel coordinates (origin top-left), with properties
    ``objectType: "tile"``, ``classification: {"name": "attention"}``, ``color`` (the overlay
    colour of the patch) and ``measurements: {"attention": logit, "attention_rank": percentile
    rank 0-1}``. Written in chunks: memory stays bounded for any number of patches.

    Parameters
    ----------
    path : path-like
        Output file (written to a temporary sibling and renamed).
    coords : (N, 2) int array
        Level-0 top-left (x, y), px.
    patch_size_level0 : int
        Patch side, level-0 px.
    scores : (N,) array
        Attention logits (finite); written with 9 significant digits (exact for float32).
    ranks : (N,) array, optional
        Percentile ranks; default :func:`percentile_ranks` of ``scores``.
    colormap : str
        Colours of the features, one of :data:`COLORMAPS`.
    """
    path = Path(path)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    ranks = percentile_ranks(scores) if ranks is None else np.asarray(ranks, dtype=np.float32).reshape(-1)
    if not len(coords) == len(scores) == len(ranks):
        raise ValueError(f"{len(coords)} coords, {len(scores)} scores and {len(ranks)} ranks")
    lut = colormap_lut(colormap)
    top_colour = ",".join(str(int(v)) for v in lut[-1])
    # one feature; the only per-patch Python work is this %-formatting
    template = (
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[%d,%d],[%d,%d],[%d,%d],[%d,%d],[%d,%d]]]},'
        '"properties":{"objectType":"tile","classification":{"name":"attention","color":[' + top_colour + ']},'
        '"color":[%d,%d,%d],"measurements":{"attention":%.9g,"attention_rank":%.6g}}}'
    )

    def write(target: Path) -> None:
        with open(target, "w", encoding="utf-8") as out:
            out.write('{"type":"FeatureCollection","features":[\n')
            for start in range(0, len(coords), _GEOJSON_CHUNK):
                chunk = slice(start, start + _GEOJSON_CHUNK)
                x0, y0 = coords[chunk, 0], coords[chunk, 1]
                x1, y1 = x0 + patch_size_level0, y0 + patch_size_level0
                colours = lut[np.rint(np.clip(ranks[chunk], 0, 1) * 255).astype(np.uint8)]
                columns = (x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, colours[:, 0], colours[:, 1], colours[:, 2],
                           scores[chunk].astype(np.float64), ranks[chunk].astype(np.float64))
                rows = zip(*(column.tolist() for column in columns), strict=True)
                if start:
                    out.write(",\n")
                out.write(",\n".join(template % row for row in rows))
            out.write("\n]}\n")

    return write_atomically(path, write)


def _pyramid_sizes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """Level sizes halving from (width, height) until one tile holds the level."""
    sizes = [(width, height)]
    while max(sizes[-1]) > tile:
        sizes.append((max(1, -(-sizes[-1][0] // 2)), max(1, -(-sizes[-1][1] // 2))))
    return sizes


def write_overlay_tiff(path: str | os.PathLike, slide: Slide, grid: ScoreGrid, mpp: float, level0_mpp: float, *,
                       colormap: str = "viridis", alpha: float = 0.5, threads: int = 2,
                       progress: bool = False) -> Path:
    """Write the overlay as a tiled, JPEG-compressed, pyramidal RGB TIFF at ``mpp`` µm/px.

    Level 0 covers the slide's physical extent at about ``mpp`` (its pixel count is rounded,
    and the resolution tags, in pixels per centimetre, give the exact pixel size); each further
    level halves it down to one 256 px tile. Tiles are composed one at a time (slide pixels
    read at that resolution, colours blended as in :func:`overlay_picture`) on ``threads``
    threads, so memory does not depend on the slide size. openslide reads it as a
    "generic-tiff" with its mpp, tiffslide and QuPath too.

    Parameters
    ----------
    path : path-like
        Output file (written to a temporary sibling and renamed).
    slide : Slide
    grid : ScoreGrid
        Values in [0, 1].
    mpp : float
        Pixel size of level 0, µm/px (e.g. 8).
    level0_mpp : float
        The slide's level-0 pixel size, µm/px.
    colormap, alpha
        As for :func:`blend_overlay`.
    threads : int
        Tiles composed in parallel.
    progress : bool
        Show a progress bar over the tiles.
    """
    import tifffile

    path = Path(path)
    if not (math.isfinite(mpp) and mpp > 0):
        raise BadInputError(f"the TIFF pixel size must be a positive number of µm/px, got {mpp}")
    width0, height0 = slide.dimensions
    scale = mpp / level0_mpp
    sizes = _pyramid_sizes(max(1, round(width0 / scale)), max(1, round(height0 / scale)), _TIFF_TILE)
    n_tiles = sum(-(-w // _TIFF_TILE) * -(-h // _TIFF_TILE) for w, h in sizes)

    def compose_tile(downsample: tuple[float, float], column: int, row: int) -> np.ndarray:
        left, top = column * _TIFF_TILE, row * _TIFF_TILE
        pixels = read_downsampled(slide, (left * downsample[0], top * downsample[1]), (_TIFF_TILE, _TIFF_TILE),
                                  downsample)
        values, footprint = sample_grid(grid, pixel_centres(left, _TIFF_TILE, downsample[0]),
                                        pixel_centres(top, _TIFF_TILE, downsample[1]))
        return blend_overlay(pixels, values, footprint, colormap, alpha)

    def level_tiles(pool: ThreadPoolExecutor, width: int, height: int, bar: Any) -> Iterator[np.ndarray]:
        downsample = (width0 / width, height0 / height)
        columns = range(-(-width // _TIFF_TILE))
        for row in range(-(-height // _TIFF_TILE)):  # one row of tiles in flight at a time
            for tile in pool.map(functools.partial(compose_tile, downsample, row=row), columns):
                bar.update()
                yield tile

    def write(target: Path) -> None:
        with (tifffile.TiffWriter(target, bigtiff=sum(w * h * 3 for w, h in sizes) > 2**31) as tif,
              ThreadPoolExecutor(max(1, threads)) as pool,
              progress_bar(n_tiles, "overlay.tiff", unit="tile", enabled=progress) as bar):
            for index, (width, height) in enumerate(sizes):
                px_per_cm_x = 1e4 / (level0_mpp * width0 / width)
                px_per_cm_y = 1e4 / (level0_mpp * height0 / height)
                tif.write(level_tiles(pool, width, height, bar), shape=(height, width, 3), dtype=np.uint8,
                          tile=(_TIFF_TILE, _TIFF_TILE), photometric="rgb", compression="jpeg",
                          compressionargs={"level": _TIFF_JPEG_QUALITY}, subfiletype=0 if index == 0 else 1,
                          resolution=(px_per_cm_x, px_per_cm_y), resolutionunit="CENTIMETER", metadata=None,
                          description="ipspath attention overlay" if index == 0 else None)

    return write_atomically(path, write)
