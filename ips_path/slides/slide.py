"""Whole-slide images: one :class:`Slide` type over openslide and tiffslide.

Both backends answer the same questions (levels, downsamples, level-0 µm/px, vendor,
objective power, associated images) and return the same pixels: RGB ``uint8`` arrays,
never RGBA, with areas outside the slide white.

The level-0 pixel size is resolved in this order and the source recorded in
:attr:`Slide.mpp_source`:

1. ``slide_mpp`` given by the caller (``--slide-mpp``, manifest ``mpp`` column): ``"override"``;
2. scanner metadata (Aperio ``MPP``, DICOM pixel spacing, ...): ``"metadata"``;
3. TIFF resolution tags, only with a real unit (centimetre or inch) and not the 72 or 96 dpi
   that image writers put in by default: ``"tiff-tags"``;
4. the objective power, as 10 µm/px at 1x, with a logged warning: ``"objective-power"``;
5. nothing: ``level0_mpp`` is None and :meth:`Slide.require_mpp` raises an error naming
   ``--slide-mpp``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import openslide
import tifffile
import tiffslide

from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.runtime.limits import PIXEL_SIZE_UM

__all__ = ["BACKENDS", "READ_BLOCK", "WSI_EXTENSIONS", "Slide", "read_low_resolution", "rgb_on_white"]

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide")
#: Largest level-0 side a slide may declare, px: 1 m at 0.25 µm/px, far beyond any glass slide; a
#: larger one is a damaged or hostile header that would make every reader allocate petabytes.
MAX_SIDE_PX = 4_000_000

#: File extensions (lower case, with the dot) of slide formats that openslide or tiffslide read;
#: used to find slides when a folder is given.
WSI_EXTENSIONS: frozenset[str] = frozenset({
    ".svs", ".tif", ".tiff", ".btf", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
    ".bif", ".dcm", ".czi", ".qptiff",
})

# Vendors whose mpp openslide/tiffslide take from TIFF resolution tags rather than scanner
# metadata; their tags are checked like any other TIFF's (unit, default dpi).
_GENERIC_VENDORS = (None, "generic-tiff")
# Image writers fill in these resolutions when they know nothing (dots per inch).
_PLACEHOLDER_DPI = (72.0, 96.0)
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25_400.0}
# Mean µm/px at 1x magnification, the usual convention: 0.5 µm/px at 20x, 0.25 at 40x.
_UM_PER_PX_AT_1X = 10.0
# A read that fails is tried once more on a fresh openslide handle: the failure may come from
# another thread's bad read, which puts the shared handle in an error state.
_OPENSLIDE_READ_ATTEMPTS = 2

T = TypeVar("T")


class Slide:
    """A whole-slide image opened with openslide or tiffslide.

    Parameters
    ----------
    path : str or os.PathLike
        The slide file (for DICOM, any one file of the series).
    backend : {"auto", "openslide", "tiffslide"}
        "auto" tries openslide, then tiffslide. Only openslide reads DICOM and MIRAX.
    slide_mpp : float, optional
        Level-0 pixel size in µm/px, used instead of what the file says (both x and y).

    Raises
    ------
    BadInputError
        When the file is missing, empty or no backend can open it; the one-line message
        names the file and the cause from each backend tried.

    Notes
    -----
    :meth:`read_region` may be called from several threads on one ``Slide``.
    """

    path: pathlib.Path
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    level0_mpp: tuple[float, float] | None
    mpp_source: str | None
    objective_power: float | None
    associated_images: tuple[str, ...]

    def __init__(self, path: str | os.PathLike, backend: str = "auto", slide_mpp: float | None = None):
        self.path = pathlib.Path(path)
        if backend not in ("auto", *BACKENDS):
            raise BadInputError(f"unknown slide backend {backend!r}: use auto, openslide or tiffslide")
        if slide_mpp is not None:
            PIXEL_SIZE_UM.check(slide_mpp, f"{self.path}: level-0 pixel size (--slide-mpp or the manifest's mpp)")
        self._check_is_file()
        self._reopen_lock = threading.Lock()
        self._handle, self.backend = self._open(backend)

        handle = self._handle
        props = dict(handle.properties)
        prefix = self.backend
        vendor = props.get(f"{prefix}.vendor")
        self.vendor = str(vendor) if vendor else None
        self.dimensions = _int_pair(handle.dimensions)
        self.level_count = int(handle.level_count)
        self.level_dimensions = tuple(_int_pair(d) for d in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        width, height = self.dimensions
        if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
            self.close()
            raise BadInputError(f"{self.path}: declares {width:,} x {height:,} px, beyond any slide (at most "
                                f"{MAX_SIDE_PX:,} px a side); the file is damaged or not a slide: re-export it")
        self.objective_power = _positive_float(props.get(f"{prefix}.objective-power"))
        self.associated_images = tuple(sorted(handle.associated_images.keys()))
        self.level0_mpp, self.mpp_source = _resolve_mpp(props, prefix, self.vendor, self.objective_power,
                                                        slide_mpp)
        if self.mpp_source == "objective-power":
            log.warning("%s: no pixel size in the metadata; assuming %.4g µm/px from objective power "
                        "%gx (pass --slide-mpp to set it exactly)", self.path, self.level0_mpp[0],
                        self.objective_power)

    # -- opening -------------------------------------------------------------------------------

    def _check_is_file(self) -> None:
        if not self.path.exists():
            raise BadInputError(f"{self.path}: cannot open as a slide: no such file")
        if self.path.is_dir():
            raise BadInputError(f"{self.path}: cannot open as a slide: it is a folder; "
                                "give a slide file (for DICOM, any .dcm file of the slide)")
        if self.path.stat().st_size == 0:
            raise BadInputError(f"{self.path}: cannot open as a slide: the file is empty (0 bytes)")

    def _open(self, backend: str) -> tuple[Any, str]:
        causes = []
        for name in BACKENDS if backend == "auto" else (backend,):
            try:
                opener = _open_openslide if name == "openslide" else _open_tiffslide
                return opener(self.path), name
            except _OpenFailed as exc:
                causes.append(f"{name}: {exc}")
        raise BadInputError(f"{self.path}: cannot open as a slide: {'; '.join(causes)}")

    def _with_handle(self, operation: Callable[[Any], T], failure: str) -> T:
        """Run ``operation(handle)``; wrap a backend failure into one IpspathError line.

        An openslide handle that failed stays in an error state, so it is replaced with a fresh
        one (threads still holding the old handle keep their reference until they finish).
        """
        attempts_left = _OPENSLIDE_READ_ATTEMPTS if self.backend == "openslide" else 1
        while True:
            handle = self._handle
            if handle is None:
                raise IpspathError(f"{self.path}: {failure}: the slide is closed")
            try:
                return operation(handle)
            except (openslide.OpenSlideError, RuntimeError, ValueError, OSError) as exc:
                if self.backend == "openslide":
                    self._replace_openslide_handle(handle)
                attempts_left -= 1
                if attempts_left == 0:
                    raise IpspathError(f"{self.path}: {failure}: {_one_line(exc)}") from exc

    def _replace_openslide_handle(self, failed: Any) -> None:
        with self._reopen_lock:
            if self._handle is not failed:  # another thread already replaced it
                return
            try:
                self._handle = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideError as exc:
                raise IpspathError(f"{self.path}: cannot reopen the slide after a read error: "
                                   f"{_one_line(exc)}") from exc

    # -- pixel size ----------------------------------------------------------------------------

    def require_mpp(self, fix: str | None = None) -> tuple[float, float]:
        """Level-0 pixel size (x, y) in µm/px; raises BadInputError when it is unknown.

        ``fix`` is how the caller's command takes the pixel size; default: ``--slide-mpp`` or the
        manifest's ``mpp`` column (``ipspath tile``, ``ipspath inspect``).
        """
        if self.level0_mpp is None:
            raise BadInputError(
                f"{self.path}: the pixel size is unknown (no scanner metadata, TIFF resolution or "
                "objective power); "
                f"{fix or 'pass --slide-mpp MICRONS_PER_PIXEL or give an `mpp` column in the manifest'}")
        return self.level0_mpp

    def level_mpp(self, level: int) -> float:
        """Mean of the x and y pixel size in µm/px at ``level``; needs a known mpp."""
        mpp_x, mpp_y = self.require_mpp()
        return (mpp_x + mpp_y) / 2 * self.level_downsamples[self._check_level(level)]

    # -- pixels --------------------------------------------------------------------------------

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region as RGB.

        Parameters
        ----------
        location : (int, int)
            Level-0 (x, y) of the top-left corner, in pixels.
        level : int
            Pyramid level to read from.
        size : (int, int)
            (width, height) in pixels at ``level``.

        Returns
        -------
        np.ndarray
            (height, width, 3) ``uint8`` RGB; parts outside the slide are white (255).

        Raises
        ------
        IpspathError
            When the slide file cannot be decoded there; the slide stays usable.
        """
        x, y = (int(v) for v in location)
        width, height = (int(v) for v in size)
        level = self._check_level(level)
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        read = self._read_openslide if self.backend == "openslide" else self._read_tiffslide
        return self._with_handle(lambda handle: read(handle, x, y, level, width, height),
                                 f"cannot read region at level-0 ({x}, {y}), level {level}")

    @staticmethod
    def _read_openslide(handle: Any, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return rgb_on_white(np.asarray(handle.read_region((x, y), level, (width, height))))

    def _read_tiffslide(self, handle: Any, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        # Read the part inside the level from the zarr view and paste it on white: tiffslide's own
        # padding is black. Level coordinates are rounded to the nearest pixel, the closest match
        # to openslide, which shifts by the fraction of a pixel (interpolating) instead.
        downsample = self.level_downsamples[level]
        level_width, level_height = self.level_dimensions[level]
        left, top = round(x / downsample), round(y / downsample)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, level_width), min(top + height, level_height)
        region = np.full((height, width, 3), 255, dtype=np.uint8)
        if x0 < x1 and y0 < y1:
            pixels = np.asarray(handle.zarr_group[str(level)][y0:y1, x0:x1])
            region[y0 - top:y1 - top, x0 - left:x1 - left] = rgb_on_white(pixels)
        return region

    def get_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        """The whole slide as (h, w, 3) ``uint8`` RGB fitting in ``max_size`` (w, h), aspect kept."""
        size = _int_pair(max_size)
        return self._with_handle(lambda handle: rgb_on_white(np.asarray(handle.get_thumbnail(size))),
                                 f"cannot read a {size[0]}x{size[1]} thumbnail")

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (e.g. "label", "macro", "thumbnail") as (h, w, 3) ``uint8`` RGB."""
        if name not in self.associated_images:
            have = ", ".join(self.associated_images) or "none"
            raise BadInputError(f"{self.path}: no associated image {name!r} (it has: {have})")
        return self._with_handle(lambda handle: rgb_on_white(np.asarray(handle.associated_images[name])),
                                 f"cannot read associated image {name!r}")

    # -- the rest ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the slide holds, as a JSON-able dict (what ``ipspath inspect --json`` prints)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "levels": [list(d) for d in self.level_dimensions],
            "downsamples": list(self.level_downsamples),
            "level0_mpp": list(self.level0_mpp) if self.level0_mpp else None,
            "level_mpp": ([self.level_mpp(level) for level in range(self.level_count)]
                          if self.level0_mpp else None),
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": list(self.associated_images),
        }

    def close(self) -> None:
        """Release the file; calling it twice is harmless."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r})"

    def _check_level(self, level: int) -> int:
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range: {self.path} has {self.level_count} levels")
        return int(level)


class _OpenFailed(Exception):
    """One backend could not open the file; the message says why."""


def _open_openslide(path: pathlib.Path) -> Any:
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise _OpenFailed("not a format it reads") from exc
    except openslide.OpenSlideError as exc:
        raise _OpenFailed(_one_line(exc)) from exc


def _open_tiffslide(path: pathlib.Path) -> Any:
    try:
        with _quiet_logger("tifffile"):  # its warnings about a broken file end up in our message
            handle = tiffslide.TiffSlide(str(path))
            problem = _tiffslide_problem(handle)  # tiffslide parses lazily: this reads the structure
    except tifffile.TiffFileError as exc:
        raise _OpenFailed(_one_line(exc)) from exc
    except (IndexError, KeyError, ValueError, OSError) as exc:
        # tifffile found a header but no image directory it could follow
        raise _OpenFailed(f"no readable image in the TIFF structure, truncated or corrupt file? "
                          f"({type(exc).__name__}: {_one_line(exc)})") from exc
    if problem:
        handle.close()
        raise _OpenFailed(problem)
    return handle


def _tiffslide_problem(handle: tiffslide.TiffSlide) -> str | None:
    """Why tiffslide, having opened a file, could not read its pixels; None if it can."""
    # tiffslide opens files whose compression nothing here decodes, which then fail on every
    # read; refusing them at open gives the clearer error.
    axes = handle.properties["tiffslide.series-axes"]
    if axes not in ("YXS", "YX"):
        return f"unsupported image layout {axes!r} (expected RGB or grey pixels)"
    for level in handle.ts_tifffile.series[0].levels:
        compression = level.keyframe.compression
        if not isinstance(compression, tifffile.COMPRESSION):
            return f"unsupported TIFF compression {compression}"
    return None


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Let only errors of logger ``name`` through while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _resolve_mpp(props: dict[str, Any], prefix: str, vendor: str | None, objective_power: float | None,
                 slide_mpp: float | None) -> tuple[tuple[float, float] | None, str | None]:
    """Level-0 (x, y) µm/px and where it came from; see the module docstring for the order."""
    if slide_mpp is not None:
        return (float(slide_mpp), float(slide_mpp)), "override"
    if vendor not in _GENERIC_VENDORS:
        mpp = _positive_float(props.get(f"{prefix}.mpp-x")), _positive_float(props.get(f"{prefix}.mpp-y"))
        if mpp[0] and mpp[1]:
            return mpp, "metadata"
    mpp_from_tags = _mpp_from_tiff_tags(props)
    if mpp_from_tags is not None:
        return mpp_from_tags, "tiff-tags"
    if objective_power:
        mpp_guess = _UM_PER_PX_AT_1X / objective_power
        return (mpp_guess, mpp_guess), "objective-power"
    return None, None


def _mpp_from_tiff_tags(props: dict[str, Any]) -> tuple[float, float] | None:
    """µm/px from XResolution/YResolution when the unit is real and the value is not a default."""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    resolution = (_positive_float(props.get("tiff.XResolution")),
                  _positive_float(props.get("tiff.YResolution")))
    if unit not in _UM_PER_UNIT or not (resolution[0] and resolution[1]):
        return None
    dpi = [r * (2.54 if unit == "centimeter" else 1.0) for r in resolution]
    if any(math.isclose(d, placeholder, rel_tol=0.01) for d in dpi for placeholder in _PLACEHOLDER_DPI):
        log.debug("ignoring TIFF resolution %s dpi: an image writer's default, not a pixel size", dpi)
        return None
    return _UM_PER_UNIT[unit] / resolution[0], _UM_PER_UNIT[unit] / resolution[1]


def rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB from grey, RGB or RGBA pixels; transparent parts become white."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    rgb, alpha = pixels[..., :3], pixels[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # openslide-python returns straight (not premultiplied) alpha
    blended = (rgb.astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16)) + 127) // 255
    return blended.astype(np.uint8)


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _int_pair(pair: Any) -> tuple[int, int]:
    first, second = pair
    return int(first), int(second)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- block-wise low-resolution reads -------------------------------------------------------------

