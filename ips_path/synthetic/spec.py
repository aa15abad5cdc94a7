"""What a generated slide holds: its geometry, the lesions and look-alikes drawn on it, and the ground
truth a test reads from them (which patches lie in a lesion, and how much of each)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Lesion", "SlideSpec", "in_lesion", "lesion_fractions", "patch_kinds", "star_radius"]


@dataclass(frozen=True)
class Lesion:
    """A star-shaped lesion in level-0 pixels.

    Its edge is at ``radius * (1 + sum_k a_k cos(k * angle + phase_k))`` from the centre, k = 2, 3, ...
    """

    x: float
    y: float
    radius: float
    harmonics: tuple[tuple[float, float], ...] = ()  # (a_k, phase_k) for k = 2, 3, ...

    @property
    def max_radius(self) -> float:
        """Distance from the centre to the farthest point of the edge, level-0 px."""
        return self.radius * (1 + sum(abs(a) for a, _ in self.harmonics))

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether the level-0 points (xs, ys) lie inside; boolean array of their broadcast shape."""
        dx, dy = np.asarray(xs, dtype=np.float64) - self.x, np.asarray(ys, dtype=np.float64) - self.y
        edge = self._edge_radius(np.arctan2(dy, dx))
        return dx * dx + dy * dy <= edge * edge

    def polygon(self, n_vertices: int = 64) -> np.ndarray:
        """The edge as (n_vertices, 2) level-0 (x, y) points, e.g. for GeoJSON."""
        angles = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
        edge = self._edge_radius(angles)
        return np.stack([self.x + edge * np.cos(angles), self.y + edge * np.sin(angles)], axis=1)

    def _edge_radius(self, angles: np.ndarray) -> np.ndarray:
        return star_radius(self.radius, self.harmonics, angles)


def star_radius(radius: float, harmonics: Sequence[tuple[float, float]], angles: np.ndarray) -> np.ndarray:
    """Edge distance of a star-shaped outline at ``angles``: radius * (1 + sum_k a_k cos(k angle + phase_k))."""
    wobble = sum(a * np.cos(k * angles + phase) for k, (a, phase) in enumerate(harmonics, start=2))
    return radius * (1 + wobble)


@dataclass(frozen=True, eq=False)
class SlideSpec:
    """What :func:`write_synthetic_slide` wrote: the file, its geometry and the ground truth."""

    path: pathlib.Path
    width: int
    height: int
    mpp: float                      # level-0 µm/px
    fmt: str                        # "svs" or "tiff"
    downsamples: tuple[int, ...]
    seed: int
    tissue_mask: np.ndarray = field(repr=False)   # bool (h, w), covering the whole slide
    mask_mpp: float                 # µm per mask cell
    lesions: tuple[Lesion, ...]
    lookalikes: tuple[Lesion, ...] = ()   # benign regions that resemble lesions (not counted as lesions)
    distractors: tuple[Lesion, ...] = ()  # benign regions darker than the lesions, of other texture (not lesions)

    @property
    def label(self) -> str:
        """"positive" when the slide has lesions, else "negative"."""
        return "positive" if self.lesions else "negative"

    @property
    def mask_cell_px(self) -> float:
        """Level-0 pixels per tissue-mask cell."""
        return self.mask_mpp / self.mpp

    def lesion_fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction (0-1) of the level-0 rectangle at (x, y) of size (w, h) inside a lesion."""
        return float(_lesion_fractions(self.lesions, np.array([[x, y]]), (w, h))[0])

    def lesion_area_fraction(self) -> float:
        """The object-to-image ratio: lesion area over tissue area (0-1), from the lesion outlines and
        the tissue mask (lesions lie inside the tissue)."""
        tissue_px = float(self.tissue_mask.sum()) * self.mask_cell_px**2
        return sum(_polygon_area(lesion.polygon(256)) for lesion in self.lesions) / tissue_px if tissue_px else 0.0

    def tissue_fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction (0-1) of the level-0 rectangle at (x, y) of size (w, h) on tissue (per the mask)."""
        xs, ys = _sample_points(np.array([[x, y]], dtype=np.float64), (w, h))
        rows = np.clip((ys / self.mask_cell_px).astype(int), 0, self.tissue_mask.shape[0] - 1)
        cols = np.clip((xs / self.mask_cell_px).astype(int), 0, self.tissue_mask.shape[1] - 1)
        return float(self.tissue_mask[rows, cols].mean())


