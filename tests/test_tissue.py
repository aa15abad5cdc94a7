"""Tissue detection: the array maths, bounded block-wise reads, and user-supplied masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ips_path.runtime.errors import BadInputError
from ips_path.slides.slide import Slide
from ips_path.synthetic.synth import write_synthetic_slide
from ips_path.tiling import tissue
from ips_path.tiling.tissue import (
    TissueParams,
    detect_tissue,
    load_tissue_mask,
    otsu_threshold,
    rasterize_geojson,
    read_low_resolution,
    saturation,
    tissue_mask_for_slide,
)

MPP = 8.0  # µm/px of the test images: 100 px = 800 µm
PINK = (225, 150, 200)  # pale eosin
WHITE = (240, 240, 238)


def _image(shape=(200, 300), background=WHITE, seed=0, noise=4):
    rng = np.random.default_rng(seed)
    image = np.empty((*shape, 3), np.int16)
    image[:] = background
    image += rng.integers(-noise, noise + 1, image.shape, dtype=np.int16)
    return image


def _disc(shape, centre, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _paint(image, where, rgb):
    image[where] = rgb
    return np.clip(image, 0, 255).astype(np.uint8)


def _iou(a, b):
    return np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b))


def test_saturation_of_pure_colours_and_greys():
    rgb = np.array([[[255, 0, 0], [128, 128, 128], [200, 100, 100], [0, 0, 0], [10, 2, 2]]], np.uint8)
    assert saturation(rgb).tolist() == [[255, 0, 127, 0, 204]]
    assert saturation(rgb, black_level=40).tolist() == [[255, 0, 127, 0, 0]]  # dark noise is not colour


def test_otsu_matches_scikit_image():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    for _ in range(50):
        counts = rng.integers(0, 1000, 256) * (rng.random(256) < rng.random())
        if np.count_nonzero(counts) > 1:
            assert otsu_threshold(counts) == threshold_otsu(hist=counts)


@pytest.mark.parametrize("method", ["colour", "otsu"])
def test_pale_tissue_on_glass_is_found(method):
    image = _image()
    truth = _disc(image.shape[:2], (100, 150), 60)
    found = detect_tissue(_paint(image, truth, PINK), MPP, TissueParams(method=method))
    assert _iou(found, truth) > 0.95


@pytest.mark.parametrize(
    "method, background",
    [(m, b) for m in ("colour", "otsu", "saturation") for b in (WHITE, (215, 215, 218), (250, 250, 250))]
    + [("colour", (238, 232, 212)), ("otsu", (238, 232, 212))],  # tinted glass: the floor is relative
)
def test_blank_slide_gives_an_empty_mask(method, background):
    image = _image(background=background, noise=6).clip(0, 255).astype(np.uint8)
    assert not detect_tissue(image, MPP, TissueParams(method=method)).any()


def test_method_all_is_everything():
    image = _image().astype(np.uint8)
    assert detect_tissue(image, MPP, TissueParams(method="all")).all()


def test_near_black_is_not_tissue():
    image = _image()
    tissue_area = _disc(image.shape[:2], (100, 80), 40)
    black = np.zeros(image.shape[:2], bool)
    black[:, 220:] = True  # a scanner border: black with noisy hue
    image = _paint(image, tissue_area, PINK)
    image[black] = np.random.default_rng(3).integers(0, 25, (np.count_nonzero(black), 3))
    found = detect_tissue(image, MPP, TissueParams())
    assert not found[black].any()
    assert _iou(found, tissue_area) > 0.9


def test_specks_are_removed_by_area_in_square_micrometres():
    image = _image()
    big = _disc(image.shape[:2], (100, 100), 40)  # ~5000 px = 0.32 mm²
    speck = _disc(image.shape[:2], (30, 250), 3)  # ~29 px = 1,900 µm²
    found = detect_tissue(_paint(_paint(image, big, PINK).astype(np.int16), speck, PINK), MPP, TissueParams())
    assert found[big].mean() > 0.95
    assert not found[speck].any()
    # the same speck is kept when the minimum area is below its area
    kept = detect_tissue(_paint(_image(), speck, PINK), MPP, TissueParams(min_object_um2=500))
    assert kept[speck].mean() > 0.5


def test_small_holes_are_filled_unless_kept_and_large_holes_stay():
    image = _image()
    outer = _disc(image.shape[:2], (100, 150), 90)
    small_hole = _disc(image.shape[:2], (100, 100), 6)  # ~113 px = 7,200 µm² < 20,000
    large_hole = _disc(image.shape[:2], (100, 190), 20)  # ~1257 px = 80,000 µm²
    image = _paint(image, outer & ~small_hole & ~large_hole, PINK)
    filled = detect_tissue(image, MPP, TissueParams())
    assert filled[small_hole].all()
    assert not filled[_disc(image.shape[:2], (100, 190), 15)].any()
    kept = detect_tissue(image, MPP, TissueParams(keep_holes=True))
    assert not kept[_disc(image.shape[:2], (100, 100), 3)].any()


def test_unknown_method_is_bad_input():
    with pytest.raises(BadInputError, match="unknown tissue method"):
        TissueParams(method="magic")


@pytest.fixture(scope="module")
def one_level_slide(tmp_path_factory):
    """A one-level 3000 x 2000 px slide: the reader must not hold level 0 whole."""
    path = tmp_path_factory.mktemp("tissue") / "flat.svs"
    spec = write_synthetic_slide(path, 3000, 2000, mpp=0.5, downsamples=(1,), seed=5, tissue=2)
    return spec


class _RecordingSlide:
    """A real Slide that remembers the region sizes asked for."""

    def __init__(self, slide):
        self._slide, self.sizes = slide, []

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, location, level, size):
        self.sizes.append(size)
        return self._slide.read_region(location, level, size)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_low_resolution_read_is_block_wise_and_equals_a_whole_read(one_level_slide, backend, monkeypatch):
    monkeypatch.setattr(tissue, "_READ_BLOCK", 512)
    with Slide(one_level_slide.path, backend=backend) as slide:
        recording = _RecordingSlide(slide)
        image, downsample = read_low_resolution(recording, 8.0, threads=2)
        whole = slide.read_region((0, 0), 0, slide.dimensions)
    assert downsample == 16
    assert max(max(size) for size in recording.sizes) <= 512
    assert image.shape == (125, 188, 3)  # ceil(2000 / 16), ceil(3000 / 16)
    expected = np.asarray(Image.fromarray(whole).reduce(16))
    assert np.array_equal(image, expected)


def test_detected_tissue_matches_the_generated_truth(one_level_slide):
    with Slide(one_level_slide.path) as slide:
        mask, image = tissue_mask_for_slide(slide)
    assert mask.mask.shape == image.shape[:2] and mask.mpp == pytest.approx(8.0)
    truth = np.asarray(
        Image.fromarray(one_level_slide.tissue_mask.astype(np.uint8)).resize(mask.mask.shape[::-1], Image.NEAREST)
    ).astype(bool)
    assert truth.mean() > 0.05
    assert _iou(mask.mask, truth) > 0.85


def test_blank_slide_file_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tiff"
    glass = _image((1024, 1536), noise=3).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(path, glass, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with Slide(path) as slide:
        mask, _ = tissue_mask_for_slide(slide)
    assert not mask.mask.any()


def test_user_masks_png_and_npy_cover_the_slide(tmp_path):
    truth = np.zeros((50, 80), bool)
    truth[10:30, 20:60] = True
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.png")
    rgba = np.zeros((50, 80, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha must not count as tissue
    rgba[truth, 1] = 200
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.save(tmp_path / "m.npy", truth)
    for name in ("m.png", "rgba.png", "m.npy"):
        loaded = load_tissue_mask(tmp_path / name, (8000, 5000), 0.5)
        assert np.array_equal(loaded.mask, truth), name
        assert loaded.downsample == 100 and loaded.mpp == pytest.approx(50.0)


def test_user_mask_with_the_wrong_aspect_or_type_is_refused(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((50, 50), bool))
    with pytest.raises(BadInputError, match="aspect"):
        load_tissue_mask(tmp_path / "m.npy", (8000, 5000), 0.5)
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(BadInputError, match="unsupported tissue mask"):
        load_tissue_mask(tmp_path / "m.txt", (8000, 5000), 0.5)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="bad.png"):
        load_tissue_mask(tmp_path / "bad.png", (8000, 5000), 0.5)


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_geojson_polygons_with_holes_are_rasterised(tmp_path):
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "Tissue"}},
        "geometry": {
            "type": "Polygon",
            "coordinates": [_square(1600, 1600, 6400, 4800), _square(3200, 2400, 4800, 4000)],
        },
    }
    other = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[_square(0, 0, 800, 800)]]}}
    path = tmp_path / "tissue.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature, other]}))
    mask = load_tissue_mask(path, (8000, 6400), 0.5, mask_mpp=8.0)  # 16 level-0 px per mask px
    assert mask.mask.shape == (400, 500) and mask.downsample == 16
    assert mask.mask[150, 150] and not mask.mask[200, 250]  # outline, then the hole
    assert mask.mask[20, 20] and not mask.mask[80, 80]
    area_px = (300 * 200 - 100 * 100) + 50 * 50
    assert abs(int(mask.mask.sum()) - area_px) < 0.03 * area_px
    # a bare list of features works too
    assert np.array_equal(rasterize_geojson([feature, other], (400, 500), 16), mask.mask)


def test_geojson_that_is_not_geojson_is_bad_input(tmp_path):
    path = Path(tmp_path / "x.geojson")
    path.write_text("[1, 2")
    with pytest.raises(BadInputError, match="x.geojson"):
        load_tissue_mask(path, (100, 100), 0.5)