READ_BLOCK = 2048  # level pixels per side of one read_region call of a low-resolution read


def read_low_resolution(
    slide: Slide,
    downsample: tuple[float, float],
    origin: tuple[float, float] = (0.0, 0.0),
    size: tuple[int, int] | None = None,
    *,
    resampling: str = "bilinear",
    level_tolerance: float = 0.05,
    read_block: int = READ_BLOCK,
    compose_block: int | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, tuple[float, float]]:
    """A region of the slide at a low resolution, read block by block from the best pyramid level.

    The one low-resolution reader of the package: tissue masks, QC pictures, heatmap
    thumbnails, overlay TIFFs and viewer tiles all read through it. It picks the coarsest
    level at most ``level_tolerance`` coarser than ``downsample``, cuts the result into blocks
    of at most ``read_block`` level pixels a side, reads them with ``threads`` threads (slide
    libraries release the GIL) and, when blocks cannot be decoded, raises one error naming the
    first and counting the others.

    Parameters
    ----------
    slide : Slide
    downsample : (float, float)
        Wanted level-0 px per result px along x and y.
    origin : (float, float)
        Level-0 (x, y) of the result's top-left corner, px (``"bilinear"`` only).
    size : (int, int), optional
        (width, height) of the result, px (``"bilinear"`` only; required there).
    resampling : {"bilinear", "box"}
        ``"bilinear"``: each block is resampled (bilinear, antialiased) onto the exact grid
        asked for; for pictures. ``"box"``: the whole slide, the level shrunk by the whole
        factor nearest to the wanted downsample with box averaging (the returned downsample is
        then the level's times that factor); for tissue detection, where no pixel may mix
        with the white outside the slide.
    level_tolerance : float
        A level up to this fraction coarser than wanted is still read (0.05 = 5 %).
    read_block : int
        Level pixels per side of one read, at most.
    compose_block : int, optional
        Result pixels per side of a block composed at once, when smaller than what
        ``read_block`` allows (keeps thumbnails independent of the pyramid).
    threads : int
        Blocks read in parallel.

    Returns
    -------
    image : (h, w, 3) uint8 array
        White outside the slide.
    downsample : (float, float)
        Level-0 px per result px along x and y.

    Raises
    ------
    BadInputError
        When image data cannot be decoded; names the file, the first failing region
        (level-0 x, y and level) and how many more failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from ips_path.tiling.grid import read_level_for_mpp

    if resampling not in ("bilinear", "box"):
        raise ValueError(f"resampling must be 'bilinear' or 'box', got {resampling!r}")
    downsample_x, downsample_y = (float(v) for v in downsample)
    level = read_level_for_mpp(1.0, slide.level_downsamples, min(downsample_x, downsample_y), level_tolerance)
    level_downsample = float(slide.level_downsamples[level])
    if resampling == "box":
        if size is not None or tuple(origin) != (0.0, 0.0):
            raise ValueError("box resampling reads the whole slide: give neither origin nor size")
        factor = max(1, round(min(downsample_x, downsample_y) / level_downsample))
        level_width, level_height = slide.level_dimensions[level]
        width, height = -(-level_width // factor), -(-level_height // factor)
        downsample_x = downsample_y = level_downsample * factor
        scale_x = scale_y = float(factor)
        step_x = step_y = max(1, read_block // factor)
    else:
        if size is None:
            raise ValueError("bilinear resampling needs the size of the result")
        width, height = (int(v) for v in size)
        scale_x, scale_y = downsample_x / level_downsample, downsample_y / level_downsample  # level px per px
        step_x, step_y = max(1, int(read_block // scale_x)), max(1, int(read_block // scale_y))
    image = np.empty((height, width, 3), dtype=np.uint8)

    def read_piece(piece: tuple[tuple[int, int, int], tuple[int, int, int]]) -> str | None:
        (block_left, left, piece_w), (block_top, top, piece_h) = piece
        out_x, out_y = block_left + left, block_top + top
        try:
            if resampling == "box":
                read_x, read_y = out_x * factor, out_y * factor
                read_w = min(piece_w * factor, level_width - read_x)  # never past the level: no white mixed in
                read_h = min(piece_h * factor, level_height - read_y)
                region = slide.read_region((round(read_x * level_downsample), round(read_y * level_downsample)),
                                           level, (read_w, read_h))
                if factor > 1:
                    region = np.asarray(Image.fromarray(region).reduce(factor))
            else:
                # the piece in (fractional) level pixels, and the whole-pixel region that holds it
                x0 = (origin[0] + block_left * downsample_x + left * downsample_x) / level_downsample
                y0 = (origin[1] + block_top * downsample_y + top * downsample_y) / level_downsample
                x1, y1 = x0 + piece_w * scale_x, y0 + piece_h * scale_y
                read_x, read_y = math.floor(x0), math.floor(y0)
                read_w, read_h = max(1, math.ceil(x1) - read_x), max(1, math.ceil(y1) - read_y)
                region = slide.read_region((round(read_x * level_downsample), round(read_y * level_downsample)),
                                           level, (read_w, read_h))
                if region.shape[:2] != (piece_h, piece_w) or (x0, y0) != (read_x, read_y):
                    region = np.asarray(Image.fromarray(region).resize(
                        (piece_w, piece_h), Image.Resampling.BILINEAR,
                        box=(x0 - read_x, y0 - read_y, x1 - read_x, y1 - read_y)))
        except IpspathError as exc:  # names the file and the level-0 (x, y) of the region
            return str(exc)
        image[out_y:out_y + piece_h, out_x:out_x + piece_w] = region
        return None

    pieces = [(x, y) for y in _cuts(height, compose_block or height, step_y)
              for x in _cuts(width, compose_block or width, step_x)]
    if threads > 1 and len(pieces) > 1:
        with ThreadPoolExecutor(threads) as pool:
            failures = [failure for failure in pool.map(read_piece, pieces) if failure]
    else:
        failures = [failure for failure in map(read_piece, pieces) if failure]
    if failures:
        more = f" (and {len(failures) - 1} more unreadable regions)" if len(failures) > 1 else ""
        raise BadInputError(f"{failures[0]}{more}; the file is damaged: re-export or re-scan it")
    return image, (downsample_x, downsample_y)


def _cuts(length: int, block: int, step: int) -> list[tuple[int, int, int]]:
    """(block start, offset in the block, width) of the pieces covering ``length`` px: blocks of
    ``block`` px, each cut into pieces of at most ``step`` px."""
    return [(start, offset, min(step, block - offset, length - start - offset))
            for start in range(0, length, block) for offset in range(0, min(block, length - start), step)]
