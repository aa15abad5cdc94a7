"""Deep Zoom tiles of a slide and of its attention, made on request, and a cache for them.

The tile pyramid is the Deep Zoom one that OpenSeadragon expects: level ``max_level`` is the
slide at level-0 resolution, each level below halves it (sizes rounded up), down to 1 x 1 px at
level 0; each level is cut into ``tile_size`` squares (smaller at the right and bottom edges),
without overlap. Tile (level, col, row) covers level-0 pixels from ``(col, row) * tile_size *
2**(max_level - level)``.

Slide tiles are read through :class:`~ips_path.slides.slide.Slide` at the best pyramid level for the
tile's downsample (:func:`~ips_path.review.heatmap.read_downsampled`), so openslide and tiffslide give
the same tiles. Attention tiles are sampled from the patch grid at the tile's own resolution
(:func:`~ips_path.review.heatmap.sample_grid`), so the patch edges stay sharp at every zoom; they are
transparent outside the scored patches and opaque inside (the browser sets the opacity).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ips_path.review.heatmap import ScoreGrid, read_downsampled, sample_grid
from ips_path.slides.slide import Slide

__all__ = ["EMPTY_TILE_PNG", "DeepZoomGeometry", "TileCache", "TileNotFound", "attention_tile", "slide_tile"]

TILE_SIZE = 256
JPEG_QUALITY = 85
# PNG zlib level of attention tiles: mostly flat colours, level 1 is several times faster than 6
# for files a few per cent larger.
_PNG_LEVEL = 1
_ENTRY_OVERHEAD = 128  # bytes of a cache entry besides the tile (key, links): empty tiles count too


def _entry_bytes(tile: bytes | None) -> int:
    """What a cached tile counts against the budget: its bytes plus the bookkeeping of an entry."""
    return _ENTRY_OVERHEAD + len(tile or b"")


class TileNotFound(LookupError):
    """The level or tile position lies outside the pyramid."""


@dataclass(frozen=True)
class DeepZoomGeometry:
    """The Deep Zoom pyramid of a ``width`` x ``height`` level-0 image.

    Attributes
    ----------
    width, height : int
        Level-0 size, px.
    tile_size : int
        Tile side, px.
    """

    width: int
    height: int
    tile_size: int = TILE_SIZE

    @property
    def max_level(self) -> int:
        """The level at level-0 resolution: ceil(log2(longest side))."""
        return max(0, (max(self.width, self.height) - 1).bit_length())

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level`` in px; TileNotFound outside 0..max_level."""
        if not 0 <= level <= self.max_level:
            raise TileNotFound(f"level {level} is not in 0..{self.max_level}")
        scale = 1 << (self.max_level - level)
        return -(-self.width // scale), -(-self.height // scale)

    def tile_region(self, level: int, col: int, row: int) -> tuple[tuple[int, int], tuple[int, int], int]:
        """Where tile (level, col, row) is.

        Returns
        -------
        origin : (int, int)
            Level-0 (x, y) of its top-left corner, px.
        size : (int, int)
            Its (width, height), px.
        downsample : int
            Level-0 px per tile px.

        Raises
        ------
        TileNotFound
            For a level or position outside the pyramid.
        """
        level_w, level_h = self.level_size(level)
        left, top = col * self.tile_size, row * self.tile_size
        if not (0 <= left < level_w and 0 <= top < level_h):
            raise TileNotFound(f"tile ({col}, {row}) is outside level {level} ({level_w} x {level_h} px)")
        downsample = 1 << (self.max_level - level)
        size = (min(self.tile_size, level_w - left), min(self.tile_size, level_h - top))
        return (left * downsample, top * downsample), size, downsample


def slide_tile(slide: Slide, geometry: DeepZoomGeometry, level: int, col: int, row: int) -> bytes:
    """The slide's pixels in tile (level, col, row) as JPEG bytes (white outside the slide)."""
    origin, size, downsample = geometry.tile_region(level, col, row)
    pixels = read_downsampled(slide, origin, size, (downsample, downsample))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def attention_tile(grid: ScoreGrid, geometry: DeepZoomGeometry, level: int, col: int, row: int,
                   lut: np.ndarray) -> bytes | None:
    """The attention colours in tile (level, col, row) as RGBA PNG bytes; None when no patch is there.

    Parameters
    ----------
    grid : ScoreGrid
        Values in [0, 1] (percentile ranks).
    geometry : DeepZoomGeometry
    level, col, row : int
    lut : (256, 3) uint8 array
        The colour map (:func:`~ips_path.review.heatmap.colormap_lut`).
    """
    (x0, y0), (width, height), downsample = geometry.tile_region(level, col, row)
    # level-0 coordinates of the tile's pixel centres
    xs = x0 + (np.arange(width) + 0.5) * downsample
    ys = y0 + (np.arange(height) + 0.5) * downsample
    values, footprint = sample_grid(grid, xs, ys)
    if not footprint.any():
        return None
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = lut[np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)]
    rgba[..., 3] = footprint * np.uint8(255)
    return _png(rgba)


def _png(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


#: A 1 x 1 transparent PNG: what an attention tile without patches is served as.
EMPTY_TILE_PNG = _png(np.zeros((1, 1, 4), dtype=np.uint8))


class TileCache:
    """A thread-safe least-recently-used cache of encoded tiles, bounded in bytes.

    Parameters
    ----------
    max_bytes : int
        Total size of the tiles kept; the least recently used go first. 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._bytes = 0
        self._items: OrderedDict[tuple, bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[bool, bytes | None]:
        """(found, tile); a found tile may be None (an empty attention tile)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return True, self._items[key]
            self.misses += 1
            return False, None

    def put(self, key: tuple, tile: bytes | None) -> None:
        """Keep ``tile`` under ``key``, evicting the least recently used tiles beyond the budget."""
        size = _entry_bytes(tile)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= _entry_bytes(self._items.pop(key))
            self._bytes += size
            self._items[key] = tile
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= _entry_bytes(evicted)

    @property
    def size_bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def clear(self) -> None:
        """Forget every tile (and the hit/miss counts)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0
