"""The pixels of generated slides (:mod:`ips_path.synthetic.synth`): stain textures and the painter that composes
tissue, lesions and background at any pyramid level.

Textures are periodic canvases made in optical density (eosin stroma with gaps, hematoxylin nuclei),
once per process and texture seed, and cropped with plain slices, so a tile costs a few array
operations whatever the slide size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft

if TYPE_CHECKING:
    from ips_path.synthetic.spec import Lesion

__all__ = ["BACKGROUND_RGB", "MAX_DOWNSAMPLE", "Painter", "stain_shift_lut"]

#: Glass seen through the microscope: the colour of background and of unstained gaps.
BACKGROUND_RGB = (242, 241, 244)
# Optical density per unit stain (Ruifrok & Johnston 2001, normalised): hematoxylin is blue-purple,
# eosin pink. Colour = background * exp(-(h * H_OD + e * E_OD)).
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_EOSIN_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)
# Texture periods at level 0, in pixels. The two layers repeat at different periods so that
# the image repeats only every lcm = 6144 px; every allowed downsample divides both.
_STROMA_PERIOD = 2048
_NUCLEI_PERIOD = 1536
MAX_DOWNSAMPLE = 512  # divides both periods
# Texture canvases repeat for this many more pixels, so that tiles are cut with plain slices.
_WRAP_MARGIN = 1024
# Tissue alpha = clip((bilinear mask field - 0.5) * sharpness + 0.5): a soft edge a few µm wide.
_EDGE_SHARPNESS = 4.0


@dataclass(frozen=True)
class _TissueLook:
    """How one kind of tissue is stained (concentrations in optical-density units, sizes in µm)."""

    eosin: float
    hematoxylin_background: float
    gap_fraction: float
    nuclei_per_mm2: float
    nucleus_radius_um: tuple[float, float]
    nucleus_elongation: tuple[float, float]
    nucleus_hematoxylin: float


_NORMAL = _TissueLook(eosin=0.42, hematoxylin_background=0.10, gap_fraction=0.10, nuclei_per_mm2=3500,
                      nucleus_radius_um=(2.5, 4.0), nucleus_elongation=(1.3, 2.6), nucleus_hematoxylin=1.1)
_LESION = _TissueLook(eosin=0.25, hematoxylin_background=0.30, gap_fraction=0.02, nuclei_per_mm2=8000,
                      nucleus_radius_um=(3.5, 5.5), nucleus_elongation=(1.0, 1.4), nucleus_hematoxylin=1.6)


def _subtle_lesion_look(nucleus_scale: float) -> _TissueLook:
    """A lesion that differs from normal tissue mostly by its nuclei: ``nucleus_scale`` times larger on
    average, pleomorphic (sizes spread, shapes from round to oval), a little denser and darker."""
    low, high = _NORMAL.nucleus_radius_um
    return _TissueLook(eosin=0.36, hematoxylin_background=0.14, gap_fraction=0.06, nuclei_per_mm2=5000,
                       nucleus_radius_um=(low * nucleus_scale * 0.85, high * nucleus_scale * 1.1),
                       nucleus_elongation=(1.0, 2.2), nucleus_hematoxylin=1.35)


def _lookalike_look(nucleus_scale: float) -> _TissueLook:
    """Benign look-alike clusters: nuclei as large as a lesion's on average but regular (one size, round)
    and normally stained, in normal stroma (as reactive or lymphoid clusters can look)."""
    mean_radius = sum(_NORMAL.nucleus_radius_um) / 2 * nucleus_scale
    return _TissueLook(eosin=0.40, hematoxylin_background=0.12, gap_fraction=0.08, nuclei_per_mm2=5000,
                       nucleus_radius_um=(mean_radius * 0.95, mean_radius * 1.05), nucleus_elongation=(1.0, 1.15),
                       nucleus_hematoxylin=1.15)


def _distractor_look() -> _TissueLook:
    """Benign distractors darker than any lesion but of another texture: small, round, densely packed and
    deeply stained nuclei over a darker background, as lymphocyte aggregates look."""
    return _TissueLook(eosin=0.30, hematoxylin_background=0.22, gap_fraction=0.03, nuclei_per_mm2=16000,
                       nucleus_radius_um=(2.0, 2.6), nucleus_elongation=(1.0, 1.1), nucleus_hematoxylin=2.0)


def stain_shift_lut(strength: float, rng: np.random.Generator) -> np.ndarray | None:
    """A (3, 256) uint8 lookup table that changes a slide's staining as another lab's would.

    Each channel's optical density is scaled by ``exp(N(0, strength))``; so 0.15 moves darker stain
    by about 15 % per channel. None when ``strength`` is 0 (no change).
    """
    if strength <= 0:
        return None
    scale = np.exp(rng.normal(0.0, strength, 3))
    values = np.arange(256, dtype=np.float64)
    lut = np.empty((3, 256), dtype=np.uint8)
    for channel in range(3):
        background = float(BACKGROUND_RGB[channel])
        density = -np.log(np.clip(values, 1, background) / background)
        lut[channel] = np.clip(background * np.exp(-density * scale[channel]) + 0.5, 0, 255).astype(np.uint8)
        lut[channel, values > background] = values[values > background].astype(np.uint8)
    return lut


class Painter:
    """Composes slide pixels at any power-of-two downsample from the mask field, textures and lesions.

    Parameters
    ----------
    mask_field : (h, w) float32 array
        Smooth tissue field, tissue where > 0.5, one value per mask cell.
    cell_px : float
        Level-0 pixels per mask cell.
    lesions, lookalikes, distractors : sequence of Lesion
        Regions painted with the lesion, the look-alike and the dark distractor texture.
    mpp : float
        Level-0 µm/px.
    texture_seed : int
        Seed of the stain textures (shared by slides "from one lab").
    rng : numpy.random.Generator
        Where each texture layer starts on this slide.
    nucleus_scale : float, optional
        None: the classic lesion (dense, large, dark nuclei, little stroma). A number: a subtle lesion
        whose nuclei are this many times larger than normal and pleomorphic; look-alikes then have
        nuclei as large but regular.
    stain_lut : (3, 256) uint8 array, optional
        Per-channel lookup table applied to the tissue (see :func:`stain_shift_lut`).
    """

    def __init__(self, mask_field: np.ndarray, cell_px: float, lesions: Sequence[Lesion], mpp: float,
                 texture_seed: int, rng: np.random.Generator, *, lookalikes: Sequence[Lesion] = (),
                 distractors: Sequence[Lesion] = (), nucleus_scale: float | None = None,
                 stain_lut: np.ndarray | None = None):
        self.mask_field = mask_field
        self.cell_px = cell_px
        self.regions = {"lesion": tuple(lesions), "lookalike": tuple(lookalikes), "distractor": tuple(distractors)}
        self.background = np.array(BACKGROUND_RGB, dtype=np.uint16)
        self.stain_lut = stain_lut
        scale = 1.4 if nucleus_scale is None else nucleus_scale
        looks = {"normal": _NORMAL, "lesion": _LESION if nucleus_scale is None else _subtle_lesion_look(scale),
                 "lookalike": _lookalike_look(scale), "distractor": _distractor_look()}
        # texture seeds by kind (normal +0, lesion +1, look-alike +2, distractor +3); only the kinds the slide
        # shows are made
        self.textures = {name: _PeriodicTexture(_texture_pyramids(look, float(mpp), texture_seed + k), rng)
                         for k, (name, look) in enumerate(looks.items())
                         if name == "normal" or self.regions[name]}

    def paint(self, downsample: int, left: int, top: int, width: int, height: int) -> np.ndarray | None:
        """(height, width, 3) uint8 pixels of the region at ``downsample`` whose top-left pixel is
        (left, top) in that level's pixels; None where it is all background."""
        # level-0 coordinates of the pixel centres, and where they fall on the mask grid
        xs = (np.arange(left, left + width) + 0.5) * downsample
        ys = (np.arange(top, top + height) + 0.5) * downsample
        cells_x = np.clip(xs / self.cell_px - 0.5, 0, self.mask_field.shape[1] - 1)
        cells_y = np.clip(ys / self.cell_px - 0.5, 0, self.mask_field.shape[0] - 1)
        first_row, first_col = int(cells_y[0]), int(cells_x[0])
        block = self.mask_field[first_row:int(cells_y[-1]) + 2, first_col:int(cells_x[-1]) + 2]
        if block.max() <= 0.5 - 0.5 / _EDGE_SHARPNESS:  # bilinear values stay within their corners
            return None

        pixels = self.textures["normal"].crop(downsample, left, top, width, height)
        for kind, regions in self.regions.items():
            for region in regions:
                reach = region.max_radius
                if xs[0] - reach < region.x < xs[-1] + reach and ys[0] - reach < region.y < ys[-1] + reach:
                    inside = region.contains(xs[None, :], ys[:, None])
                    if inside.any():
                        region_pixels = self.textures[kind].crop(downsample, left, top, width, height)
                        pixels = np.where(inside[..., None], region_pixels, pixels)
        if self.stain_lut is not None:
            pixels = np.stack([self.stain_lut[c][pixels[..., c]] for c in range(3)], axis=-1)
        if block.min() >= 0.5 + 0.5 / _EDGE_SHARPNESS:
            return pixels
        field_values = _bilinear(block, cells_y - first_row, cells_x - first_col)
        # alpha in 1/256 steps; integer blending keeps this, the costliest tile kind, cheap
        alpha = (np.clip((field_values - 0.5) * _EDGE_SHARPNESS + 0.5, 0, 1) * 256).astype(np.uint16)[..., None]
        blended = pixels * alpha + self.background * (256 - alpha)
        return (blended >> 8).astype(np.uint8)


