"""The heatmap files of one slide, from its tile store and stored scores."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.review.heatmap.drawing import (
    COLORMAPS,
    overlay_picture,
    top_patch_gallery,
)
from ips_path.review.heatmap.grid import percentile_ranks, score_grid, smooth_grid
from ips_path.review.heatmap.lowres import slide_thumbnail
from ips_path.review.heatmap.spread import (
    SCALES,
    SPREAD_FILE,
    attention_spread,
    scale_legend,
    scale_values,
    write_spread,
)
from ips_path.review.heatmap.writers import save_png, write_overlay_tiff, write_patches_geojson
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.limits import SMOOTHING_UM, TIFF_PIXEL_SIZE_UM
from ips_path.slides.slide import Slide
from ips_path.stores.tile_store import TileStore

__all__ = ["HEATMAP_FILES", "check_heatmap_options", "check_scores", "open_store_slide", "render_slide_heatmaps"]

#: File names in heatmaps/<slide_id>/, by the keys :func:`render_slide_heatmaps` returns.
HEATMAP_FILES = {
    "thumbnail": "thumbnail.png",
    "overlay": "overlay.png",
    "geojson": "patches.geojson",
    "top_patches": "top_patches.png",
    "tiff": "overlay.tiff",
    "attention": SPREAD_FILE,
}


def check_scores(store: TileStore, scores: np.ndarray) -> np.ndarray:
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
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            raise BadInputError(f"{flag} {value!r}: must be {what}")

    number("thumbnail_size", 16, what="at least 16 px")
    for name, allowed in (("smooth_sigma_um", SMOOTHING_UM), ("tiff_mpp", TIFF_PIXEL_SIZE_UM)):
        if options.get(name) is not None:  # a sigma of 1e30 µm or a TIFF of 1e30 µm/px means nothing on a slide
            allowed.check(options[name], _FLAGS.get(name, "--" + name.replace("_", "-")))
    number("alpha", 0, 1, what="an opacity between 0 and 1")
    number("top_k", 0, what="a number of patches >= 0")
    number("threads", 1, what="at least 1 thread")
    if options.get("colormap", "viridis") not in COLORMAPS:
        raise BadInputError(f"--colormap {options['colormap']!r}: use one of {', '.join(COLORMAPS)}")
    if options.get("scale", "rank") not in SCALES:
        raise BadInputError(f"--scale {options['scale']!r}: use one of {', '.join(SCALES)}")


_FLAGS = {"smooth_sigma_um": "--smooth-um"}  # options whose command-line flag is not their name
_OPTION_NAMES = ("thumbnail_size", "smooth_sigma_um", "colormap", "scale", "alpha", "top_k", "geojson", "tiff_mpp",
                 "threads", "progress", "crop")
# Margin kept around the tissue by crop=True, as a share of the cropped box's longer side.
_CROP_MARGIN = 0.05


def render_slide_heatmaps(
    store: TileStore,
    scores: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    slide: Slide | None = None,
    thumbnail_size: int = 2048,
    smooth_sigma_um: float = 0.0,
    colormap: str = "viridis",
    scale: str = "rank",
    alpha: float = 0.5,
    top_k: int = 16,
    geojson: bool = True,
    tiff_mpp: float | None = None,
    threads: int = 2,
    progress: bool = False,
    crop: bool = False,
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
    scale : str
        What the colours show (:data:`~ips_path.review.heatmap.spread.SCALES`): ``rank`` (percentile rank
        within the slide) or ``weight`` (attention weight vs. flat attention, one fixed scale for
        every slide). The legend says which, with the spread of the slide's attention, and
        attention.json records both.
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
    crop : bool
        Crop thumbnail.png and overlay.png to the tissue and the patches, with a small margin
        (same resolution; overlay.tiff always covers the whole slide).

    Returns
    -------
    dict
        Written paths by kind: "thumbnail", "overlay", "attention", and "geojson", "top_patches",
        "tiff" when written.

    Raises
    ------
    BadInputError
        Scores that do not match the store, a missing or changed slide file.
    """
    scores = check_scores(store, scores)
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}: use one of {', '.join(COLORMAPS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    level0_mpp = float(np.mean(store.level0_mpp))
    ranks = percentile_ranks(scores)
    values = ranks if scale == "rank" else scale_values(scores, scale)
    grid = smooth_grid(score_grid(store.coords, values, store.stride_level0, store.patch_size_level0),
                       smooth_sigma_um / level0_mpp)
    spread = attention_spread(scores)
    shown = scale_legend(scale)
    legend = {"title": shown["title"], "labels": (shown["low"], shown["mid"], shown["high"]),
              "notes": tuple(spread.lines()) if spread.n_patches else ()}
    own_slide = slide is None
    slide = open_store_slide(store) if slide is None else slide
    written: dict[str, Path] = {}
    try:
        thumbnail, downsample = slide_thumbnail(slide, thumbnail_size, threads)
        offset = (0, 0)
        if crop:
            x0, y0, x1, y1 = _tissue_box(store, downsample, thumbnail.shape[:2])
            thumbnail, offset = np.ascontiguousarray(thumbnail[y0:y1, x0:x1]), (x0, y0)
        overlay, _ = overlay_picture(thumbnail, downsample, grid, colormap, alpha, legend=legend, offset=offset)
        written["thumbnail"] = save_png(thumbnail, out_dir / HEATMAP_FILES["thumbnail"])
        written["overlay"] = save_png(overlay, out_dir / HEATMAP_FILES["overlay"])
        written["attention"] = write_spread(out_dir, spread, scale)
        del thumbnail, overlay
        if geojson:
            written["geojson"] = write_patches_geojson(out_dir / HEATMAP_FILES["geojson"], store.coords,
                                                       store.patch_size_level0, scores, ranks=ranks,
                                                       colormap=colormap)
        if top_k > 0:
            gallery = top_patch_gallery(slide, store.coords, scores, top_k=top_k, read_level=store.read_level,
                                        read_size=store.read_size, patch_size=store.patch_size)
            written["top_patches"] = save_png(gallery.image, out_dir / HEATMAP_FILES["top_patches"])
        if tiff_mpp is not None:
            written["tiff"] = write_overlay_tiff(out_dir / HEATMAP_FILES["tiff"], slide, grid, tiff_mpp, level0_mpp,
                                                 colormap=colormap, alpha=alpha, threads=threads, progress=progress)
    finally:
        if own_slide:
            slide.close()
    return written


def _tissue_box(store: TileStore, downsample: tuple[float, float], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The tissue mask's and the patches' bounding box in a whole-slide picture of ``shape`` (h, w) at
    ``downsample``, with a margin: (x0, y0, x1, y1), px; the whole picture when there is neither."""
    mask, _ = store.mask()
    mask_downsample = store.mask_downsample()
    boxes = []
    rows, cols = np.nonzero(mask)
    if rows.size:
        boxes.append((cols.min() * mask_downsample, rows.min() * mask_downsample,
                      (cols.max() + 1) * mask_downsample, (rows.max() + 1) * mask_downsample))
    if store.n_patches:
        low, high = store.coords.min(axis=0), store.coords.max(axis=0) + store.patch_size_level0
        boxes.append((low[0], low[1], high[0], high[1]))
    height, width = shape
    if not boxes:
        return 0, 0, width, height
    x0, y0 = min(b[0] for b in boxes) / downsample[0], min(b[1] for b in boxes) / downsample[1]
    x1, y1 = max(b[2] for b in boxes) / downsample[0], max(b[3] for b in boxes) / downsample[1]
    margin = _CROP_MARGIN * max(x1 - x0, y1 - y0)
    return (max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin)),
            min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin)))