def _polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon given as (n, 2) vertices (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def in_lesion(spec: SlideSpec, coords_level0: np.ndarray, patch_size_level0: int | tuple[int, int],
              min_fraction: float = 0.5) -> np.ndarray:
    """Which patches lie in a lesion.

    Parameters
    ----------
    spec : SlideSpec
        The generated slide.
    coords_level0 : (N, 2) array
        Level-0 (x, y) top-left corners of the patches, in pixels.
    patch_size_level0 : int or (int, int)
        Patch (width, height) at level 0, in pixels.
    min_fraction : float
        A patch counts when at least this fraction of its area is lesion.

    Returns
    -------
    (N,) bool array
    """
    return lesion_fractions(spec, coords_level0, patch_size_level0) >= min_fraction


def lesion_fractions(spec: SlideSpec, coords_level0: np.ndarray, patch_size_level0: int | tuple[int, int],
                     regions: str = "lesions") -> np.ndarray:
    """Fraction (0-1) of each patch's area inside a lesion (or, with ``regions="lookalikes"`` or
    ``"distractors"``, inside a look-alike cluster or a dark distractor); (N,) float array for the (N, 2)
    level-0 top-left corners ``coords_level0``.

    With lesions smaller than a patch no patch is mostly lesion; ``> 0`` then says which patches
    show some of it.
    """
    if regions not in ("lesions", "lookalikes", "distractors"):
        raise ValueError(f"regions must be 'lesions', 'lookalikes' or 'distractors', got {regions!r}")
    return _lesion_fractions(getattr(spec, regions), np.asarray(coords_level0, dtype=np.float64),
                             patch_size_level0)


def patch_kinds(spec: SlideSpec, coords_level0: np.ndarray, patch_size_level0: int | tuple[int, int],
                min_fraction: float = 0.5) -> np.ndarray:
    """What each patch shows, as a (N,) str array: ``"lesion"``, ``"distractor"`` or ``"lookalike"`` where
    more than ``min_fraction`` of its area lies in such a region (in that order of precedence), ``"normal"``
    where it touches none, and ``""`` where it touches one only partly (neither kind, for probes)."""
    share = {r: lesion_fractions(spec, coords_level0, patch_size_level0, r)
             for r in ("lesions", "distractors", "lookalikes")}
    return np.select([share["lesions"] > min_fraction, share["distractors"] > min_fraction,
                      share["lookalikes"] > min_fraction, sum(share.values()) == 0],
                     ["lesion", "distractor", "lookalike", "normal"], "")


def _lesion_fractions(lesions: Sequence[Lesion], coords: np.ndarray,
                      size: int | tuple[float, float]) -> np.ndarray:
    xs, ys = _sample_points(coords.reshape(-1, 2), size)
    inside = np.zeros(xs.shape, dtype=bool)
    for lesion in lesions:
        inside |= lesion.contains(xs, ys)
    return inside.mean(axis=1)


def _sample_points(coords: np.ndarray, size: int | tuple[float, float],
                   per_side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(N, per_side**2) x and y of a regular grid of cell centres inside each rectangle."""
    width, height = (size, size) if np.isscalar(size) else size
    steps = (np.arange(per_side) + 0.5) / per_side
    grid_x, grid_y = np.meshgrid(steps * width, steps * height)
    return coords[:, :1] + grid_x.ravel(), coords[:, 1:2] + grid_y.ravel()
