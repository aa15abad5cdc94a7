"""Patch grid maths: level choice, patch sizes, tissue fractions, and the kept patches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ips_path.tiling.grid import (
    grid_coords,
    mpp_for_magnification,
    patch_geometry,
    read_level_for_mpp,
    select_patches,
    tissue_fraction,
)


@pytest.mark.parametrize(
    "level0_mpp, downsamples, target, expected",
    [
        (0.25, (1, 4, 16, 64), 0.5, 0),  # level 1 (1.0 µm/px) is too coarse: read level 0, halve
        (0.25, (1, 2, 4), 0.5, 1),  # level 1 is exactly the target
        (0.25, (1, 2, 4), 1.0, 2),
        (0.2525, (1, 2), 0.5, 1),  # 0.505 is within 2 %
        (0.26, (1, 2), 0.5, 0),  # 0.52 is not
        (0.499, (1, 2.0003, 4.002, 8.0167), 0.5, 0),
        (0.499, (1, 2.0003, 4.002, 8.0167), 4.0, 3),  # 4.0004 µm/px within 2 %
        (2.0, (1, 4), 0.5, 0),  # target finer than level 0: level 0 (the caller refuses)
        (0.25, (1, 4, 16), 100.0, 2),  # coarser than every level: the coarsest
    ],
)
def test_read_level_is_the_coarsest_level_at_least_as_fine_as_the_target(level0_mpp, downsamples, target, expected):
    assert read_level_for_mpp(level0_mpp, downsamples, target) == expected


def test_magnification_aliases():
    assert mpp_for_magnification(20) == 0.5
    assert mpp_for_magnification(40) == 0.25
    assert mpp_for_magnification(1) == 10.0
    with pytest.raises(ValueError):
        mpp_for_magnification(0)


def test_geometry_of_a_40x_slide_tiled_at_20x():
    g = patch_geometry(0.25, (1, 4, 16, 64), 0.5, 256)
    assert (g.patch_size_level0, g.stride_level0, g.read_level, g.read_size) == (512, 512, 0, 512)
    assert g.effective_mpp == pytest.approx(0.5)
    g = patch_geometry(0.25, (1, 2, 4), 0.5, 224, stride=112)
    assert (g.patch_size_level0, g.stride_level0, g.read_level, g.read_downsample, g.read_size) == (
        448, 224, 1, 2.0, 224)


def test_geometry_records_the_effective_mpp_after_rounding():
    g = patch_geometry(0.499, (1,), 0.5, 256)
    assert g.patch_size_level0 == 257  # 256 * 0.5 / 0.499 = 256.5
    assert g.effective_mpp == pytest.approx(0.499 * 257 / 256)
    assert g.target_mpp == 0.5


def test_geometry_refuses_upsampling_and_nonsense():
    with pytest.raises(ValueError, match="finer than"):
        patch_geometry(2.0, (1,), 0.5, 256)
    patch_geometry(0.505, (1,), 0.5, 256)  # 1 % coarser: accepted
    with pytest.raises(ValueError):
        patch_geometry(0.5, (1,), 0.5, 0)


def test_grid_covers_the_slide_row_major_with_whole_patches_only():
    coords = grid_coords((1000, 700), 256, 200)
    xs, ys = [0, 200, 400, 600], [0, 200, 400]  # 800 + 256 > 1000; 600 + 256 > 700
    assert coords.dtype == np.int64
    assert coords.tolist() == [[x, y] for y in ys for x in xs]
    assert grid_coords((100, 100), 256, 256).shape == (0, 2)


def _fractions_by_upsampling(mask, downsample, coords, side):
    """Brute force: blow the mask up to level-0 pixels and average each patch."""
    full = np.kron(mask.astype(float), np.ones((downsample, downsample)))
    return np.array([full[y:y + side, x:x + side].mean() for x, y in coords])


def test_tissue_fraction_is_exact_for_patches_not_aligned_with_mask_pixels():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.5
    coords = np.stack([rng.integers(0, 40 * 4 - 13, 200), rng.integers(0, 30 * 4 - 13, 200)], axis=1)
    got = tissue_fraction(mask, 4, coords, 13)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _fractions_by_upsampling(mask, 4, coords, 13), atol=1e-5)


def test_tissue_fraction_counts_outside_the_mask_as_background():
    mask = np.ones((2, 2), bool)
    assert tissue_fraction(mask, 10, np.array([[10, 10]]), 20)[0] == pytest.approx(0.25)
    assert tissue_fraction(mask, 10, np.zeros((0, 2), np.int64), 20).shape == (0,)


@st.composite
def _grids(draw):
    downsample = draw(st.integers(1, 8))
    mask_h, mask_w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    bits = draw(st.lists(st.booleans(), min_size=mask_h * mask_w, max_size=mask_h * mask_w))
    mask = np.array(bits, bool).reshape(mask_h, mask_w)
    width = draw(st.integers(1, mask_w * downsample))
    height = draw(st.integers(1, mask_h * downsample))
    patch = draw(st.integers(1, 40))
    stride = draw(st.integers(1, 40))
    min_tissue = draw(st.floats(0.0, 1.0))
    return mask, downsample, (width, height), patch, stride, min_tissue


@settings(max_examples=150, deadline=None)
@given(_grids())
def test_kept_patches_are_inside_the_slide_and_hold_enough_tissue(case):
    mask, downsample, (width, height), patch, stride, min_tissue = case
    geometry = patch_geometry(1.0, (1,), 1.0, patch, stride)
    coords, fractions = select_patches(mask, downsample, (width, height), geometry, min_tissue)
    assert coords.dtype == np.int64 and coords.shape == (len(fractions), 2)
    assert np.all(coords >= 0)
    assert np.all(coords[:, 0] + patch <= width) and np.all(coords[:, 1] + patch <= height)
    truth = _fractions_by_upsampling(mask, downsample, coords, patch)
    np.testing.assert_allclose(fractions, truth, atol=1e-5)
    assert np.all(truth >= min_tissue - 1e-5) and np.all(truth > 0)
    # every grid patch that qualifies is kept
    every = grid_coords((width, height), patch, stride)
    every_truth = _fractions_by_upsampling(mask, downsample, every, patch)
    kept = {tuple(c) for c in coords.tolist()}
    assert {tuple(c) for c in every[(every_truth >= min_tissue + 1e-5) & (every_truth > 0)].tolist()} <= kept
    # row-major order
    assert np.all(np.diff(coords[:, 1] * (width + 1) + coords[:, 0]) > 0)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 1500), st.integers(1, 1500), st.integers(60, 600))
def test_patches_with_stride_equal_to_size_never_overlap(width, height, patch):
    coords = grid_coords((width, height), patch, patch)
    dx = np.abs(coords[:, None, 0] - coords[None, :, 0])
    dy = np.abs(coords[:, None, 1] - coords[None, :, 1])
    overlapping = (dx < patch) & (dy < patch)
    np.fill_diagonal(overlapping, False)
    assert not overlapping.any()
    assert len(coords) == (width // patch) * (height // patch)


def test_a_patch_without_tissue_has_fraction_exactly_zero_despite_round_off():
    # found by hypothesis: a 1-px patch on a mask downsampled 7x, just beside a tissue pixel
    mask = np.zeros((40, 2), bool)
    mask[[1, 3, 4], 0] = True
    geometry = patch_geometry(1.0, (1,), 1.0, 1, 1)
    coords, fractions = select_patches(mask, 7, (1, 40), geometry, 0.0)
    truth = _fractions_by_upsampling(mask, 7, coords, 1)
    assert np.all(truth > 0) and np.all(fractions > 0)


def test_patch_resolution_and_stride_options_are_converted_in_the_library():
    from ips_path.runtime.errors import BadInputError
    from ips_path.tiling.grid import patch_resolution, patch_stride

    assert patch_resolution() == 0.5 and patch_resolution(mpp=1.0) == 1.0 and patch_resolution(mag=40) == 0.25
    assert patch_stride(256) is None and patch_stride(256, stride=128) == 128 and patch_stride(256, overlap=64) == 192
    for bad in (dict(mpp=1.0, mag=20), dict(mag=0), dict(mag=float("nan")), dict(mag=float("inf"))):
        with pytest.raises(BadInputError, match="--m"):
            patch_resolution(**bad)
    for bad in (dict(stride=1, overlap=1), dict(overlap=256), dict(overlap=-1)):
        with pytest.raises(BadInputError, match="--stride|--overlap"):
            patch_stride(256, **bad)


def test_one_mpp_tolerance_decides_every_comparison():
    from ips_path.tiling.grid import MPP_TOLERANCE, same_mpp

    assert MPP_TOLERANCE == 0.02
    assert same_mpp(0.5, 0.505) and same_mpp(0.5, 0.51) and not same_mpp(0.5, 0.52)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e-300", "1e30"])
def test_non_finite_or_non_positive_mpp_is_refused_before_any_work(tmp_path, value):
    from ips_path.runtime.errors import BadInputError
    from ips_path.tiling.run import TilingParams

    with pytest.raises(BadInputError, match=r"--mpp: .* is not a number in \(0.001, 1000\] µm/px"):
        TilingParams(target_mpp=float(value))
