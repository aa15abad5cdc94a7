"""Tile stores are verified where they are read: whole, and made from the slide they are used for.

Real generated slides and real stores; the damage is done to the files on disk as a user (or a
failing disk, or a careless copy) would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ips_path.runtime.errors import BadInputError
from ips_path.stores.tile_store import StoreMismatchError, TileStore
from ips_path.synthetic.synth import write_synthetic_slide
from ips_path.tiling.run import SlideInput, TilingParams, tile_slide

PARAMS = TilingParams(target_mpp=2.0, patch_size=32, qc=False)


@pytest.fixture
def tiled(tmp_path) -> tuple[Path, Path, Path]:
    """Two generated slides A and B tiled into one folder: (slide A, slide B, tiles)."""
    slides = []
    for name, seed in (("A", 1), ("B", 2)):
        spec = write_synthetic_slide(tmp_path / f"{name}.svs", 1024, 768, mpp=1.0, downsamples=(1,), seed=seed)
        assert tile_slide(SlideInput(name, spec.path), tmp_path / "tiles", PARAMS).status == "tiled"
        slides.append(spec.path)
    return slides[0], slides[1], tmp_path / "tiles"


def _first_chunk(store: Path, array: str) -> Path:
    return next(p for p in sorted((store / array / "c").rglob("*")) if p.is_file())


def test_a_whole_store_of_its_slide_opens(tiled):
    slide_a, _, tiles = tiled
    store = TileStore.open(tiles / "A.zarr", slide_id="A", slide_path=slide_a)
    assert store.n_patches > 0 and store.attrs["slide_identity"]["size"] == slide_a.stat().st_size


def test_a_store_copied_under_another_slides_id_is_refused_and_tile_redoes_it(tiled):
    slide_a, slide_b, tiles = tiled
    shutil.rmtree(tiles / "B.zarr")
    shutil.copytree(tiles / "A.zarr", tiles / "B.zarr")
    with pytest.raises(StoreMismatchError, match="made for slide 'A', not 'B'"):
        TileStore.open(tiles / "B.zarr", slide_id="B", slide_path=slide_b)
    # renamed in its attrs too: the slide file still tells
    with pytest.raises(StoreMismatchError, match=f"made from another file than {slide_b}"):
        TileStore.open(tiles / "B.zarr", slide_path=slide_b)
    result = tile_slide(SlideInput("B", slide_b), tiles, PARAMS)
    assert result.status == "tiled"
    assert TileStore.open(tiles / "B.zarr", slide_id="B", slide_path=slide_b).attrs["slide_id"] == "B"


def test_a_slide_replaced_after_tiling_is_found_even_with_its_old_size_and_mtime(tiled, tmp_path):
    slide_a, _, tiles = tiled
    before = slide_a.stat()
    other = write_synthetic_slide(tmp_path / "other.svs", 1024, 768, mpp=1.0, downsamples=(1,), seed=9)
    data = bytearray(other.path.read_bytes())
    data = (data + bytes(max(0, before.st_size - len(data))))[:before.st_size]  # same size, other content
    slide_a.write_bytes(bytes(data))
    os.utime(slide_a, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or `rsync -t` would
    assert slide_a.stat().st_size == before.st_size and slide_a.stat().st_mtime_ns == before.st_mtime_ns
    # the store checks the file it was tiled from, whoever opens it
    with pytest.raises(StoreMismatchError, match="the slide file was replaced or changed after tiling"):
        TileStore.open(tiles / "A.zarr")


def test_a_slide_rewritten_with_other_content_is_tiled_again(tiled, tmp_path):
    slide_a, _, tiles = tiled
    old_patches = TileStore.open(tiles / "A.zarr").coords
    write_synthetic_slide(slide_a, 1024, 768, mpp=1.0, downsamples=(1,), seed=7, tissue=1)
    result = tile_slide(SlideInput("A", slide_a), tiles, PARAMS)
    assert result.status == "tiled"
    store = TileStore.open(tiles / "A.zarr", slide_id="A", slide_path=slide_a)
    assert not np.array_equal(store.coords, old_patches)
    assert tile_slide(SlideInput("A", slide_a), tiles, PARAMS).status == "skipped"


def test_a_touched_slide_with_the_same_content_is_still_its_store(tiled):
    slide_a, _, tiles = tiled
    os.utime(slide_a, (1, 1))  # copied to another disk: new mtime, same bytes
    assert TileStore.open(tiles / "A.zarr", slide_id="A", slide_path=slide_a).n_patches > 0
    assert tile_slide(SlideInput("A", slide_a), tiles, PARAMS).status == "skipped"


@pytest.mark.parametrize("array", ["coords", "tissue_fraction", "mask"])
def test_a_deleted_chunk_is_a_damaged_store_not_zeros(tiled, array):
    slide_a, _, tiles = tiled
    chunk = _first_chunk(tiles / "A.zarr", array)
    chunk.unlink()
    with pytest.raises(BadInputError, match=f"damaged tile store .*1 of 1 chunk file.* of '{array}' are missing"):
        TileStore.open(tiles / "A.zarr")
    failed = tile_slide(SlideInput("A", slide_a), tiles, PARAMS)  # tile refuses to guess
    assert failed.status == "failed" and failed.exit_code == 2 and "--overwrite" in failed.error
    assert tile_slide(SlideInput("A", slide_a), tiles, PARAMS, overwrite=True).status == "tiled"
    assert TileStore.open(tiles / "A.zarr").n_patches > 0


@pytest.mark.parametrize("array", ["coords", "tissue_fraction", "mask"])
def test_a_truncated_chunk_does_not_decode_into_numbers(tiled, array):
    _, _, tiles = tiled
    chunk = _first_chunk(tiles / "A.zarr", array)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(BadInputError, match=f"damaged tile store \\(array '{array}' does not decode"):
        store = TileStore.open(tiles / "A.zarr")
        store.mask()


def test_a_store_missing_an_array_or_with_the_wrong_shape_is_damaged(tiled):
    _, _, tiles = tiled
    shutil.rmtree(tiles / "A.zarr" / "mask")
    with pytest.raises(BadInputError, match="array 'mask' is missing"):
        TileStore.open(tiles / "A.zarr")
    meta = tiles / "B.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["n_patches"] += 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="array 'coords' is int64 .* not the int64 with .* rows"):
        TileStore.open(tiles / "B.zarr")


def test_a_damaged_features_array_is_refused_when_read(tiled):
    _, _, tiles = tiled
    store = TileStore.open(tiles / "A.zarr")
    store.write_array("features/enc", np.zeros((store.n_patches, 8), np.float16))
    assert store.read_array("features/enc").shape == (store.n_patches, 8)
    _first_chunk(tiles / "A.zarr", "features/enc").unlink()
    with pytest.raises(BadInputError, match="damaged array 'features/enc'"):
        store.read_array("features/enc")


def test_a_store_of_the_older_format_is_tiled_again(tiled):
    slide_a, _, tiles = tiled
    meta = tiles / "A.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreMismatchError, match="format 1 records no identity"):
        TileStore.open(tiles / "A.zarr")
    assert tile_slide(SlideInput("A", slide_a), tiles, PARAMS).status == "tiled"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ips_path.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_train_refuses_a_swapped_and_a_damaged_store_in_one_line_each(cohort, tmp_path):
    manifest, tiles = cohort
    copy = tmp_path / "tiles"
    shutil.copytree(tiles, copy)
    shutil.rmtree(copy / "slide_001.zarr")
    shutil.copytree(copy / "slide_000.zarr", copy / "slide_001.zarr")
    _first_chunk(copy / "slide_002.zarr", "coords").unlink()
    done = _cli("train", "--manifest", manifest, "--tiles", copy, "-o", tmp_path / "run", "--epochs", "1",
                "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "slide_001.zarr: made for slide 'slide_000', not 'slide_001'" in done.stderr
    assert "slide_002.zarr: damaged tile store" in done.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_predict_refuses_a_swapped_store_in_the_users_tiles(trained_run, cohort, tmp_path):
    from ips_path.inference.predict import predict

    manifest, tiles = cohort
    copy = tmp_path / "tiles"
    copy.mkdir()
    shutil.copytree(tiles / "slide_000.zarr", copy / "slide_001.zarr")
    slide = manifest.parent / "slide_001.svs"
    assert slide.is_file()
    result = predict(trained_run, tmp_path / "p", inputs=[slide], tiles_dir=copy, heatmaps=False, progress=False)
    record = result.outcomes[0]
    assert record.status == "failed" and record.exit_code == 2
    assert "made for slide 'slide_000', not 'slide_001'" in record.error