def _bilinear(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(rows), len(cols)) float32 linear interpolation of a 2-D array at fractional indices."""
    top = rows.astype(int)
    bottom = np.minimum(top + 1, values.shape[0] - 1)
    down = (rows - top).astype(np.float32)[:, None]
    along_rows = values[top] * (1 - down) + values[bottom] * down
    left = cols.astype(int)
    right = np.minimum(left + 1, values.shape[1] - 1)
    across = (cols - left).astype(np.float32)
    return along_rows[:, left] * (1 - across) + along_rows[:, right] * across


class _PeriodicTexture:
    """A tissue's stroma and nuclei layers, cropped at any level; the layers combine as the darker."""

    def __init__(self, pyramids: tuple[dict[int, tuple[np.ndarray, int]], ...], rng: np.random.Generator):
        # Each slide starts each layer at its own offset, a multiple of every downsample so that
        # the levels line up.
        self.layers = []
        for pyramid in pyramids:
            steps = pyramid[1][1] // MAX_DOWNSAMPLE
            offset_x, offset_y = (int(v) * MAX_DOWNSAMPLE for v in rng.integers(0, steps, 2))
            self.layers.append((offset_x, offset_y, pyramid))

    def crop(self, downsample: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 texture of the region at ``downsample``."""
        crops = []
        for offset_x, offset_y, pyramid in self.layers:
            canvas, period = pyramid[downsample]
            row, col = (top + offset_y // downsample) % period, (left + offset_x // downsample) % period
            if row + height <= canvas.shape[0] and col + width <= canvas.shape[1]:
                crops.append(canvas[row:row + height, col:col + width])
            else:  # larger than the wrap margin
                rows = np.arange(row, row + height) % period
                crops.append(np.take(canvas[rows], np.arange(col, col + width) % period, axis=1))
        return np.minimum(*crops)


@functools.lru_cache(maxsize=4)
def _texture_pyramids(look: _TissueLook, mpp: float, seed: int) -> tuple[dict[int, tuple[np.ndarray, int]], ...]:
    """Stroma and nuclei canvases of ``look`` at every power-of-two downsample up to the largest,
    as {downsample: (canvas, period)}; each canvas repeats itself for ``_WRAP_MARGIN`` more pixels
    so that crops of up to that size are plain slices.

    Cached: the slides of a cohort share their textures, which take longer to make than the tiles
    of a small slide.
    """
    rng = np.random.default_rng([seed, 5])
    canvases = (_stroma_canvas(look, mpp, _STROMA_PERIOD, rng), _nuclei_canvas(look, mpp, _NUCLEI_PERIOD, rng))
    pyramids = []
    for canvas in canvases:
        pyramid, level = {}, canvas.astype(np.float32)
        for downsample in (2**k for k in range(MAX_DOWNSAMPLE.bit_length())):
            if downsample > 1:
                n = level.shape[0] // 2
                level = level.reshape(n, 2, n, 2, 3).mean(axis=(1, 3))
            period = level.shape[0]
            repeats = 1 + math.ceil(_WRAP_MARGIN / period)
            wrapped = np.tile((level + 0.5).astype(np.uint8), (repeats, repeats, 1))
            pyramid[downsample] = (wrapped[:period + _WRAP_MARGIN, :period + _WRAP_MARGIN], period)
        pyramids.append(pyramid)
    return tuple(pyramids)


def _periodic_noise(rng: np.random.Generator, n: int, sigma_px: tuple[float, float],
                    angle: float = 0.0) -> np.ndarray:
    """Tileable (n, n) float32 Gaussian-filtered white noise, zero mean, unit standard deviation.

    ``sigma_px`` is the filter's (along, across) standard deviation in pixels, the "along" axis
    at ``angle`` radians from x: elongated filters give fibres.
    """
    spectrum = scipy.fft.rfft2(rng.standard_normal((n, n), dtype=np.float32))
    fy = np.fft.fftfreq(n).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(n).astype(np.float32)[None, :]
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along, across = (fx * cos + fy * sin) * np.float32(sigma_px[0]), (fy * cos - fx * sin) * np.float32(sigma_px[1])
    spectrum *= np.exp(np.float32(-2 * np.pi**2) * (along * along + across * across))
    spectrum[0, 0] = 0  # zero mean
    noise = scipy.fft.irfft2(spectrum, s=(n, n))
    noise /= noise.std() + np.float32(1e-12)
    return noise


def _optical_density_to_rgb(hematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Colour of stain concentrations (Beer-Lambert) over the background light, (n, n, 3) uint8."""
    rgb = np.empty((*hematoxylin.shape, 3), dtype=np.uint8)
    for channel in range(3):
        density = hematoxylin * _HEMATOXYLIN_OD[channel] + eosin * _EOSIN_OD[channel]
        np.exp(-density, out=density)
        density *= np.float32(BACKGROUND_RGB[channel])
        density += np.float32(0.5)
        rgb[..., channel] = density
    return rgb


def _stroma_canvas(look: _TissueLook, mpp: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Eosin stroma: wavy fibres, blotchy staining and unstained gaps (fat, lumina), (n, n, 3)."""
    fibres = sum(_periodic_noise(rng, n, (8.0 / mpp, 0.8 / mpp), angle=rng.uniform(0, np.pi)) for _ in range(2))
    fibres /= np.float32(np.sqrt(2))
    blotches = _periodic_noise(rng, n, (15.0 / mpp, 15.0 / mpp))
    gap_field = _periodic_noise(rng, n, (12.0 / mpp, 12.0 / mpp))
    gap_level = float(np.quantile(gap_field, 1 - look.gap_fraction)) if look.gap_fraction > 0 else np.inf
    stained = 1 / (1 + np.exp(-(gap_level - gap_field) * 8))  # 0 in gaps, soft edge
    eosin = np.clip(look.eosin * (1 + 0.35 * fibres + 0.2 * blotches), 0.02, None) * stained
    hematoxylin = np.clip(look.hematoxylin_background * (1 + 0.3 * blotches), 0, None) * stained
    return _optical_density_to_rgb(hematoxylin, eosin)


def _nuclei_canvas(look: _TissueLook, mpp: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Hematoxylin nuclei (soft ellipses with chromatin grain) on white, tileable, (n, n, 3)."""
    coverage = np.zeros((n, n), dtype=np.float32)
    area_mm2 = (n * mpp / 1000) ** 2
    count = rng.poisson(look.nuclei_per_mm2 * area_mm2)
    radius_px = rng.uniform(*look.nucleus_radius_um, count) / mpp
    elongation = rng.uniform(*look.nucleus_elongation, count)
    angle = rng.uniform(0, np.pi, count)
    centre = rng.uniform(0, n, (count, 2))
    # Stamp nuclei in groups of similar size so each group shares one footprint grid.
    reach = int(np.ceil(radius_px.max() * np.sqrt(elongation.max()))) + 2
    offsets = np.arange(-reach, reach + 1)
    for group in np.array_split(np.argsort(radius_px), max(1, count // 256)):
        if group.size == 0:
            continue
        dy = offsets[None, :, None] - (centre[group, 1:2, None] % 1)
        dx = offsets[None, None, :] - (centre[group, 0:1, None] % 1)
        cos, sin = np.cos(angle[group])[:, None, None], np.sin(angle[group])[:, None, None]
        semi_major = (radius_px[group] * np.sqrt(elongation[group]))[:, None, None]
        semi_minor = (radius_px[group] / np.sqrt(elongation[group]))[:, None, None]
        distance = np.sqrt(((dx * cos + dy * sin) / semi_major) ** 2 + ((dy * cos - dx * sin) / semi_minor) ** 2)
        value = np.clip((1 - distance) * semi_minor, 0, 1).astype(np.float32)  # ~1 px soft edge
        rows = (np.floor(centre[group, 1]).astype(int)[:, None, None] + offsets[None, :, None]) % n
        cols = (np.floor(centre[group, 0]).astype(int)[:, None, None] + offsets[None, None, :]) % n
        np.maximum.at(coverage, (rows, cols), value)
    grain = 1 + 0.25 * _periodic_noise(rng, n, (0.6 / mpp, 0.6 / mpp))
    hematoxylin = coverage * look.nucleus_hematoxylin * grain
    eosin = coverage * 0.1
    nuclei = _optical_density_to_rgb(hematoxylin, eosin)
    nuclei[coverage == 0] = 255  # transparent where there is no nucleus: the stroma shows
    return nuclei
