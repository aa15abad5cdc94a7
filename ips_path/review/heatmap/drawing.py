"""Drawing: colour maps, the overlay over a thumbnail, the colour bar, the gallery of the most attended patches."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ips_path.review.heatmap.grid import ScoreGrid, pixel_centres, sample_grid
from ips_path.review.heatmap.lowres import BLOCK
from ips_path.slides.slide import Slide

__all__ = ["COLORMAPS", "Gallery", "blend_overlay", "colormap_lut", "draw_colour_bar", "overlay_picture",
           "top_patch_gallery"]

#: Perceptually uniform matplotlib colormaps offered for overlays.
COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis")


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
                    title: str = "attention (rank in slide)", labels: tuple[str, str, str] = ("low", "", "high"),
                    notes: tuple[str, ...] = ()) -> tuple[int, int, int, int] | None:
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
        Text above the bar: what the colours show.
    labels : (str, str, str)
        Under the bar's left end, middle and right end ("" for none).
    notes : tuple of str
        Lines under the labels (the spread of the slide's attention); left out when they would be
        wider than half the picture.

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
    if notes and max(font.getlength(text) for text in notes) + 2 * pad > width / 2:
        notes = ()  # a small picture: the notes would hide it; the title still says what the colours show
    bar_w = max(10 * font_px, *(int(font.getlength(text)) for text in (title, *notes)))
    box_w = bar_w + 2 * pad
    box_h = 3 * pad + 3 * font_px + pad + len(notes) * (font_px + pad // 2)  # title, bar, labels, notes
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
    low, mid, high = labels
    draw.text((pad, label_top), low, fill=(0, 0, 0), font=font)
    draw.text((pad + (bar_w - font.getlength(mid)) / 2, label_top), mid, fill=(0, 0, 0), font=font)
    draw.text((pad + bar_w - font.getlength(high), label_top), high, fill=(0, 0, 0), font=font)
    for number, note in enumerate(notes):
        draw.text((pad, label_top + font_px + pad + number * (font_px + pad // 2)), note, fill=(70, 70, 70), font=font)
    picture[y0:y0 + box_h, x0:x0 + box_w] = np.asarray(legend)
    return x0, y0, x0 + box_w, y0 + box_h


def overlay_picture(thumbnail: np.ndarray, downsample: tuple[float, float], grid: ScoreGrid,
                    colormap: str = "viridis", alpha: float = 0.5, colour_bar: bool = True,
                    legend: dict[str, Any] | None = None,
                    offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The attention overlay on a slide picture, composed in bands of rows.

    Parameters
    ----------
    thumbnail : (h, w, 3) uint8 array
        The slide picture (from :func:`slide_thumbnail`).
    downsample : (float, float)
        Level-0 px per picture px along x and y.
    grid : ScoreGrid
        Values in [0, 1] (percentile ranks, or another scale of :mod:`ips_path.review.heatmap.spread`).
    colormap, alpha
        As for :func:`blend_overlay`.
    colour_bar : bool
        Draw a colour bar legend in the corner with the fewest patches.
    legend : dict, optional
        Keywords of :func:`draw_colour_bar` (``title``, ``labels``, ``notes``): the scale shown and
        the spread of the attention; default: percentile ranks, no notes.
    offset : (int, int)
        Where ``thumbnail`` starts in the whole-slide picture at ``downsample`` (x, y), px: a
        crop of it.

    Returns
    -------
    overlay : (h, w, 3) uint8 array
        The picture, with ``thumbnail`` pixels kept outside the patches and the legend.
    legend_box : (x0, y0, x1, y1) or None
        Where the legend is (see :func:`draw_colour_bar`).
    """
    height, width = thumbnail.shape[:2]
    xs = pixel_centres(offset[0], width, downsample[0])
    overlay = np.empty_like(thumbnail)
    footprint = np.empty((height, width), dtype=bool)
    for top in range(0, height, BLOCK):
        rows = slice(top, min(height, top + BLOCK))
        values, footprint[rows] = sample_grid(grid, xs, pixel_centres(offset[1] + top, rows.stop - top,
                                                                      downsample[1]))
        overlay[rows] = blend_overlay(thumbnail[rows], values, footprint[rows], colormap, alpha)
    legend_box = draw_colour_bar(overlay, colormap, avoid=footprint, **(legend or {})) if colour_bar else None
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
