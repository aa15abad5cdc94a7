"""Slide: both backends on real and generated files, mpp resolution, errors users can act on."""

from __future__ import annotations

import json
import logging
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.slides.slide import BACKENDS, WSI_EXTENSIONS, Slide, read_low_resolution
from ips_path.synthetic.synth import write_synthetic_slide

# The table of ../shared/data/README.md: size, level count, mpp (None: unknown), backends that open it.
SHARED_SLIDES = {
    "CMU-1-Small-Region.svs": ((2220, 2967), 1, 0.499, BACKENDS),
    "CMU-1-Small-Region_multilevel.svs": ((2220, 2967), 4, 0.499, BACKENDS),
    "CMU-1-Small-Region_pyramid_mpp.tiff": ((2220, 2967), 4, 0.499, BACKENDS),
    "CMU-1-Small-Region_pyramid_nompp.tiff": ((2220, 2967), 4, None, BACKENDS),
    "he_dicom.dcm": ((1000, 2459), 1, 2.004, ("openslide",)),
    "boxes_generic.tiff": ((300, 250), 4, None, BACKENDS),  # 72-dpi default tags are no pixel size
    "tiny_16px.svs": ((16, 16), 1, 0.499, BACKENDS),
}
SHARED_CASES = [(name, backend) for name, (*_, backends) in SHARED_SLIDES.items() for backend in backends]
BAD_FILES = ["unreadable.svs", "unopenable.tiff", "histolab_broken.svs", "CMU-1-Small-Region_truncated_1MB.svs",
             "empty.svs", "random_bytes.tiff"]


