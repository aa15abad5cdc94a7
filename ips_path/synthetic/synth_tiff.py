"""Writing a generated slide as a real pyramidal file: tiled JPEG levels composed and encoded on a
thread pool, as an Aperio SVS (with thumbnail and label) or a generic tiled TIFF."""

from __future__ import annotations

import collections
import math
import pathlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
import tifffile

from ips_path.synthetic.synth_paint import BACKGROUND_RGB, MAX_DOWNSAMPLE, Painter

if TYPE_CHECKING:
    from ips_path.synthetic.spec import SlideSpec

__all__ = ["grain_bank", "thumbnail_downsample", "write_pyramid"]

_APERIO_HEADER = "Aperio Image Library v12.0.15"


def thumbnail_downsample(width: int, height: int) -> int:
    """The power of two that brings the slide to at most 1024 px (capped at the largest allowed)."""
    return min(MAX_DOWNSAMPLE, 1 << max(0, math.ceil(math.log2(max(width, height) / 1024))))


def write_pyramid(path: pathlib.Path, spec: SlideSpec, painter: Painter, tile_size: int, quality: int,
                   resolution_tags: bool, thumb_downsample: int, workers: int,
                   grain_bank: np.ndarray | None = None) -> None:
    """Write ``spec``'s slide to ``path`` as a tiled JPEG pyramid: Aperio SVS (thumbnail second, label
    last, AppMag/MPP in the description) or a generic TIFF (optionally with resolution tags)."""
    level_sizes = [(max(1, spec.width // d), max(1, spec.height // d)) for d in spec.downsamples]
    # The classic TIFF offsets end at 4 GiB; JPEG rarely reaches a tenth of the raw size, but a
    # big slide gets BigTIFF (openslide and tiffslide read both).
    bigtiff = sum(w * h * 3 for w, h in level_sizes) > 2**32
    magnification = f"{10 / spec.mpp:g}"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif, ThreadPoolExecutor(workers) as pool:
        for index, (downsample, (level_w, level_h)) in enumerate(zip(spec.downsamples, level_sizes, strict=True)):
            if spec.fmt == "svs":
                size_note = "" if index == 0 else f" -> {level_w}x{level_h}"
                options = dict(subfiletype=0, description=(
                    f"{_APERIO_HEADER}\r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
                    f"({tile_size}x{tile_size}){size_note} JPEG/RGB Q={quality}"
                    + (f"|AppMag = {magnification}|MPP = {spec.mpp:g}|Filename = {spec.path.stem}"
                       f"|ipspath.seed = {spec.seed}" if index == 0 else "")))
            else:
                options = dict(subfiletype=0 if index == 0 else 1,
                               description=f"ipspath synthetic slide, seed {spec.seed}" if index == 0 else None)
                if resolution_tags:
                    px_per_cm = 1e4 / (spec.mpp * downsample)
                    options.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            tiles = _encoded_tiles(painter, downsample, level_w, level_h, tile_size, quality, pool, workers,
                                   grain_bank)
            tif.write(tiles, shape=(level_h, level_w, 3), dtype=np.uint8, tile=(tile_size, tile_size),
                      compression="jpeg", photometric="rgb", metadata=None, **options)
            if spec.fmt == "svs" and index == 0:
                # Aperio keeps the thumbnail second: openslide and tifffile look for it there.
                _write_svs_thumbnail(tif, spec, painter, thumb_downsample, quality)
        if spec.fmt == "svs":
            label = _label_image(spec.seed)
            tif.write(label, photometric="rgb", compression="lzw", subfiletype=1, metadata=None,
                      description=f"{_APERIO_HEADER}\r\nlabel {label.shape[1]}x{label.shape[0]}")


def _write_svs_thumbnail(tif: tifffile.TiffWriter, spec: SlideSpec, painter: Painter, downsample: int,
                         quality: int) -> None:
    thumb_w, thumb_h = max(1, spec.width // downsample), max(1, spec.height // downsample)
    thumbnail = painter.paint(downsample, 0, 0, thumb_w, thumb_h)
    if thumbnail is None:  # no tissue at all
        thumbnail = np.full((thumb_h, thumb_w, 3), BACKGROUND_RGB, dtype=np.uint8)
    tif.write(thumbnail, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
              rowsperstrip=16, metadata=None,
              subfiletype=0, description=f"{_APERIO_HEADER}\r\n{spec.width}x{spec.height} -> "
                                         f"{thumb_w}x{thumb_h} - |AppMag = {10 / spec.mpp:g}|MPP = {spec.mpp:g}")


def _label_image(seed: int) -> np.ndarray:
    """A slide label: white with a barcode-like pattern that depends on the seed."""
    label = np.full((320, 320, 3), 250, dtype=np.uint8)
    bars = np.random.default_rng([seed, 4]).integers(0, 2, size=40).astype(bool)
    columns = np.repeat(bars, 6)
    label[40:140, 40:40 + columns.size][:, columns] = 20
    label[180:280, 40:280] = (60, 90, 160)
    return label


def _encoded_tiles(painter: Painter, downsample: int, level_w: int, level_h: int, tile_size: int,
                   quality: int, pool: ThreadPoolExecutor, workers: int,
                   grain_bank: np.ndarray | None = None) -> Iterator[bytes]:
    """JPEG bytes of every tile of one level, row by row, composed and encoded on ``pool``.

    With ``grain_bank`` (see :func:`grain_bank`) each tissue tile gets a crop of it added, at an
    offset that follows the tile's position, so the noise is the same on every run and never repeats
    between neighbouring tiles.
    """
    background = _encode_jpeg(np.broadcast_to(np.array(BACKGROUND_RGB, dtype=np.uint8),
                                              (tile_size, tile_size, 3)), quality)

    def tile_bytes(left: int, top: int) -> bytes:
        pixels = painter.paint(downsample, left, top, tile_size, tile_size)
        if pixels is None:
            return background
        if grain_bank is not None:
            span = grain_bank.shape[0] - tile_size
            dy, dx = (top * 7919 + left * 104729) % span, (left * 7919 + top * 15485863) % span
            noise = grain_bank[dy:dy + tile_size, dx:dx + tile_size]
            pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        return _encode_jpeg(pixels, quality)

    positions = ((left, top) for top in range(0, level_h, tile_size) for left in range(0, level_w, tile_size))
    return _ordered_map(pool, tile_bytes, positions, max_pending=8 * workers)


def grain_bank(grain: float, tile_size: int, seed: int) -> np.ndarray:
    """int16 noise of standard deviation ``grain``, (4 * tile_size)^2 x 3, from which tiles take crops.

    One bank per slide instead of fresh noise per tile keeps writing fast (a crop and an add).
    """
    side = 4 * tile_size
    noise = np.random.default_rng([seed, 9]).normal(0.0, grain, (side, side, 3))
    return np.round(noise).astype(np.int16)


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    # The same stream tifffile would write for compression="jpeg", photometric="rgb": YCbCr 4:2:0.
    return imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), level=quality, colorspace="RGB",
                                    outcolorspace="YCBCR", subsampling=(2, 2))


def _ordered_map(pool: ThreadPoolExecutor, function: Callable[[int, int], bytes],
                 arguments: Iterator[tuple[int, int]], max_pending: int) -> Iterator[bytes]:
    """``function(*args)`` for each args on ``pool``, yielded in order, with a bounded queue."""
    pending: collections.deque[Future[bytes]] = collections.deque()
    for args in arguments:
        pending.append(pool.submit(function, *args))
        if len(pending) >= max_pending:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
