"""Generated slides: real files both backends read, deterministic, with tissue and lesions where said."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from ips_path.slides.slide import BACKENDS, Slide
from ips_path.synthetic.synth import (
    BACKGROUND_RGB,
    Lesion,
    in_lesion,
    lesion_fractions,
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


# -- knobs for hard cohorts: subtle lesions, look-alikes, stain shift --------------------------------

def _nucleus_areas(rgb: np.ndarray) -> np.ndarray:
    """Pixel areas of the dark (hematoxylin) blobs of an RGB region."""
    from scipy import ndimage

    labels, n = ndimage.label(rgb.astype(np.float32).mean(axis=2) < 150)
    return np.bincount(labels.ravel())[1:] if n else np.zeros(0)


def test_subtle_lesions_have_nuclei_as_much_larger_as_asked_and_lookalikes_as_large_but_regular(tmp_path):
    # Two large explicit regions so that each holds hundreds of nuclei.
    spec = write_synthetic_slide(tmp_path / "s.tiff", 3000, 1200, mpp=0.5, fmt="tiff", downsamples=(1,), seed=2,
                                 tissue=np.ones((4, 4), bool), lesions=[(700, 600, 450)], lookalikes=[(2300, 600, 450)],
                                 nucleus_scale=1.4)
    assert spec.label == "positive" and len(spec.lookalikes) == 1
    with Slide(spec.path) as slide:
        lesion = np.asarray(slide.read_region((400, 300), 0, (600, 600)))
        mimic = np.asarray(slide.read_region((2000, 300), 0, (600, 600)))
        normal = np.asarray(slide.read_region((1250, 0), 0, (500, 1200)))
    sizes = {name: _nucleus_areas(region) for name, region in
             (("lesion", lesion), ("lookalike", mimic), ("normal", normal))}
    sizes = {name: areas[areas >= 12] for name, areas in sizes.items()}  # leave out grain and edge crumbs
    median = {name: float(np.median(areas)) for name, areas in sizes.items()}
    # nuclei touch and merge sometimes, so the ratio of areas (1.4^2 = 1.96) is measured loosely
    assert 1.5 < median["lesion"] / median["normal"] < 3.0
    assert 1.5 < median["lookalike"] / median["normal"] < 3.0
    spread = {name: float(np.subtract(*np.percentile(areas, [75, 25])) / np.median(areas))
              for name, areas in sizes.items()}
    assert spread["lookalike"] < spread["lesion"]


def test_lesion_area_fraction_is_the_share_of_tissue_in_lesions(tmp_path):
    tissue = np.zeros((30, 40), bool)
    tissue[5:25, 5:35] = True  # 2/3 x 3/4 of the slide... in mask cells
    spec = write_synthetic_slide(tmp_path / "s.tiff", 4000, 3000, mpp=1.0, fmt="tiff", downsamples=(1, 4), seed=1,
                                 tissue=tissue, lesions=[(2000, 1500, 100), (1200, 1000, 50)])
    tissue_px = float(spec.tissue_mask.sum()) * spec.mask_cell_px**2
    expected = np.pi * (100**2 + 50**2) / tissue_px
    assert spec.lesion_area_fraction() == pytest.approx(expected, rel=0.02)
    # the patch-level truth agrees: lesion area summed over a patch grid
    xs, ys = np.meshgrid(np.arange(0, 4000, 50), np.arange(0, 3000, 50))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    assert lesion_fractions(spec, coords, 50).sum() * 50**2 == pytest.approx(np.pi * (100**2 + 50**2), rel=0.03)


def test_placed_lookalikes_keep_apart_from_lesions_and_leave_the_label_alone(tmp_path):
    specs = write_synthetic_cohort(tmp_path, 4, size=(3000, 2000), mpp=1.0, downsamples=(1, 4), seed=3, workers=2,
                                   lesion_diameter_um=(40.0, 70.0), lesions_per_positive=(1, 2),
                                   lookalikes_per_slide=(2, 3), nucleus_scale=1.4)
    for spec in specs:
        assert 2 <= len(spec.lookalikes) <= 3
        for mimic in spec.lookalikes:
            for lesion in spec.lesions:
                assert np.hypot(mimic.x - lesion.x, mimic.y - lesion.y) >= mimic.max_radius + lesion.max_radius
        centres = np.array([[m.x, m.y] for m in spec.lookalikes]) - 1
        assert not lesion_fractions(spec, centres, 2).any()
        assert lesion_fractions(spec, centres, 2, regions="lookalikes").all()
    assert {s.label for s in specs} == {"positive", "negative"}
    # a micro-lesion cohort: about 0.1 % of the tissue per positive slide
    fractions = [s.lesion_area_fraction() for s in specs if s.lesions]
    assert all(2e-4 < f < 5e-3 for f in fractions)


def test_stain_shift_changes_the_colours_but_not_the_layout(tmp_path):
    options = dict(fmt="tiff", downsamples=(1,), seed=4, lesions=1, mpp=1.0)
    plain = write_synthetic_slide(tmp_path / "a.tiff", 1500, 1000, **options)
    same = write_synthetic_slide(tmp_path / "b.tiff", 1500, 1000, stain_shift=0.0, **options)
    shifted = write_synthetic_slide(tmp_path / "c.tiff", 1500, 1000, stain_shift=0.3, **options)
    assert _digest(plain.path) == _digest(same.path)
    assert shifted.lesions == plain.lesions
    assert np.array_equal(shifted.tissue_mask, plain.tissue_mask)
    with Slide(plain.path) as a, Slide(shifted.path) as c:
        before = np.asarray(a.read_region((0, 0), 0, (1500, 1000))).astype(float)
        after = np.asarray(c.read_region((0, 0), 0, (1500, 1000))).astype(float)
    tissue = np.repeat(np.repeat(plain.tissue_mask, int(plain.mask_cell_px), 0), int(plain.mask_cell_px), 1)
    tissue = tissue[:1000, :1500]
    shift = np.abs(before[tissue].mean(axis=0) - after[tissue].mean(axis=0))
    assert shift.max() > 3  # grey levels, averaged over the tissue
    assert np.abs(before[~tissue] - after[~tissue]).mean() < 1  # the glass stays the glass


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(nucleus_scale=0.0), "nucleus_scale"),
    (dict(stain_shift=float("nan")), "stain_shift"),
    (dict(stain_shift=-0.1), "stain_shift"),
])
def test_bad_knobs_are_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_slide(tmp_path / "s.tiff", 500, 500, fmt="tiff", **arguments)


def test_dark_distractors_are_darker_than_the_lesion_but_no_lesion(tmp_path):
    from ips_path.slides.stain import optical_density

    spec = write_synthetic_slide(tmp_path / "d.svs", 1024, 400, mpp=1.0, downsamples=(1,), seed=3,
                                 tissue=np.ones((4, 8), bool), lesions=[(200, 200, 70)], lookalikes=[(500, 200, 70)],
                                 distractors=[(820, 200, 70)], nucleus_scale=1.4, workers=2)
    assert spec.label == "positive" and len(spec.distractors) == 1
    corners = np.array([[170, 170], [790, 170]])
    assert lesion_fractions(spec, corners, 60, "distractors").tolist() == [0.0, 1.0]
    assert lesion_fractions(spec, corners, 60).tolist() == [1.0, 0.0]
    with Slide(spec.path) as slide:
        pixels = slide.read_region((0, 150), 0, (1024, 100))
    darkest = {name: np.quantile(optical_density(pixels[:, x - 50:x + 50]).sum(-1), 0.99)
               for name, x in (("lesion", 200), ("lookalike", 500), ("distractor", 820))}
    assert darkest["distractor"] > darkest["lesion"] > darkest["lookalike"]
