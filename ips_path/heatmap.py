"""Attention heatmaps from stored patch scores, without running the model again.

For one slide, :func:`render_slide_heatmaps` writes into its output folder:

``thumbnail.png``
    The slide, its long side ``thumbnail_size`` px (never enlarged).
``overlay.png``
    The same picture (same size) with the patches coloured by attention and a colour bar.
``patches.geojson``
    One QuPath tile object per patch (File > Import objects), in level-0 pixels.
``top_patches.png``
    The ``top_k`` most attended patches, as the model saw them, with rank and score.
``overlay.tiff``
    Optional: the overlay as a pyramidal TIFF at ``tiff_mpp`` µm/px that openslide, tiffslide
    and QuPath open, covering the same physical extent as the slide.

Colours show the percentile rank of each patch's attention logit within its slide (0 = least,
1 = most attended): logits are unbounded and their scale differs between slides and models,
ranks do not. They are drawn only over the patches (the tissue that was scored); the
background stays the plain thumbnail.

Memory does not grow with the number of patches beyond a few arrays of N numbers: the scores
are scattered into a small raster with one cell per grid position (``coords // stride``), and
every picture is composed block by block from that raster and pixels read at the needed
resolution (never level 0 of the whole slide).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.atomic import write_atomically
from ips_path.errors import BadInputError, IpspathError
from ips_path.progress import progress_bar
from ips_path.slide import Slide
from ips_path.store import TileStore, slide_id_from_path

__all__ = [
    "COLORMAPS",
    "HEATMAP_FILES",
    "Gallery",
    "HeatmapJob",
    "HeatmapResult",
    "ScoreGrid",
    "blend_overlay",
    "check_heatmap_options",
    "colormap_lut",
    "draw_colour_bar",
    "jobs_from_predictions",
    "jobs_from_tiles",
    "load_scores",
    "open_store_slide",
    "overlay_picture",
    "percentile_ranks",
    "read_downsampled",
    "render_heatmaps",
    "render_slide_heatmaps",
    "sample_grid",
    "score_grid",
    "slide_thumbnail",
    "smooth_grid",
    "top_patch_gallery",
    "write_overlay_tiff",
    "write_patches_geojson",
]

#: Perceptually uniform matplotlib colormaps offered for overlays.
COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis")
#: File names in heatmaps/<slide_id>/, by the keys :func:`render_slide_heatmaps` returns.
HEATMAP_FILES = {
    "thumbnail": "thumbnail.png",
    "overlay": "overlay.png",
    "geojson": "patches.geojson",
    "top_patches": "top_patches.png",
    "tiff": "overlay.tiff",
}
# A pyramid level up to this fraction coarser than wanted is read and scaled up a little:
# invisible in a picture, and up to 16x fewer pixels than the next finer level.
_LEVEL_TOLERANCE = 0.05
_BLOCK = 512  # output pixels per side of a block read or composed at once
_MAX_LEVEL_READ = 2048  # level pixels per side of one read_region call
_TIFF_TILE = 256
_TIFF_JPEG_QUALITY = 90
_GEOJSON_CHUNK = 20_000  # features formatted per write
_UNSCORED_FILL = np.float32(np.nan)


# -- scores on a grid ------------------------------------------------------------------------------

def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Percentile rank of each score among all of them.

    Parameters
    ----------
    scores : (N,) array
        Attention logits (any real numbers).

    Returns
    -------
    (N,) float32 array
        ``(rank - 1) / (N - 1)`` in [0, 1]: 0 for the lowest score, 1 for the highest; tied
        scores share their average rank. A single score gets 1.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size <= 1:
        return np.ones(scores.size, dtype=np.float32)
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    # runs of equal scores share the mean of their 0-based positions in sorted order
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], scores.size] - 1
    run_of = np.repeat(np.arange(len(starts)), ends - starts + 1)
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = ((starts + ends) / 2)[run_of]
    return (ranks / (scores.size - 1)).astype(np.float32)


@dataclass(frozen=True)
class ScoreGrid:
    """Patch values on the patch grid: one cell per grid position.

    Cell (row, col) holds the patch whose level-0 top-left is ``origin + (col, row) * stride``
    (the mean when imported coordinates put several patches in one cell).

    Attributes
    ----------
    values : (rows, cols) float32 array
        The value of each cell; NaN where no patch is (smoothed grids have values around
        the patches too).
    present : (rows, cols) bool array
        Where a patch is.
    origin : (int, int)
        Level-0 (x, y) of the top-left of cell (0, 0), px.
    stride : int
        Cell side, level-0 px.
    patch_size : int
        Patch side, level-0 px (larger than ``stride`` when patches overlap).
    interpolate : bool
        Sample ``values`` bilinearly between patch centres (smoothed grids) rather than as
        flat squares.
    """

    values: np.ndarray
    present: np.ndarray
    origin: tuple[int, int]
    stride: int
    patch_size: int
    interpolate: bool = False


def score_grid(coords: np.ndarray, values: np.ndarray, stride_level0: int, patch_size_level0: int) -> ScoreGrid:
    """Scatter per-patch values into a :class:`ScoreGrid`.

    Parameters
    ----------
    coords : (N, 2) int array
        Level-0 top-left (x, y) of the patches, px.
    values : (N,) array
        One value per patch (e.g. :func:`percentile_ranks` of the scores).
    stride_level0 : int
        Distance between neighbouring grid positions, level-0 px.
    patch_size_level0 : int
        Patch side, level-0 px.

    Returns
    -------
    ScoreGrid
        With about (slide width / stride) x (slide height / stride) cells at most.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(coords) != len(values):
        raise ValueError(f"{len(coords)} coords but {len(values)} values")
    if stride_level0 < 1 or patch_size_level0 < 1:
        raise ValueError(f"stride and patch size must be positive, got {stride_level0} and {patch_size_level0}")
    if len(coords) == 0:
        return ScoreGrid(np.full((1, 1), _UNSCORED_FILL), np.zeros((1, 1), bool), (0, 0), stride_level0,
                         patch_size_level0)
    origin = coords.min(axis=0)
    cols, rows = ((coords - origin) // stride_level0).T
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols
    counts = np.bincount(flat, minlength=shape[0] * shape[1]).reshape(shape)
    sums = np.bincount(flat, weights=values, minlength=shape[0] * shape[1]).reshape(shape)
    present = counts > 0
    grid_values = np.full(shape, _UNSCORED_FILL, dtype=np.float32)
    grid_values[present] = sums[present] / counts[present]
    return ScoreGrid(grid_values, present, (int(origin[0]), int(origin[1])), int(stride_level0),
                     int(patch_size_level0))


def smooth_grid(grid: ScoreGrid, sigma_level0: float) -> ScoreGrid:
    """Gaussian smoothing of the patch values, ignoring cells without a patch.

    Normalised convolution: ``G * (values x present) / G * present``, so the tissue edge is not
    pulled towards zero; the result is also defined a few sigma around the patches, which
    :func:`sample_grid` uses to interpolate up to the edge.

    Parameters
    ----------
    grid : ScoreGrid
    sigma_level0 : float
        Standard deviation of the Gaussian, level-0 px; 0 returns ``grid`` unchanged.
    """
    from scipy.ndimage import gaussian_filter

    if sigma_level0 <= 0:
        return grid
    sigma_cells = sigma_level0 / grid.stride
    weight = gaussian_filter(grid.present.astype(np.float32), sigma_cells, mode="constant")
    total = gaussian_filter(np.where(grid.present, grid.values, 0).astype(np.float32), sigma_cells,
                            mode="constant")
    defined = weight > 1e-6
    smoothed = np.full(grid.values.shape, _UNSCORED_FILL, dtype=np.float32)
    smoothed[defined] = np.clip(total[defined] / weight[defined], 0, 1)
    return replace(grid, values=smoothed, interpolate=True)


def _covering_cells(positions: np.ndarray, origin: int, grid: ScoreGrid,
                    n_cells: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Along one axis: for each candidate offset, (cell index, whether that cell's patch covers
    the position). A patch covers [start, start + patch_size): with overlap, earlier cells too."""
    relative = positions - origin
    last = np.floor(relative / grid.stride).astype(np.int64)
    candidates = []
    for back in range(-(-grid.patch_size // grid.stride)):
        cells = last - back
        covers = (cells >= 0) & (cells < n_cells) & (relative < cells * grid.stride + grid.patch_size)
        candidates.append((np.clip(cells, 0, n_cells - 1), covers))
    return candidates


def _bilinear_weights(positions: np.ndarray, origin: int, grid: ScoreGrid,
                      n_cells: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Along one axis: (cell index, weight) of the two patch centres around each position."""
    centres = (positions - origin - grid.patch_size / 2) / grid.stride
    lower = np.floor(centres).astype(np.int64)
    fraction = (centres - lower).astype(np.float32)
    pairs = []
    for cells, weight in ((lower, 1 - fraction), (lower + 1, fraction)):
        inside = (cells >= 0) & (cells < n_cells)
        pairs.append((np.clip(cells, 0, n_cells - 1), np.where(inside, weight, 0).astype(np.float32)))
    return pairs


def sample_grid(grid: ScoreGrid, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of the grid at level-0 points of a regular raster.

    Parameters
    ----------
    grid : ScoreGrid
    xs : (w,) array
        Level-0 x of the raster's pixel centres, px.
    ys : (h,) array
        Level-0 y of the raster's pixel centres, px.

    Returns
    -------
    values : (h, w) float32 array
        Mean value of the patches covering each point (bilinear between patch centres for
        smoothed grids); 0 outside the footprint.
    footprint : (h, w) bool array
        Whether a patch covers the point.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    n_rows, n_cols = grid.values.shape
    row_options = _covering_cells(ys, grid.origin[1], grid, n_rows)
    col_options = _covering_cells(xs, grid.origin[0], grid, n_cols)
    # Which patches cover a point changes only where a patch starts or ends: work on one point
    # per run of points with the same covering cells, then spread the result to all points.
    row_run, row_first = _runs(row_options)
    col_run, col_first = _runs(col_options)
    run_shape = (len(row_first), len(col_first))
    total = np.zeros(run_shape, dtype=np.float32)
    count = np.zeros(run_shape, dtype=np.float32)
    for rows, row_covers in row_options:
        for cols, col_covers in col_options:
            cells = (rows[row_first, None], cols[None, col_first])
            covered = row_covers[row_first, None] & col_covers[None, col_first] & grid.present[cells]
            total += np.where(covered, grid.values[cells], 0)
            count += covered
    spread = (row_run[:, None], col_run[None, :])
    footprint = (count > 0)[spread]
    if not grid.interpolate:
        mean = np.divide(total, count, out=np.zeros(run_shape, dtype=np.float32), where=count > 0)
        return mean[spread], footprint
    shape = (len(ys), len(xs))
    total, weight_sum = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    defined = ~np.isnan(grid.values)
    filled = np.where(defined, grid.values, 0)
    for rows, row_weight in _bilinear_weights(ys, grid.origin[1], grid, n_rows):
        for cols, col_weight in _bilinear_weights(xs, grid.origin[0], grid, n_cols):
            cells = (rows[:, None], cols[None, :])
            weight = row_weight[:, None] * col_weight[None, :] * defined[cells]
            total += weight * filled[cells]
            weight_sum += weight
    values = np.divide(total, weight_sum, out=np.zeros(shape, dtype=np.float32), where=footprint & (weight_sum > 0))
    return values, footprint


def _runs(options: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive positions with the same candidate cells and cover flags (see
    :func:`_covering_cells`): the run of each position, and the first position of each run."""
    keys = np.stack([part for option in options for part in option], axis=1)
    starts = np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)] if len(keys) else np.zeros(0, dtype=bool)
    return np.cumsum(starts) - 1, np.flatnonzero(starts)


# -- colours ---------------------------------------------------------------------------------------

@functools.cache
def colormap_lut(colormap: str = "viridis") -> np.ndarray:
    """The colormap as a read-only (256, 3) uint8 lookup table (index = round(value * 255)).

    Parameters
    ----------
    colormap : str
        One of :data:`COLORMAPS` (matplotlib's perceptually uniform maps).
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}: use one of {', '.join(COLORMAPS)}")
    from matplotlib import colormaps  # the colormap tables only; pyplot is never imported

    lut = np.rint(colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    lut.flags.writeable = False  # shared by every caller (cached)
    return lut


def blend_overlay(image: np.ndarray, values: np.ndarray, footprint: np.ndarray, colormap: str = "viridis",
                  alpha: float = 0.5) -> np.ndarray:
    """Colour ``values`` with ``colormap`` and blend them over ``image`` inside ``footprint``.

    Parameters
    ----------
    image : (h, w, 3) uint8 array
    values : (h, w) array
        Values in [0, 1] (clipped).
    footprint : (h, w) bool array
        Where to draw; ``image`` is kept unchanged elsewhere.
    colormap : str
        One of :data:`COLORMAPS`.
    alpha : float
        Opacity of the colours, 0-1.

    Returns
    -------
    (h, w, 3) uint8 array
        A new image.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    colours = colormap_lut(colormap).astype(np.float32)[np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)]
    under = np.asarray(image, dtype=np.float32)
    # blending the whole block and choosing per pixel beats indexing with the footprint
    blended = (under + alpha * (colours - under) + 0.5).astype(np.uint8)
    return np.where(footprint[..., None], blended, np.asarray(image, dtype=np.uint8))


def _legend_font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_colour_bar(picture: np.ndarray, colormap: str = "viridis", avoid: np.ndarray | None = None,
                    title: str = "attention (rank in slide)") -> tuple[int, int, int, int] | None:
    """Draw a colour bar legend (low .. high) into a corner of ``picture``, in place.

    Parameters
    ----------
    picture : (h, w, 3) uint8 array
        Modified in place.
    colormap : str
        One of :data:`COLORMAPS`.
    avoid : (h, w) bool array, optional
        Pixels not to cover if possible (the patches): the corner where the legend covers the
        fewest of them is used; default: the bottom-right corner.
    title : str
        Text above the bar.

    Returns
    -------
    (x0, y0, x1, y1) or None
        The legend's box in pixels (x1, y1 exclusive); None when the picture is too small
        for a legible legend (it is then left unchanged).
    """
    from PIL import Image, ImageDraw

    height, width = picture.shape[:2]
    font_px = int(np.clip(round(max(width, height) / 90), 9, 22))
    pad = max(3, font_px // 2)
    font = _legend_font(font_px)
    bar_w = max(10 * font_px, int(font.getlength(title)))
    box_w = bar_w + 2 * pad
    box_h = 3 * pad + 3 * font_px + pad  # title, bar, labels
    margin = pad
    if box_w + 2 * margin > width or box_h + 2 * margin > height:
        return None
    corners = [(width - margin - box_w, height - margin - box_h), (margin, height - margin - box_h),
               (width - margin - box_w, margin), (margin, margin)]
    if avoid is not None:
        covered = [avoid[y:y + box_h, x:x + box_w].mean() for x, y in corners]
        x0, y0 = corners[int(np.argmin(covered))]
    else:
        x0, y0 = corners[0]
    legend = Image.new("RGB", (box_w, box_h), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    draw.rectangle((0, 0, box_w - 1, box_h - 1), outline=(160, 160, 160))
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    bar_top = 2 * pad + font_px
    lut = colormap_lut(colormap)
    gradient = lut[np.rint(np.linspace(0, 255, bar_w)).astype(int)]
    legend.paste(Image.fromarray(np.ascontiguousarray(np.broadcast_to(gradient, (font_px, bar_w, 3)))),
                 (pad, bar_top))
    label_top = bar_top + font_px + pad
    draw.text((pad, label_top), "low", fill=(0, 0, 0), font=font)
    draw.text((pad + bar_w - font.getlength("high"), label_top), "high", fill=(0, 0, 0), font=font)
    picture[y0:y0 + box_h, x0:x0 + box_w] = np.asarray(legend)
    return x0, y0, x0 + box_w, y0 + box_h


# -- slide pixels ----------------------------------------------------------------------------------

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
        list(pool.map(read_block, _blocks(width, height, _BLOCK)))
    return image, downsample


def _pixel_centres(start: int, count: int, downsample: float) -> np.ndarray:
    """Level-0 coordinates of the centres of ``count`` pixels from pixel ``start`` on."""
    return (np.arange(start, start + count) + 0.5) * downsample


def overlay_picture(thumbnail: np.ndarray, downsample: tuple[float, float], grid: ScoreGrid,
                    colormap: str = "viridis", alpha: float = 0.5,
                    colour_bar: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The attention overlay on a slide picture, composed in bands of rows.

    Parameters
    ----------
    thumbnail : (h, w, 3) uint8 array
        The slide picture (from :func:`slide_thumbnail`).
    downsample : (float, float)
        Level-0 px per picture px along x and y.
    grid : ScoreGrid
        Values in [0, 1] (percentile ranks).
    colormap, alpha
        As for :func:`blend_overlay`.
    colour_bar : bool
        Draw a colour bar legend in the corner with the fewest patches.

    Returns
    -------
    overlay : (h, w, 3) uint8 array
        The picture, with ``thumbnail`` pixels kept outside the patches and the legend.
    legend_box : (x0, y0, x1, y1) or None
        Where the legend is (see :func:`draw_colour_bar`).
    """
    height, width = thumbnail.shape[:2]
    xs = _pixel_centres(0, width, downsample[0])
    overlay = np.empty_like(thumbnail)
    footprint = np.empty((height, width), dtype=bool)
    for top in range(0, height, _BLOCK):
        rows = slice(top, min(height, top + _BLOCK))
        values, footprint[rows] = sample_grid(grid, xs, _pixel_centres(top, rows.stop - top, downsample[1]))
        overlay[rows] = blend_overlay(thumbnail[rows], values, footprint[rows], colormap, alpha)
    legend_box = draw_colour_bar(overlay, colormap, avoid=footprint) if colour_bar else None
    return overlay, legend_box


@dataclass(frozen=True)
class Gallery:
    """A picture of the top-k patches: ``image``, the patch ``indices`` (store order) in
    rank order, and each patch's ``boxes`` (x0, y0, x1, y1) in the picture."""

    image: np.ndarray
    indices: np.ndarray
    boxes: np.ndarray


def top_patch_gallery(slide: Slide, coords: np.ndarray, scores: np.ndarray, *, top_k: int = 16, read_level: int = 0,
                      read_size: int = 256, patch_size: int | None = None, columns: int | None = None) -> Gallery:
    """The ``top_k`` highest-scoring patches side by side, with rank and score under each.

    Parameters
    ----------
    slide : Slide
    coords : (N, 2) int array
        Level-0 top-left (x, y) of the patches, px.
    scores : (N,) array
        Attention logits; ties keep store order.
    top_k : int
        Number of patches shown (fewer when the slide has fewer).
    read_level, read_size : int
        Pyramid level and patch side there in px (the tile store's ``read_level``/``read_size``).
    patch_size : int, optional
        Side the patch is shown at, px (the store's ``patch_size``: what the model saw);
        default ``read_size``.
    columns : int, optional
        Patches per row; default: a square layout.

    Returns
    -------
    Gallery
    """
    from PIL import Image, ImageDraw

    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    patch_size = read_size if patch_size is None else int(patch_size)
    order = np.argsort(-scores, kind="stable")[:max(0, top_k)]
    count = len(order)
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    n_rows = max(1, math.ceil(count / columns))
    font_px = int(np.clip(patch_size // 12, 10, 18))
    font = _legend_font(font_px)
    captions = [f"#{rank}  {scores[index]:.4g}" for rank, index in enumerate(order, start=1)]
    gap = max(4, font_px // 2)
    cell_w = max([patch_size] + [math.ceil(font.getlength(c)) for c in captions])
    cell_h = patch_size + font_px + gap
    gallery = Image.new("RGB", (gap + columns * (cell_w + gap), gap + n_rows * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(gallery)
    boxes = np.zeros((count, 4), dtype=np.int64)
    for position, (index, caption) in enumerate(zip(order, captions, strict=True)):
        x, y = (int(v) for v in coords[index])
        patch = Image.fromarray(slide.read_region((x, y), read_level, (read_size, read_size)))
        if read_size != patch_size:
            patch = patch.resize((patch_size, patch_size), Image.Resampling.BILINEAR)
        left = gap + (position % columns) * (cell_w + gap)
        top = gap + (position // columns) * (cell_h + gap)
        gallery.paste(patch, (left, top))
        draw.text((left, top + patch_size + gap // 2), caption, fill=(0, 0, 0), font=font)
        boxes[position] = (left, top, left + patch_size, top + patch_size)
    return Gallery(np.asarray(gallery), order, boxes)


# -- files -----------------------------------------------------------------------------------------

def _save_png(image: np.ndarray, path: Path) -> Path:
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
        values, footprint = sample_grid(grid, _pixel_centres(left, _TIFF_TILE, downsample[0]),
                                        _pixel_centres(top, _TIFF_TILE, downsample[1]))
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


# -- one slide -------------------------------------------------------------------------------------

def _check_scores(store: TileStore, scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (store.n_patches,):
        raise BadInputError(f"{store.path}: {scores.shape} scores for {store.n_patches} patches; the scores belong "
                            "to another tiling: run `ipspath predict` again on this tile store")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise BadInputError(f"{store.path}: {bad} of {store.n_patches} attention scores are not finite (NaN or "
                            "infinite); run `ipspath predict` again")
    return scores


def open_store_slide(store: TileStore) -> Slide:
    """The slide a tile store was made from, opened with the store's backend.

    Raises
    ------
    BadInputError
        When the file is missing or unreadable, or its size is not the tiled slide's.
    """
    slide = Slide(store.slide_path, backend=store.attrs.get("backend", "auto"))
    tiled = store.attrs.get("slide_dimensions")
    if tiled is not None and tuple(tiled) != slide.dimensions:
        slide.close()
        raise BadInputError(f"{store.slide_path}: the slide is {slide.dimensions[0]}x{slide.dimensions[1]} px but "
                            f"{store.path} was tiled from a {tiled[0]}x{tiled[1]} px slide; tile it again")
    return slide


def check_heatmap_options(options: Mapping[str, Any]) -> None:
    """Refuse bad options of :func:`render_slide_heatmaps` with one line, before any slide is rendered.

    Raises
    ------
    BadInputError
        An unknown option, or a value out of its range (NaN and infinity included).
    """
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise BadInputError(f"unknown heatmap option(s) {', '.join(unknown)}; use {', '.join(_OPTION_NAMES)}")

    def number(name: str, low: float, high: float = math.inf, what: str = "") -> None:
        value = options.get(name)
        if value is None:
            return
        if not isinstance(value, (int, float)) or not (math.isfinite(value) and low <= value <= high):
            flag = "--" + name.replace("_", "-")
            raise BadInputError(f"{flag} {value!r}: must be {what}")

    number("thumbnail_size", 16, what="at least 16 px")
    number("smooth_sigma_um", 0, what="a finite µm >= 0")
    number("alpha", 0, 1, what="an opacity between 0 and 1")
    number("top_k", 0, what="a number of patches >= 0")
    number("tiff_mpp", 1e-6, what="a finite µm/px > 0")
    number("threads", 1, what="at least 1 thread")
    if options.get("colormap", "viridis") not in COLORMAPS:
        raise BadInputError(f"--colormap {options['colormap']!r}: use one of {', '.join(COLORMAPS)}")


_OPTION_NAMES = ("thumbnail_size", "smooth_sigma_um", "colormap", "alpha", "top_k", "geojson", "tiff_mpp",
                 "threads", "progress")


def render_slide_heatmaps(
    store: TileStore,
    scores: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    slide: Slide | None = None,
    thumbnail_size: int = 2048,
    smooth_sigma_um: float = 0.0,
    colormap: str = "viridis",
    alpha: float = 0.5,
    top_k: int = 16,
    geojson: bool = True,
    tiff_mpp: float | None = None,
    threads: int = 2,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the heatmap files of one slide (see the module docstring) into ``out_dir``.

    Parameters
    ----------
    store : TileStore
        The slide's tile store (patch coordinates and geometry).
    scores : (N,) array
        Attention logit of each patch, in store order (e.g. ``store.read_array("scores/<run>")``).
    out_dir : path-like
        Folder for the files (created); existing files are replaced.
    slide : Slide, optional
        The open slide; default: the store's slide file, opened and closed here.
    thumbnail_size : int
        Long side of thumbnail.png and overlay.png, px (never more than the slide's).
    smooth_sigma_um : float
        Gaussian smoothing of the colours across neighbouring patches, standard deviation in
        µm; 0 draws each patch as a flat square.
    colormap : str
        One of :data:`COLORMAPS`.
    alpha : float
        Opacity of the colours over the slide, 0-1.
    top_k : int
        Patches in top_patches.png; 0 skips it.
    geojson : bool
        Write patches.geojson.
    tiff_mpp : float, optional
        Write overlay.tiff at this pixel size, µm/px (e.g. 8).
    threads : int
        Threads reading slide pixels and composing TIFF tiles.
    progress : bool
        Show a progress bar over the TIFF tiles.

    Returns
    -------
    dict
        Written paths by kind: "thumbnail", "overlay", and "geojson", "top_patches", "tiff"
        when written.

    Raises
    ------
    BadInputError
        Scores that do not match the store, a missing or changed slide file.
    """
    scores = _check_scores(store, scores)
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}: use one of {', '.join(COLORMAPS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    level0_mpp = float(np.mean(store.level0_mpp))
    ranks = percentile_ranks(scores)
    grid = smooth_grid(score_grid(store.coords, ranks, store.stride_level0, store.patch_size_level0),
                       smooth_sigma_um / level0_mpp)
    own_slide = slide is None
    slide = open_store_slide(store) if slide is None else slide
    written: dict[str, Path] = {}
    try:
        thumbnail, downsample = slide_thumbnail(slide, thumbnail_size, threads)
        overlay, _ = overlay_picture(thumbnail, downsample, grid, colormap, alpha)
        written["thumbnail"] = _save_png(thumbnail, out_dir / HEATMAP_FILES["thumbnail"])
        written["overlay"] = _save_png(overlay, out_dir / HEATMAP_FILES["overlay"])
        del thumbnail, overlay
        if geojson:
            written["geojson"] = write_patches_geojson(out_dir / HEATMAP_FILES["geojson"], store.coords,
                                                       store.patch_size_level0, scores, ranks=ranks,
                                                       colormap=colormap)
        if top_k > 0:
            gallery = top_patch_gallery(slide, store.coords, scores, top_k=top_k, read_level=store.read_level,
                                        read_size=store.read_size, patch_size=store.patch_size)
            written["top_patches"] = _save_png(gallery.image, out_dir / HEATMAP_FILES["top_patches"])
        if tiff_mpp is not None:
            written["tiff"] = write_overlay_tiff(out_dir / HEATMAP_FILES["tiff"], slide, grid, tiff_mpp, level0_mpp,
                                                 colormap=colormap, alpha=alpha, threads=threads, progress=progress)
    finally:
        if own_slide:
            slide.close()
    return written


# -- many slides -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatmapJob:
    """One slide to render: its tile store, the score run and the output folder."""

    slide_id: str
    store: Path
    run: str
    out_dir: Path


@dataclass(frozen=True)
class HeatmapResult:
    """What happened to one slide: ``files`` written, or ``error`` (one line)."""

    slide_id: str
    out_dir: Path
    files: dict[str, Path]
    error: str | None = None
    bad_input: bool = False


def _find_stores(tiles: Path) -> list[Path]:
    if not tiles.exists():
        raise BadInputError(f"{tiles}: no such tile store or folder; give the --out folder of `ipspath tile`")
    if tiles.suffix == ".zarr" or (tiles / "zarr.json").exists():
        return [tiles]
    stores = sorted(p for p in tiles.glob("*.zarr") if p.is_dir())
    if not stores:
        raise BadInputError(f"{tiles}: no tile stores (*.zarr) in this folder; run `ipspath tile` first")
    return stores


def load_scores(store: TileStore, run: str) -> np.ndarray:
    """The attention logits ``scores/<run>`` of a store, checked.

    Raises
    ------
    BadInputError
        When the store has no such scores (naming the runs it has and ``ipspath predict``),
        or they do not match its patches.
    """
    name = f"scores/{run}"
    if not store.has_array(name):
        runs = ", ".join(store.array_names("scores")) or "none"
        raise BadInputError(f"{store.path}: no attention scores {name!r} (score runs in the store: {runs}); "
                            f"score the slide first with `ipspath predict`, or pick a run with --run")
    return _check_scores(store, store.read_array(name))


def jobs_from_tiles(tiles: str | os.PathLike, run: str | None, out_dir: str | os.PathLike,
                    slide_ids: Sequence[str] = ()) -> list[HeatmapJob]:
    """The slides to render from tile stores: ``out_dir/<slide_id>/`` for each.

    Parameters
    ----------
    tiles : path-like
        One ``.zarr`` tile store or a folder of them.
    run : str, optional
        Score run (``scores/<run>`` in the stores); default: the only run the stores have.
    out_dir : path-like
        Parent of the per-slide folders.
    slide_ids : sequence of str
        Only these slides (default: every store).

    Raises
    ------
    BadInputError
        Unknown slide ids, no common run, or stores without the run's scores; all checked
        before anything is rendered.
    """
    stores = {}
    for path in _find_stores(Path(tiles)):
        store = TileStore.open(path)
        stores[str(store.attrs.get("slide_id") or slide_id_from_path(path))] = store
    if slide_ids:
        unknown = [s for s in slide_ids if s not in stores]
        if unknown:
            raise BadInputError(f"{tiles}: no tile store for slide(s) {', '.join(unknown)} "
                                f"({len(stores)} stores there, e.g. {next(iter(stores))})")
        stores = {s: stores[s] for s in dict.fromkeys(slide_ids)}
    if run is None:
        runs = {name for store in stores.values() for name in store.array_names("scores")}
        if len(runs) != 1:
            found = ", ".join(sorted(runs)) or "none"
            raise BadInputError(f"{tiles}: give --run: the stores hold score runs: {found}"
                                + ("" if runs else "; score the slides first with `ipspath predict`"))
        run = runs.pop()
    missing = [store for store in stores.values() if not store.has_array(f"scores/{run}")]
    if missing:
        more = f" (and {len(missing) - 1} more stores)" if len(missing) > 1 else ""
        runs = ", ".join(missing[0].array_names("scores")) or "none"
        raise BadInputError(f"{missing[0].path}{more}: no attention scores 'scores/{run}' (score runs in the "
                            f"store: {runs}); score the slides first with `ipspath predict`")
    return [HeatmapJob(slide_id, store.path, run, Path(out_dir) / slide_id) for slide_id, store in stores.items()]


def jobs_from_predictions(pred_dir: str | os.PathLike, slide_ids: Sequence[str] = (),
                          out_dir: str | os.PathLike | None = None) -> list[HeatmapJob]:
    """The slides to render for an ``ipspath predict`` output folder.

    Reads ``run.json`` (keys "run" and "tiles") and takes the slides whose status is "done" in
    ``predictions.csv`` (every store in the tiles folder when there is no CSV), or ``slide_ids``.
    Output goes to ``out_dir/<slide_id>/``, by default ``PRED_DIR/heatmaps/<slide_id>/``.

    Raises
    ------
    BadInputError
        No or unreadable run.json, a tiles folder that is gone, and as :func:`jobs_from_tiles`.
    """
    from ips_path.predictions import PredictionFolder

    folder = PredictionFolder(pred_dir)
    if not folder.run_file.exists():
        raise BadInputError(f"{pred_dir}: not an `ipspath predict` output folder (no run.json)")
    info = folder.read_run()
    missing_keys = [k for k in ("run", "tiles") if not info.get(k)]
    if missing_keys:
        raise BadInputError(f"{folder.run_file}: no {' or '.join(missing_keys)} recorded; use "
                            "`ipspath heatmap --tiles TILES --run RUN -o OUT` instead")
    tiles = Path(info["tiles"])
    if not tiles.is_absolute() and (folder.root / tiles).exists():
        tiles = folder.root / tiles
    if not slide_ids and folder.predictions_csv.exists():
        slide_ids = [row.slide_id for row in folder.read_predictions()[1] if row.ok]
        if not slide_ids:
            raise BadInputError(f"{folder.predictions_csv}: no slide was predicted (status done or reused)")
    return jobs_from_tiles(tiles, str(info["run"]), folder.root / "heatmaps" if out_dir is None else out_dir,
                           slide_ids)


def render_heatmaps(jobs: Sequence[HeatmapJob], *, progress: bool = True, **options: Any) -> list[HeatmapResult]:
    """Render each job with :func:`render_slide_heatmaps`; a failing slide does not stop the others.

    Parameters
    ----------
    jobs : sequence of HeatmapJob
    progress : bool
        Show a progress bar over the slides.
    **options
        Passed to :func:`render_slide_heatmaps` (thumbnail_size, smooth_sigma_um, colormap,
        alpha, top_k, geojson, tiff_mpp, threads).

    Returns
    -------
    list of HeatmapResult, in job order
    """
    results = []
    with progress_bar(len(jobs), "heatmaps", unit="slide", enabled=progress) as bar:
        for job in jobs:
            try:
                store = TileStore.open(job.store)
                files = render_slide_heatmaps(store, load_scores(store, job.run), job.out_dir, **options)
                results.append(HeatmapResult(job.slide_id, job.out_dir, files))
            except IpspathError as exc:
                results.append(HeatmapResult(job.slide_id, job.out_dir, {}, str(exc),
                                             isinstance(exc, BadInputError)))
            bar.update()
    return results