@pytest.mark.parametrize(("name", "backend"), SHARED_CASES)
def test_every_shared_slide_opens_and_reads_with_each_backend_that_reads_it(slides_dir, name, backend):
    size, n_levels, mpp, _ = SHARED_SLIDES[name]
    with Slide(slides_dir / name, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == size
        assert slide.level_count == n_levels == len(slide.level_dimensions) == len(slide.level_downsamples)
        assert slide.level_dimensions[0] == size and slide.level_downsamples[0] == 1.0
        if mpp is None:
            assert slide.level0_mpp is None and slide.mpp_source is None
        else:
            assert slide.level0_mpp == pytest.approx((mpp, mpp))
        region = slide.read_region((0, 0), slide.level_count - 1, (40, 30))
        assert region.shape == (30, 40, 3) and region.dtype == np.uint8
        thumbnail = slide.get_thumbnail((64, 64))
        assert thumbnail.dtype == np.uint8 and thumbnail.shape[2] == 3 and max(thumbnail.shape[:2]) <= 64
        json.dumps(slide.describe())


def test_only_openslide_reads_dicom_and_auto_picks_it(slides_dir):
    with pytest.raises(BadInputError, match=r"he_dicom\.dcm: cannot open as a slide: tiffslide: "):
        Slide(slides_dir / "he_dicom.dcm", backend="tiffslide")
    with Slide(slides_dir / "he_dicom.dcm") as slide:
        assert (slide.backend, slide.vendor, slide.mpp_source) == ("openslide", "dicom", "metadata")


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("name", BAD_FILES)
def test_every_bad_file_fails_with_one_line_naming_it(bad_dir, caplog, name, backend):
    path = bad_dir / name
    with pytest.raises(IpspathError) as failure:
        with Slide(path, backend=backend) as slide:
            slide.read_region((0, 0), 0, (16, 16))
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # nothing else said
    message = str(failure.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if isinstance(failure.value, BadInputError):
        assert "cannot open as a slide" in message
    else:  # it opened: the failure is a read, named by its place
        assert name == "unreadable.svs"
        assert "cannot read region at level-0 (0, 0), level 0: Bogus marker length" in message


def test_missing_file_folder_and_unknown_backend_are_bad_input(tmp_path, small_svs):
    with pytest.raises(BadInputError, match="no such file"):
        Slide(tmp_path / "nothing.svs")
    with pytest.raises(BadInputError, match="it is a folder"):
        Slide(tmp_path)
    with pytest.raises(BadInputError, match="unknown slide backend 'bioformats'"):
        Slide(small_svs.path, backend="bioformats")


@pytest.mark.parametrize(("location", "level", "size"), [
    ((1024, 768), 0, (256, 256)),
    ((1500, 1100), 0, (300, 200)),
    ((1024, 768), 1, (128, 96)),      # level coordinates are whole pixels: both backends agree
    ((3900, 2950), 0, (256, 128)),    # past the bottom-right corner
    ((-64, -32), 1, (64, 64)),        # before the top-left corner
    ((8000, 8000), 2, (16, 16)),      # wholly outside
])
def test_backends_return_the_same_rgb_with_white_outside(small_svs, location, level, size):
    with Slide(small_svs.path, "openslide") as by_openslide, Slide(small_svs.path, "tiffslide") as by_tiffslide:
        a = by_openslide.read_region(location, level, size)
        b = by_tiffslide.read_region(location, level, size)
        downsample = by_openslide.level_downsamples[level]
    assert a.shape == b.shape == (size[1], size[0], 3) and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
    width, height = small_svs.width / downsample, small_svs.height / downsample
    xs = location[0] / downsample + np.arange(size[0])
    ys = location[1] / downsample + np.arange(size[1])
    outside = (xs[None, :] < 0) | (xs[None, :] >= width) | (ys[:, None] < 0) | (ys[:, None] >= height)
    for region in (a, b):
        assert (region[outside] == 255).all()
        assert outside.all() or (region[~outside] != 255).any()


def test_backends_agree_on_a_real_multilevel_slide(slides_dir):
    path = slides_dir / "CMU-1-Small-Region_multilevel.svs"
    with Slide(path, "openslide") as by_openslide, Slide(path, "tiffslide") as by_tiffslide:
        for level in range(by_openslide.level_count):
            a = by_openslide.read_region((0, 0), level, (200, 200))
            b = by_tiffslide.read_region((0, 0), level, (200, 200))
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
        a = by_openslide.read_region((1000, 1200), 0, (256, 256))
        assert (a == by_tiffslide.read_region((1000, 1200), 0, (256, 256))).all()
        assert a.std() > 10  # real tissue, not background


# -- pixel size ----------------------------------------------------------------------------------

def test_override_beats_scanner_metadata(small_svs):
    with Slide(small_svs.path, slide_mpp=0.3) as slide:
        assert (slide.level0_mpp, slide.mpp_source) == ((0.3, 0.3), "override")
        assert slide.level_mpp(1) == pytest.approx(1.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scanner_metadata_and_objective_power_of_an_aperio_file(small_svs, backend):
    with Slide(small_svs.path, backend) as slide:
        assert (slide.vendor, slide.level0_mpp, slide.mpp_source) == ("aperio", (0.5, 0.5), "metadata")
        assert slide.objective_power == 20
        assert slide.level_mpp(2) == pytest.approx(0.5 * slide.level_downsamples[2])


def _write_one_level_tiff(path: pathlib.Path, description: str = "", **tags) -> pathlib.Path:
    pixels = np.full((256, 256, 3), 200, dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                     description=description, **tags)
    return path


@pytest.mark.parametrize(("resolution", "unit", "expected"), [
    ((20000, 20000), "CENTIMETER", (0.5, 0.5)),
    ((50800, 25400), "INCH", (0.5, 1.0)),
    ((72, 72), "INCH", None),                     # the image-writer default
    ((96 / 2.54, 96 / 2.54), "CENTIMETER", None),  # the other one, in cm
    ((20000, 20000), "NONE", None),                # no unit: no size
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiff_resolution_counts_only_with_a_unit_and_not_a_default(tmp_path, backend, resolution, unit,
                                                                   expected):
    path = _write_one_level_tiff(tmp_path / "tags.tiff", resolution=resolution, resolutionunit=unit)
    with Slide(path, backend) as slide:
        assert slide.level0_mpp == (pytest.approx(expected) if expected else None)
        assert slide.mpp_source == ("tiff-tags" if expected else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_objective_power_is_the_last_resort_and_warns(tmp_path, caplog, backend):
    description = "Aperio Image Library v12.0.15\r\n256x256 [0,0 256x256] (256x256) JPEG/RGB Q=80|AppMag = 40"
    path = _write_one_level_tiff(tmp_path / "no_mpp.svs", description=description)
    with caplog.at_level(logging.WARNING, logger="ips_path.slides.slide"), Slide(path, backend) as slide:
        assert slide.vendor == "aperio" and slide.objective_power == 40
        assert (slide.level0_mpp, slide.mpp_source) == ((0.25, 0.25), "objective-power")
    assert "objective power 40x" in caplog.text and "--slide-mpp" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_mpp_error_names_the_slide_and_the_option(small_tiff_nompp, backend):
    with Slide(small_tiff_nompp.path, backend) as slide:
        assert slide.level0_mpp is None and slide.mpp_source is None
        for ask in (slide.require_mpp, lambda: slide.level_mpp(0)):
            with pytest.raises(BadInputError, match="--slide-mpp") as failure:
                ask()
            assert str(failure.value).startswith(f"{small_tiff_nompp.path}: ")
    with Slide(small_tiff_nompp.path, backend, slide_mpp=0.5) as slide:
        assert slide.require_mpp() == (0.5, 0.5)


@pytest.mark.parametrize("bad_mpp", [0, -0.5, float("nan"), float("inf"), 1e-300])
def test_a_nonsense_override_is_refused(small_svs, bad_mpp):
    with pytest.raises(BadInputError, match=r"--slide-mpp or the manifest's mpp\): .* µm/px"):
        Slide(small_svs.path, slide_mpp=bad_mpp)


# -- read failures and threads -------------------------------------------------------------------

@pytest.fixture(scope="module")
def svs_with_a_bad_tile(tmp_path_factory) -> tuple[pathlib.Path, tuple[int, int]]:
    """A generated SVS whose level-0 tile at (256, 256) cannot be decoded, and that tile's origin."""
    path = tmp_path_factory.mktemp("broken") / "one_bad_tile.svs"
    write_synthetic_slide(path, 1024, 768, downsamples=(1, 4), seed=4, tissue=np.ones((4, 4), bool))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        offset = page.dataoffsets[1 * tiles_across + 1]
    with open(path, "r+b") as file:
        file.seek(offset + 2)
        file.write(b"\xff\xdb\x00\x01")  # a quantisation table marker 1 byte long: libjpeg gives up
    return path, (256, 256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_read_names_the_place_and_the_slide_stays_usable(svs_with_a_bad_tile, backend):
    path, (x, y) = svs_with_a_bad_tile
    with Slide(path, backend) as slide:
        good_before = slide.read_region((0, 0), 0, (256, 256))
        for _ in range(2):
            with pytest.raises(IpspathError, match=rf"^{path}: cannot read region at level-0 \({x}, {y}\), level 0: "):
                slide.read_region((x, y), 0, (64, 64))
            assert (slide.read_region((0, 0), 0, (256, 256)) == good_before).all()
        assert slide.read_region((0, 0), 1, (256, 192)).shape == (192, 256, 3)  # other levels too


def test_unreadable_svs_fails_on_every_read_without_breaking_the_slide(bad_dir):
    path = bad_dir / "unreadable.svs"
    with Slide(path, "openslide") as slide:
        for location in [(0, 0), (8, 8), (0, 0)]:
            with pytest.raises(IpspathError, match=rf"^{path}: cannot read region"):
                slide.read_region(location, 0, (8, 8))
        assert slide.describe()["dimensions"] == [16, 16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_from_many_threads_match_serial_reads(small_svs, backend):
    rng = np.random.default_rng(0)
    locations = [(int(x), int(y)) for x, y in zip(rng.integers(0, 3800, 64), rng.integers(0, 2800, 64),
                                                  strict=True)]
    with Slide(small_svs.path, backend) as slide:
        serial = [slide.read_region(location, 0, (128, 128)) for location in locations]
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(lambda location: slide.read_region(location, 0, (128, 128)), locations))
    assert all((a == b).all() for a, b in zip(serial, threaded, strict=True))


def test_a_closed_slide_says_so(small_svs):
    slide = Slide(small_svs.path)
    slide.close()
    slide.close()
    with pytest.raises(IpspathError, match="the slide is closed"):
        slide.read_region((0, 0), 0, (8, 8))


def test_level_and_size_are_checked(small_svs):
    with Slide(small_svs.path) as slide:
        with pytest.raises(ValueError, match="level 3 out of range"):
            slide.read_region((0, 0), 3, (8, 8))
        with pytest.raises(ValueError, match="size must be positive"):
            slide.read_region((0, 0), 0, (0, 8))


# -- the rest ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_associated_images_and_thumbnail_are_rgb(small_svs, backend):
    with Slide(small_svs.path, backend) as slide:
        assert slide.associated_images == ("label", "thumbnail")
        for name in slide.associated_images:
            image = slide.associated_image(name)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        with pytest.raises(BadInputError, match=r"no associated image 'macro' \(it has: label, thumbnail\)"):
            slide.associated_image("macro")
        thumbnail = slide.get_thumbnail((400, 400))
    assert thumbnail.shape == (300, 400, 3)  # 4000 x 3000, aspect kept


def test_describe_is_json_with_the_agreed_keys(small_svs):
    with Slide(small_svs.path) as slide:
        description = json.loads(json.dumps(slide.describe()))
    assert description == {
        "path": str(small_svs.path), "backend": "openslide", "vendor": "aperio", "dimensions": [4000, 3000],
        "levels": [[4000, 3000], [1000, 750], [250, 187]],
        "downsamples": pytest.approx([1.0, 4.0, (4000 / 250 + 3000 / 187) / 2]),
        "level0_mpp": [0.5, 0.5], "level_mpp": pytest.approx([0.5, 2.0, 0.5 * (4000 / 250 + 3000 / 187) / 2]),
        "mpp_source": "metadata", "objective_power": 20.0, "associated_images": ["label", "thumbnail"],
    }


def test_wsi_extensions_are_lower_case_suffixes():
    assert {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".dcm", ".scn", ".bif"} <= WSI_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in WSI_EXTENSIONS)


def test_every_low_resolution_picture_reports_a_damaged_block_in_the_same_one_line(bad_dir):
    from ips_path.review.heatmap import read_downsampled, slide_thumbnail
    from ips_path.tiling.tissue import read_low_resolution as tissue_image

    path = bad_dir / "unreadable.svs"
    users = {
        "tissue mask": lambda slide: tissue_image(slide, 8.0, threads=2),
        "heatmap thumbnail": lambda slide: slide_thumbnail(slide, 8, threads=2),
        "viewer tile": lambda slide: read_downsampled(slide, (0, 0), (16, 16), (1.0, 1.0)),
    }
    messages = {}
    with Slide(path, slide_mpp=0.5) as slide:
        for user, read in users.items():
            with pytest.raises(BadInputError) as caught:
                read(slide)
            messages[user] = str(caught.value)
    assert set(messages.values()) == {f"{path}: cannot read region at level-0 (0, 0), level 0: Bogus marker length; "
                                      "the file is damaged: re-export or re-scan it"}, messages


@pytest.mark.parametrize("resampling", ["bilinear", "box"])
def test_a_low_resolution_read_names_the_first_damaged_block_and_counts_the_rest(bad_dir, resampling):
    path = bad_dir / "unreadable.svs"  # 16 x 16 px: 4 x 4 blocks of 4 px, all damaged
    size = (16, 16) if resampling == "bilinear" else None
    with Slide(path, slide_mpp=0.5) as slide, pytest.raises(BadInputError) as caught:
        read_low_resolution(slide, (1.0, 1.0), size=size, resampling=resampling, read_block=4, threads=3)
    assert str(caught.value).startswith(f"{path}: cannot read region at level-0 (0, 0), level 0: ")
    assert str(caught.value).endswith(" (and 15 more unreadable regions); the file is damaged: re-export or re-scan it")
