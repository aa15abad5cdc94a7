"""Streaming patch loader: the patches of one slide, chunk by chunk, read lazily from the slide file.

A pool of threads reads the patches of the next chunk with :meth:`Slide.read_region` (openslide
and libjpeg release the GIL) while the consumer encodes the current one. Patches come in the
tile store's coordinate order (row-major), which keeps reads local in the file.

Several chunks are read at once (``in_flight``, default 2), so the readers never wait for the
consumer between chunks. On CUDA, each chunk is read into one of a ring of pinned host buffers
that are reused for the whole run (pinning is expensive), copied to the GPU with ``non_blocking``
on a side stream, and then resized to the patch size and augmented on the GPU without host
synchronisation; the encoder normalises there too. On CPU the same code runs without the pinned
buffers and the side stream.

A stream that fails (a damaged tile) or is abandoned by its consumer cancels its queued reads and
waits for the running ones before the slide is closed: openslide frees its handle without a lock.

Every chunk is a :class:`~ips_path.model.chunks.PatchChunk` of ``uint8`` patches ``(n, 3, P, P)``
with the patches' grid positions; its tensors are the consumer's to keep.

With ``stain_norm``, each slide's patches are brought to one reference staining
(:mod:`ips_path.slides.stain`) on the device, before augmentation: the slide's statistic is measured once per
streamer from an evenly spaced sample of its patches.

With ``backend="auto"`` patches of tiled TIFF slides (SVS, generic pyramidal TIFF) are decoded
straight from the file's tiles (:class:`TiffTileReader`), which is several times faster per
patch than going through openslide, whose premultiplied-ARGB to RGB conversion costs more than
the JPEG decoding itself; other formats (DICOM, MIRAX, ...) are read with openslide
(``bench/loader_bench.py``).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ips_path.model.chunks import PatchChunk
from ips_path.runtime.errors import IpspathError
from ips_path.runtime.threads import available_cores, use_compute_threads
from ips_path.slides.slide import Slide, rgb_on_white
from ips_path.slides.stain import SAMPLE_PATCHES, apply_lut, normalization_lut, slide_stain_od
from ips_path.stores.feature_grid import open_features
from ips_path.stores.tile_store import TileStore

__all__ = [
    "Augmentation",
    "PatchStreamer",
    "TiffTileReader",
    "augment_patches",
    "available_cores",
    "grid_positions",
    "open_for_reading",
    "resize_patches",
]


@dataclass(frozen=True)
class Augmentation:
    """Random patch augmentation applied on the device, independently per patch.

    Attributes
    ----------
    flips : bool
        Horizontal and vertical flips, each with probability 1/2.
    rotations : bool
        Rotation by a multiple of 90°, each equally likely.
    brightness, contrast, saturation : float
        Colour jitter: each factor is drawn uniformly from ``[1 - v, 1 + v]``; 0 disables it.
    """

    flips: bool = True
    rotations: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    @property
    def jitters_colour(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation)


def augment_patches(patches: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Augment ``(n, 3, H, W)`` uint8 patches (H == W for rotations) on their device.

    Parameters
    ----------
    patches : Tensor
        ``uint8`` patches.
    augmentation : Augmentation
        What to apply.
    generator : torch.Generator
        Random source on the patches' device, so runs with the same seed repeat exactly.

    Returns
    -------
    Tensor
        ``uint8`` patches of the same shape.
    """
    n, device = patches.shape[0], patches.device

    def draw(shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device) * (high - low) + low

    # Only elementwise selections (torch.where) below: no boolean indexing or .any(), which would make
    # the host wait for the device once per chunk.
    x = patches
    if augmentation.flips:
        x = torch.where((draw((n, 1, 1, 1)) < 0.5), x.flip(-1), x)
        x = torch.where((draw((n, 1, 1, 1)) < 0.5), x.flip(-2), x)
    if augmentation.rotations:
        # A quarter turn k (uniform in 0..3) is a transpose when k is odd, then a flip of the columns for
        # k in {1, 2} and of the rows for k in {2, 3}: rot90 by k, counterclockwise, with no gather.
        quarter_turns = (draw((n, 1, 1, 1)) * 4).long().clamp_(max=3)
        x = torch.where(quarter_turns % 2 == 1, x.transpose(-2, -1), x)
        x = torch.where((quarter_turns == 1) | (quarter_turns == 2), x.flip(-2), x)
        x = torch.where(quarter_turns >= 2, x.flip(-1), x)
    if augmentation.jitters_colour:
        f = x.float()
        if augmentation.brightness:
            f = f * draw((n, 1, 1, 1), 1 - augmentation.brightness, 1 + augmentation.brightness)
        if augmentation.contrast:
            mean = f.mean(dim=(1, 2, 3), keepdim=True)
            f = (f - mean) * draw((n, 1, 1, 1), 1 - augmentation.contrast, 1 + augmentation.contrast) + mean
        if augmentation.saturation:
            grey = (0.299 * f[:, 0:1] + 0.587 * f[:, 1:2] + 0.114 * f[:, 2:3])
            f = (f - grey) * draw((n, 1, 1, 1), 1 - augmentation.saturation, 1 + augmentation.saturation) + grey
        x = f.round_().clamp_(0, 255).to(torch.uint8)
    return x


