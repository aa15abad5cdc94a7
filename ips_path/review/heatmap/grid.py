"""Attention scores on a grid: one cell per patch position, ranked, smoothed and sampled at picture pixels."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["ScoreGrid", "percentile_ranks", "pixel_centres", "sample_grid", "score_grid", "smooth_grid"]

_UNSCORED_FILL = np.float32(np.nan)


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


def pixel_centres(start: int, count: int, downsample: float) -> np.ndarray:
    """Level-0 coordinates of the centres of ``count`` pixels from pixel ``start`` on."""
    return (np.arange(start, start + count) + 0.5) * downsample
