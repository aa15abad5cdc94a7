"""Generated slides: real files both backends read, deterministic, with tissue and lesions where said."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from ips_path.slide import BACKENDS, Slide
from ips_path.synth import (
    BACKGROUND_RGB,
    Lesion,
    in_lesion,
    main,
    write_synthetic_cohort,
    write_synthetic_slide,
)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_whatever_the_threads_and_another_seed_differs(tmp_path):
    options = dict(fmt="tiff", downsamples=(1, 4), lesions=1)
    first = write_synthetic_slide(tmp_path / "a.tiff", 1500, 1000, seed=7, workers=1, **options)
    write_synthetic_slide(tmp_path / "b.tiff", 1500, 1000, seed=7, workers=3, **options)
    other = write_synthetic_slide(tmp_path / "c.tiff", 1500, 1000, seed=8, **options)
    assert _digest(tmp_path / "a.tiff") == _digest(tmp_path / "b.tiff") != _digest(tmp_path / "c.tiff")
    assert first.lesions != other.lesions
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("fmt", "mpp", "downsamples", "source", "vendors"), [
    ("svs", 0.25, (1, 2, 8), "metadata", {"aperio"}),
    ("tiff", 0.5, (1, 4), "tiff-tags", {"generic-tiff", None}),
])
def test_levels_and_mpp_are_what_was_asked(tmp_path, backend, fmt, mpp, downsamples, source, vendors):
    spec = write_synthetic_slide(tmp_path / f"s.{fmt}", 2500, 1700, mpp=mpp, fmt=fmt, downsamples=downsamples,
                                 seed=3)
    with Slide(spec.path, backend) as slide:
        assert slide.vendor in vendors
        assert slide.level_dimensions == tuple((2500 // d, 1700 // d) for d in downsamples)
        assert slide.level_downsamples == pytest.approx(downsamples, rel=0.01)
        assert (slide.level0_mpp, slide.mpp_source) == ((mpp, mpp), source)
        if fmt == "svs":
            assert slide.objective_power == 10 / mpp
            assert slide.associated_images == ("label", "thumbnail")


def test_the_tiff_without_resolution_tags_has_no_pixel_size(small_tiff_nompp):
    for backend in BACKENDS:
        with Slide(small_tiff_nompp.path, backend) as slide:
            assert slide.level0_mpp is None


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return rgb2hsv(rgb)[..., 1]


def test_no_tissue_is_a_blank_slide(tmp_path):
    spec = write_synthetic_slide(tmp_path / "blank.svs", 2000, 1500, tissue=0, seed=1)
    assert not spec.tissue_mask.any() and spec.label == "negative"
    with Slide(spec.path) as slide:
        pixels = slide.read_region((0, 0), 1, slide.level_dimensions[1])
    assert np.abs(pixels.astype(int) - BACKGROUND_RGB).max() <= 3  # JPEG of a flat colour


def test_tissue_is_where_the_given_mask_says(tmp_path):
    layout = np.zeros((3, 4), dtype=bool)
    layout[:, :2] = True  # left half
    spec = write_synthetic_slide(tmp_path / "half.svs", 2048, 1536, tissue=layout, seed=2)
    assert spec.tissue_fraction(0, 0, 900, 1536) == 1.0 and spec.tissue_fraction(1148, 0, 900, 1536) == 0.0
    with Slide(spec.path) as slide:
        saturation = _saturation(slide.read_region((0, 0), 1, (512, 384)))
    assert np.median(saturation[:, :200]) > 0.15  # stained tissue
    assert saturation[:, 312:].max() < 0.05       # glass


def test_an_otsu_tissue_detector_finds_the_tissue_not_the_background(small_svs):
    with Slide(small_svs.path) as slide:
        thumbnail = slide.get_thumbnail(small_svs.tissue_mask.shape[::-1])
    saturation = _saturation(thumbnail)
    detected = saturation > threshold_otsu(saturation)
    truth = small_svs.tissue_mask[:detected.shape[0], :detected.shape[1]]
    iou = (detected & truth).sum() / (detected | truth).sum()
    assert 0.1 < truth.mean() < 0.7 and iou > 0.8


def test_lesions_lie_in_tissue_and_look_different(small_svs):
    assert small_svs.label == "positive" and len(small_svs.lesions) == 2
    patch = 128
    rng = np.random.default_rng(0)
    corners = rng.uniform((0, 0), (small_svs.width - patch, small_svs.height - patch), (4000, 2))
    lesion = in_lesion(small_svs, corners, patch, min_fraction=1.0)
    tissue = np.array([small_svs.tissue_fraction(x, y, patch, patch) for x, y in corners]) == 1.0
    for each in small_svs.lesions:
        assert small_svs.tissue_fraction(each.x - each.radius / 2, each.y - each.radius / 2,
                                         each.radius, each.radius) == 1.0
        diameter_um = 2 * each.radius * small_svs.mpp
        assert 300 <= diameter_um <= 800
    normal = tissue & (in_lesion(small_svs, corners, patch, min_fraction=1e-9) == 0)
    assert lesion.sum() >= 20 and normal.sum() >= 20
    with Slide(small_svs.path) as slide:
        def mean_brightness(mask):
            return np.mean([slide.read_region((int(x), int(y)), 0, (patch, patch)).mean()
                            for x, y in corners[mask][:20]])
        # dense dark nuclei: lesion patches are clearly darker than normal tissue
        assert mean_brightness(lesion) < mean_brightness(normal) - 25


def test_lesion_geometry_helpers_agree():
    lesion = Lesion(500.0, 400.0, 100.0, harmonics=((0.1, 0.3), (0.05, 1.0)))
    polygon = lesion.polygon(32)
    centre = np.array([lesion.x, lesion.y])
    assert lesion.contains(*(centre + 0.98 * (polygon - centre)).T).all()
    assert not lesion.contains(*(centre + 1.02 * (polygon - centre)).T).any()
    assert np.hypot(*(polygon - centre).T).max() <= lesion.max_radius


def test_lesion_fraction_of_a_patch(tmp_path):
    spec = write_synthetic_slide(tmp_path / "l.tiff", 1024, 1024, fmt="tiff", downsamples=(1,), seed=0,
                                 tissue=np.ones((2, 2), bool), lesions=[(512, 512, 200)])
    assert spec.lesion_fraction(512 - 50, 512 - 50, 100, 100) == 1.0
    assert spec.lesion_fraction(0, 0, 100, 100) == 0.0
    assert spec.lesion_fraction(512, 312, 200, 400) == pytest.approx(np.pi / 4, abs=0.02)  # half the disc
    corners = [[462, 462], [0, 0], [512, 312], [560, 560]]
    fractions = [spec.lesion_fraction(x, y, 200, 400) for x, y in corners]
    assert list(in_lesion(spec, corners, (200, 400), min_fraction=0.3)) == [f >= 0.3 for f in fractions]
    assert 0 < min(fractions[2:]) and max(fractions[2:]) < 1


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(downsamples=(1, 3)), "powers of two"),
    (dict(downsamples=(2, 4)), "start at 1"),
    (dict(fmt="png"), "fmt must be"),
    (dict(tile_size=100), "multiple of 16"),
    (dict(tissue=0, lesions=1), "without tissue"),
])
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_slide(tmp_path / "x.svs", 512, 512, **arguments)
    assert not list(tmp_path.iterdir())


def test_a_cohort_has_its_manifest_and_labels(tmp_path):
    specs = write_synthetic_cohort(tmp_path / "cohort", 4, positive_fraction=0.5, size=(1200, 900), seed=5,
                                   downsamples=(1, 4))
    with open(tmp_path / "cohort" / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["slide_id"] for row in rows] == [spec.path.stem for spec in specs]
    assert sorted(row["label"] for row in rows) == ["negative", "negative", "positive", "positive"]
    assert len({row["case_id"] for row in rows}) == 4
    for row, spec in zip(rows, specs, strict=True):
        assert (tmp_path / "cohort" / row["slide_path"]).is_file()
        assert (row["label"] == "positive") == bool(spec.lesions)


def test_the_command_line_writes_a_slide(tmp_path, capsys):
    main([str(tmp_path / "cli.tiff"), "--width", "800", "--height", "600", "--mpp", "0.25",
          "--downsamples", "1,2"])
    assert "0 lesions" in capsys.readouterr().out
    with Slide(tmp_path / "cli.tiff") as slide:
        assert (slide.dimensions, slide.level_count, slide.level0_mpp) == ((800, 600), 2, (0.25, 0.25))