def resize_patches(patches: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(n, 3, h, w)`` uint8 patches to ``size`` x ``size`` (bilinear, antialiased) on their device."""
    if patches.shape[-2:] == (size, size):
        return patches
    resized = F.interpolate(patches.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def grid_positions(coords: np.ndarray, step: int) -> torch.Tensor:
    """(row, col) of each patch on the grid, from level-0 (x, y) top-left coordinates and the grid step.

    Parameters
    ----------
    coords : np.ndarray
        ``(N, 2)`` level-0 (x, y) in pixels.
    step : int
        Distance between neighbouring patches at level 0, in pixels (the stride).
    """
    if len(coords) == 0:
        return torch.zeros((0, 2), dtype=torch.int64)
    rel = (np.asarray(coords, dtype=np.int64) - np.asarray(coords).min(axis=0)) // max(int(step), 1)
    return torch.from_numpy(np.ascontiguousarray(rel[:, ::-1]))


class PatchStreamer:
    """Reads the patches of tile stores from their slides, chunk by chunk.

    One streamer serves a whole run: its thread pool and (on CUDA) its pinned buffers are made
    once and reused for every slide.

    Parameters
    ----------
    chunk_size : int
        Patches per chunk (the IPS chunk size I is a good choice).
    threads : int, optional
        Reader threads; default: the CPU cores this process may use (:func:`available_cores`).
    device : str or torch.device
        Where chunks are delivered; resizing and augmentation run there.
    augmentation : Augmentation, optional
        Applied to every chunk when given (training); None for scoring and prediction.
    seed : int
        Seed of the augmentation's random numbers (``generator``, whose state checkpoints save).
    backend : {"auto", "openslide", "tiffslide"}
        Slide backend; "auto" picks per slide with :func:`open_for_reading`.
    in_flight : int
        Chunks read at once ahead of the consumer (>= 1). Two keep every reader busy across the
        boundary between chunks; on CUDA the ring holds ``in_flight + 1`` pinned buffers.
    stain_norm : bool
        Bring every slide's staining to :data:`ips_path.slides.stain.REFERENCE_OD` (per-slide normalisation in
        optical density) before augmentation.
    """

    def __init__(self, *, chunk_size: int = 64, threads: int | None = None, device: str | torch.device = "cpu",
                 augmentation: Augmentation | None = None, seed: int = 0, backend: str = "auto",
                 in_flight: int = 2, stain_norm: bool = False):
        threads = available_cores() if threads is None else threads
        if chunk_size < 1 or threads < 1 or in_flight < 1:
            raise ValueError("chunk_size, threads and in_flight must be >= 1")
        self.chunk_size = chunk_size
        self.threads = threads
        use_compute_threads()  # torch's threads beside these readers (ips_path.runtime.threads)
        self.in_flight = in_flight
        self.device = torch.device(device)
        self.augmentation = augmentation
        self.backend = backend
        self.stain_norm = stain_norm
        self._stain_luts: dict[tuple, torch.Tensor] = {}  # what the sample was read from -> (3, 256) table
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ipspath-read")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._cuda = self.device.type == "cuda"
        self._pinned: list[torch.Tensor] = []
        self._copy_done: list[torch.cuda.Event] = []
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    # -- public --------------------------------------------------------------------------------

    def stream(self, store: TileStore, *, slide: Slide | None = None, slide_mpp: float | None = None,
               indices: Sequence[int] | np.ndarray | None = None) -> Iterator[PatchChunk]:
        """Yield the patches of ``store`` (or of ``indices`` into it) in chunks.

        Parameters
        ----------
        store : TileStore
            Coordinates, read level and patch sizes.
        slide : Slide, optional
            An open slide to read from; by default the store's slide is opened (and closed after).
        slide_mpp : float, optional
            Level-0 µm/px override when the store's slide is opened here.
        indices : sequence of int, optional
            Only these patches, in this order.
        """
        coords = store.coords if indices is None else store.coords[np.asarray(indices, dtype=np.int64)]
        positions = grid_positions(store.coords, store.stride_level0)
        if indices is not None:
            positions = positions[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        own_slide = slide is None
        if own_slide:
            slide = open_for_reading(store, self.backend, slide_mpp)
        try:
            lut = self._stain_lut(store, slide) if self.stain_norm else None
            # _stream_pixels has waited for every read of the slide when it ends, however it ends.
            yield from self._stream_pixels(slide, coords, positions, store.read_level, store.read_size,
                                           store.patch_size, lut)
        finally:
            if own_slide:
                slide.close()

    def stream_features(self, store: TileStore, encoder: str) -> Iterator[PatchChunk]:
        """Yield cached embeddings ``features/<encoder>`` of ``store`` in chunks (no pixels are read)."""
        features = open_features(store, encoder)
        positions = grid_positions(store.coords, store.stride_level0)
        for start in range(0, store.n_patches, self.chunk_size):
            stop = min(start + self.chunk_size, store.n_patches)
            block = torch.from_numpy(np.asarray(features[start:stop]))
            yield PatchChunk(block.to(self.device, non_blocking=True), positions[start:stop].to(self.device))

    def close(self) -> None:
        """Stop the reader threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PatchStreamer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the pipeline --------------------------------------------------------------------------

    def _stain_lut(self, store: TileStore, slide: Slide | TiffTileReader) -> torch.Tensor:
        """The slide's stain-normalisation table, measured on an evenly spaced sample of its patches."""
        # A store re-tiled in place (another slide, grid or level) during a long-lived streamer needs a new table.
        key = (str(Path(store.path).resolve()), repr(store.attrs.get("slide_identity")), store.n_patches,
               store.read_level, store.read_size)
        if key not in self._stain_luts:
            n = min(SAMPLE_PATCHES, store.n_patches)
            sample = store.coords[np.linspace(0, store.n_patches - 1, n).round().astype(np.int64)]
            pixels = np.empty((n, store.read_size, store.read_size, 3), dtype=np.uint8)
            _read_patches(slide, sample, 0, n, 0, store.read_level, store.read_size, pixels, threading.Event())
            lut = normalization_lut(slide_stain_od(pixels))
            self._stain_luts[key] = torch.from_numpy(lut).to(self.device)
        return self._stain_luts[key]

    def _stream_pixels(self, slide: Slide | TiffTileReader, coords: np.ndarray, positions: torch.Tensor, level: int,
                       read_size: int, patch_size: int, lut: torch.Tensor | None = None) -> Iterator[PatchChunk]:
        n_chunks = math.ceil(len(coords) / self.chunk_size)
        if n_chunks == 0:
            return
        stop = threading.Event()  # set when the stream ends early: running reads stop at their next patch
        pending: deque[tuple[torch.Tensor, list[Future]]] = deque()
        try:
            for k in range(min(self.in_flight, n_chunks)):
                pending.append(self._submit(slide, coords, k, level, read_size, stop))
            for k in range(n_chunks):
                host, reads = pending[0]
                for future in reads:
                    future.result()  # re-raises a read error: it names the slide and the coordinates
                pending.popleft()
                patches = self._to_device(host, k % self._ring_size)
                if k + self.in_flight < n_chunks:  # its buffer is the one chunk k - 1 was copied from
                    pending.append(self._submit(slide, coords, k + self.in_flight, level, read_size, stop))
                start = k * self.chunk_size
                patches = resize_patches(patches.permute(0, 3, 1, 2), patch_size)
                if lut is not None:
                    patches = apply_lut(patches, lut)
                if self.augmentation is not None:
                    patches = augment_patches(patches, self.augmentation, self.generator)
                yield PatchChunk(patches, positions[start:start + len(host)].to(self.device, non_blocking=True))
        finally:
            # Failed or abandoned (GeneratorExit at the yield): no read may outlive the stream, since the
            # caller closes the slide next. Queued reads are cancelled, running ones stop at their next patch.
            stop.set()
            outstanding = [future for _, reads in pending for future in reads]
            for future in outstanding:
                future.cancel()
            wait(outstanding)

    @property
    def _ring_size(self) -> int:
        return self.in_flight + 1

    def _submit(self, slide: Slide | TiffTileReader, coords: np.ndarray, k: int, level: int,
                read_size: int, stop: threading.Event) -> tuple[torch.Tensor, list[Future]]:
        """Start reading chunk ``k`` into a host buffer; one task per thread over a contiguous run."""
        start, end = k * self.chunk_size, min((k + 1) * self.chunk_size, len(coords))
        host = self._host_buffer(k % self._ring_size, end - start, read_size)
        out = host.numpy()
        bounds = np.linspace(start, end, min(self.threads, end - start) + 1).round().astype(int)
        reads = [self._pool.submit(_read_patches, slide, coords, int(a), int(b), start, level, read_size, out, stop)
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        return host, reads

    def _host_buffer(self, slot: int, n: int, read_size: int) -> torch.Tensor:
        """``(n, s, s, 3)`` uint8 host memory for one chunk: a reused pinned buffer on CUDA, else fresh."""
        shape = (self.chunk_size, read_size, read_size, 3)
        if not self._cuda:
            return torch.empty((n, *shape[1:]), dtype=torch.uint8)
        if not self._pinned or self._pinned[0].shape != shape:
            self._pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(self._ring_size)]
            self._copy_done = [torch.cuda.Event() for _ in range(self._ring_size)]
        # The copy of the chunk that last used this buffer must be over before threads refill it.
        self._copy_done[slot].synchronize()
        return self._pinned[slot][:n]

    def _to_device(self, host: torch.Tensor, slot: int) -> torch.Tensor:
        if not self._cuda:
            return host
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
            self._copy_done[slot].record(self._copy_stream)
        compute.wait_stream(self._copy_stream)
        on_device.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return on_device


class TiffTileReader:
    """Patches of one level of a tiled TIFF (SVS, generic pyramidal TIFF), decoded straight from its tiles.

    The tile bytes are read with ``os.pread`` (no shared file position, so threads read at once) and
    decoded with tifffile's decoder (imagecodecs, outside the GIL), the one tiffslide uses, so the
    pixels equal ``Slide(..., backend="tiffslide").read_region``. This skips the layers above the
    decoder (zarr indexing, openslide's ARGB conversion), which cost more than decoding.

    Decoded tiles are shared by all threads in a row-band cache (:class:`_TileCache`) that holds
    the last few rows of tiles across the level: a patch straddles up to four tiles, and patches
    read in row-major order meet each tile again in the next patch and the next patch row, so each
    tile is decoded once (a 256-px patch on Aperio's 240-px tiles otherwise decodes 2.2 tiles).

    Parameters
    ----------
    path : path-like
        The slide file.
    level : int
        Pyramid level (tifffile's ``series[0].levels`` order, the same as tiffslide's).
    downsample : float
        Level-0 pixels per pixel of ``level``.

    Raises
    ------
    ValueError
        When the file or level is not a tiled, uint8, contiguous TIFF level this reader handles.
    """

    backend = "tifffile-tiles"

    def __init__(self, path: str | os.PathLike, level: int, downsample: float):
        import tifffile

        self.path = Path(path)
        self.level = level
        self.downsample = downsample
        self._tiff = tifffile.TiffFile(self.path)
        try:
            page = self._tiff.series[0].levels[level].keyframe
            if not (page.is_tiled and page.dtype == np.uint8 and page.planarconfig == 1 and page.tiledepth == 1
                    and page.samplesperpixel in (1, 3, 4)):
                raise ValueError(f"{self.path}: level {level} is not a tiled uint8 RGB(A) TIFF level")
            self._page = page
            self._offsets, self._counts = page.dataoffsets, page.databytecounts
            self._size = (page.imagewidth, page.imagelength)
            self._tile = (page.tilewidth, page.tilelength)
            self._tiles_across = -(-page.imagewidth // page.tilewidth)
            self._fd = os.open(self.path, os.O_RDONLY)
        except Exception:
            self._tiff.close()
            raise
        tile_bytes = page.tilewidth * page.tilelength * 3
        rows = _TILE_ROWS_CACHED * self._tiles_across
        self._cache = _TileCache(max(_TILES_CACHED_AT_LEAST, min(rows, _TILE_CACHE_BYTES // tile_bytes)))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region at level-0 ``location``, ``size`` px of ``level`` (white outside)."""
        if level != self.level:
            raise ValueError(f"this reader reads level {self.level}, not {level}")
        x, y = (int(v) for v in location)
        width, height = (int(v) for v in size)
        # Same rounding to level pixels as Slide's tiffslide reads.
        left, top = round(x / self.downsample), round(y / self.downsample)
        region = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, self._size[0]), min(top + height, self._size[1])
        tile_w, tile_h = self._tile
        try:
            for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1) if y0 < y1 and x0 < x1 else ():
                for col in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
                    tile = self._decoded(row * self._tiles_across + col)
                    ax, ay = max(x0, col * tile_w), max(y0, row * tile_h)
                    bx, by = min(x1, (col + 1) * tile_w), min(y1, (row + 1) * tile_h)
                    region[ay - top:by - top, ax - left:bx - left] = \
                        tile[ay - row * tile_h:by - row * tile_h, ax - col * tile_w:bx - col * tile_w]
        except Exception as exc:  # a damaged tile: name the slide and the patch, like Slide does
            cause = " ".join(str(exc).split()) or type(exc).__name__
            raise IpspathError(f"{self.path}: cannot read region at level-0 ({x}, {y}), level {level}: "
                               f"{cause}") from exc
        return region

    @property
    def decodes(self) -> int:
        """Tiles decoded so far (each once, unless the cache dropped it before its last use)."""
        return self._cache.misses

    def _decoded(self, index: int) -> np.ndarray:
        """Tile ``index`` as (tile_h, tile_w, 3) RGB, from the shared cache (decoded once)."""
        return self._cache.get(index, self._decode)

    def _decode(self, index: int) -> np.ndarray:
        count = int(self._counts[index])
        if count == 0:  # a sparse tile: never written
            return np.full((self._tile[1], self._tile[0], 3), 255, dtype=np.uint8)
        data = os.pread(self._fd, count, int(self._offsets[index]))
        pixels = self._page.decode(data, index, jpegtables=self._page.jpegtables)[0]
        return rgb_on_white(pixels.reshape(pixels.shape[-3:]))

    def close(self) -> None:
        """Release the file; calling it twice is harmless."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._tiff.close()

    def __enter__(self) -> TiffTileReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _TileCache:
    """Decoded tiles shared by reader threads, least recently used out first; each tile decoded once.

    The first thread to ask for a tile decodes it (outside the lock); threads asking meanwhile wait for
    that result instead of decoding it again. A tile that fails to decode is not kept, and every
    thread waiting for it gets the error.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tiles: OrderedDict[int, Future] = OrderedDict()
        self.misses = 0  # tiles decoded so far

    def get(self, index: int, decode: Callable[[int], np.ndarray]) -> np.ndarray:
        with self._lock:
            entry = self._tiles.get(index)
            owner = entry is None
            if owner:
                self.misses += 1
                entry = self._tiles[index] = Future()
                while len(self._tiles) > self.capacity:
                    self._tiles.popitem(last=False)  # a waiting thread keeps its own reference
            else:
                self._tiles.move_to_end(index)
        if owner:
            try:
                entry.set_result(decode(index))
            except BaseException as exc:
                entry.set_exception(exc)
                with self._lock:
                    if self._tiles.get(index) is entry:
                        del self._tiles[index]
        return entry.result()


# Patches read in row-major order, a few chunks at a time, touch about three rows of tiles at once.
_TILE_ROWS_CACHED = 4
_TILE_CACHE_BYTES = 256 * 2**20
_TILES_CACHED_AT_LEAST = 64


def open_for_reading(store: TileStore, backend: str = "auto",
                     slide_mpp: float | None = None) -> Slide | TiffTileReader:
    """Open the slide of ``store`` for reading its patches, with the fastest reader that sees its pyramid.

    ``backend="auto"``: a :class:`TiffTileReader` on the read level when tiffslide sees the pyramid
    the store was tiled on (same level-0 size and read-level size) and that level is tiled; a
    tiffslide :class:`Slide` when the level is not tiled; openslide otherwise (DICOM, MIRAX,
    another pyramid). An explicit ``backend`` is used as it is.
    """
    if backend != "auto":
        return Slide(store.slide_path, backend=backend, slide_mpp=slide_mpp)
    expected = (store.attrs.get("slide_dimensions"), store.attrs.get("read_level_dimensions"))
    try:
        slide = Slide(store.slide_path, backend="tiffslide", slide_mpp=slide_mpp)
    except IpspathError:
        return Slide(store.slide_path, backend="openslide", slide_mpp=slide_mpp)
    level = store.read_level
    seen = (list(slide.dimensions), list(slide.level_dimensions[level]) if level < slide.level_count else None)
    if None in expected or seen != (list(expected[0]), list(expected[1])):
        slide.close()
        return Slide(store.slide_path, backend="openslide", slide_mpp=slide_mpp)
    downsample = slide.level_downsamples[level]
    try:
        reader = TiffTileReader(store.slide_path, level, downsample)
    except (ValueError, IndexError, OSError):
        return slide
    slide.close()
    return reader


def _read_patches(slide: Slide | TiffTileReader, coords: np.ndarray, a: int, b: int, offset: int, level: int,
                  read_size: int, out: np.ndarray, stop: threading.Event) -> None:
    """Read patches ``a:b`` of ``coords`` into ``out[a - offset : b - offset]`` (runs in a reader thread).

    Returns early once ``stop`` is set: the stream has ended and nobody will use the pixels.
    """
    for i in range(a, b):
        if stop.is_set():
            return
        x, y = coords[i]
        out[i - offset] = slide.read_region((int(x), int(y)), level, (read_size, read_size))
