"""Tile stores: round trip, atomic writes (also under SIGKILL), extra arrays, CLAM/TRIDENT h5."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from ips_path.runtime.errors import BadInputError
from ips_path.stores.exchange import export_h5
from ips_path.stores.tile_store import (
    GRID_ATTR,
    TileStore,
    remove_partial_stores,
    slide_id_from_path,
    store_path,
    write_tile_store,
)
from ips_path.synthetic.synth import write_synthetic_slide
from ips_path.tiling.from_coords import import_h5

ATTRS = {
    "slide_id": "S1",
    "slide_path": "/data/S1.svs",
    "slide_identity": {"size": 1, "mtime_ns": 1, "fingerprint": "0"},
    "level0_mpp": [0.25, 0.26],
    "target_mpp": 0.5,
    "patch_size": 256,
    "patch_size_level0": 512,
    "stride_level0": 512,
    "read_level": 0,
    "read_downsample": 1.0,
    "read_size": 512,
    "slide_dimensions": [4096, 3072],
    "tissue_params": {"method": "colour", "min_object_um2": 20000.0},
}


def _write(path, n=5, attrs=ATTRS):
    coords = np.array([[512 * (i % 4), 512 * (i // 4)] for i in range(n)], np.int64)[::-1]  # reversed
    fractions = np.linspace(0.5, 1.0, n, dtype=np.float32)[::-1]
    mask = np.zeros((40, 60), bool)
    mask[5:20, 10:50] = True
    return write_tile_store(path, coords, fractions, mask, 8.0, attrs, mask_downsample=31.4), coords, fractions, mask


def test_round_trip_sorts_row_major_and_keeps_everything(tmp_path):
    written, coords, fractions, mask = _write(tmp_path / "S1.zarr")
    store = TileStore.open(tmp_path / "S1.zarr")
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert store.coords.dtype == np.int64 and store.coords.tolist() == coords[order].tolist()
    assert store.tissue_fraction.dtype == np.float32
    np.testing.assert_array_equal(store.tissue_fraction, fractions[order])  # fractions follow their patch
    assert store.n_patches == 5 == store.attrs["n_patches"]
    assert store.slide_path == Path("/data/S1.svs")
    assert store.level0_mpp == (0.25, 0.26) and store.target_mpp == 0.5
    assert (store.patch_size, store.patch_size_level0, store.read_level, store.read_size) == (256, 512, 0, 512)
    assert store.attrs["format"] == "ipspath.tiles" and store.attrs["complete"] is True
    assert store.attrs["tissue_params"] == ATTRS["tissue_params"]
    stored_mask, mask_mpp = store.mask()
    assert stored_mask.dtype == bool and np.array_equal(stored_mask, mask) and mask_mpp == 8.0
    assert store.mask_downsample() == 31.4
    assert written.coords.tolist() == store.coords.tolist()
    # the arrays on disk have the documented types
    assert zarr.open_array(tmp_path / "S1.zarr" / "mask", mode="r").dtype == np.uint8


def test_empty_store_opens(tmp_path):
    write_tile_store(tmp_path / "e.zarr", np.zeros((0, 2)), np.zeros(0), np.zeros((3, 3), bool), 8.0, ATTRS)
    store = TileStore.open(tmp_path / "e.zarr")
    assert store.n_patches == 0 and store.coords.shape == (0, 2)


def test_paths_and_ids():
    assert slide_id_from_path("/a/b/TCGA-01.svs") == "TCGA-01"
    assert store_path("/out", "S1") == Path("/out/S1.zarr")


def test_missing_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="no tile store"):
        TileStore.open(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadInputError, match="not a tile store"):
        TileStore.open(tmp_path / "plain")
    group = zarr.open_group(tmp_path / "other.zarr", mode="w")
    group.attrs["format"] = "something.else"
    with pytest.raises(BadInputError, match="not an ipspath tile store"):
        TileStore.open(tmp_path / "other.zarr")


def test_a_store_without_the_complete_marker_does_not_open(tmp_path):
    _write(tmp_path / "S1.zarr")
    meta = tmp_path / "S1.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="incomplete"):
        TileStore.open(tmp_path / "S1.zarr")


def test_exception_between_array_writes_leaves_the_old_store_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "S1.zarr"
    _write(path, n=3)
    real_create = zarr.Group.create_array

    def failing_create(self, name, **kwargs):
        if name == "mask":
            raise OSError("disk full")
        return real_create(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", failing_create)
    with pytest.raises(OSError, match="disk full"):
        _write(path, n=7)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "new.zarr", n=7)
    assert TileStore.open(path).n_patches == 3  # the old store is untouched
    assert not (tmp_path / "new.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.zarr"]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np, zarr
    from ips_path.stores.tile_store import write_tile_store
    real_create = zarr.Group.create_array
    def slow_create(self, name, **kwargs):
        array = real_create(self, name, **kwargs)
        if name == "tissue_fraction":  # coords and fractions written, mask and attrs not yet
            Path(sys.argv[2]).write_text("now")
            time.sleep(60)
        return array
    zarr.Group.create_array = slow_create
    attrs = {"slide_id": "S", "slide_path": "s.svs", "slide_identity": {}, "level0_mpp": [0.5, 0.5],
             "target_mpp": 0.5, "patch_size": 256,
             "patch_size_level0": 256, "read_level": 0, "read_size": 256}
    write_tile_store(sys.argv[1], np.zeros((9, 2)), np.ones(9), np.ones((4, 4), bool), 8.0, attrs)
    """
)


def _kill_midway(store: Path, tmp_path: Path) -> None:
    signal_file = tmp_path / "midway"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(store), str(signal_file)])
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            assert child.poll() is None, "the writer ended early"
            assert time.monotonic() < deadline, "the writer never got midway"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)


def test_writer_killed_midway_leaves_nothing_that_opens(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "S1.zarr", n=3)
    _kill_midway(out / "S1.zarr", tmp_path)  # replacing an existing store
    _kill_midway(out / "S2.zarr", tmp_path)  # a new store
    assert TileStore.open(out / "S1.zarr").n_patches == 3
    with pytest.raises(BadInputError):
        TileStore.open(out / "S2.zarr")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers and all(name.startswith((".S1.zarr", ".S2.zarr")) for name in leftovers)
    for leftover in leftovers:  # the half-written folders are not stores either
        with pytest.raises(BadInputError):
            TileStore.open(out / leftover)
    remove_partial_stores(out, "S1")
    remove_partial_stores(out, "S2")
    assert sorted(p.name for p in out.iterdir()) == ["S1.zarr"]


def test_extra_arrays_are_added_replaced_listed_and_read(tmp_path):
    store, *_ = _write(tmp_path / "S1.zarr")
    assert store.array_names("scores") == [] and not store.has_array("scores/run1")
    store.write_array("scores/run1", np.arange(5, dtype=np.float32), {"model": "m1"})
    store.write_array("scores/run2", np.ones(5, np.float32))
    store.write_array("features/resnet18", np.full((5, 8), 0.5, np.float16))
    reopened = TileStore.open(tmp_path / "S1.zarr")
    assert reopened.array_names("scores") == ["run1", "run2"]
    assert reopened.array_names("features") == ["resnet18"]
    assert reopened.read_array("scores/run1").tolist() == [0, 1, 2, 3, 4]
    # every array records the patch grid it was made on
    assert reopened.array_attrs("scores/run1") == {"model": "m1", GRID_ATTR: store.grid_sha256}
    features = reopened.read_array("features/resnet18")
    assert features.dtype == np.float16 and features.shape == (5, 8)
    reopened.write_array("scores/run1", np.zeros(5, np.float32))  # replaces
    assert reopened.read_array("scores/run1").tolist() == [0] * 5
    assert reopened.array_attrs("scores/run1") == {GRID_ATTR: store.grid_sha256}
    assert reopened.open_array("features/resnet18")[1:3].shape == (2, 8)
    with pytest.raises(KeyError):
        reopened.read_array("scores/nope")
    # the zarr hierarchy stays valid for other zarr readers
    assert set(zarr.open_group(tmp_path / "S1.zarr", mode="r")["scores"].array_keys()) == {"run1", "run2"}
    assert not [p for p in (tmp_path / "S1.zarr").rglob(".*")]  # no temporary folders left


def test_core_and_odd_array_names_are_refused(tmp_path):
    store, *_ = _write(tmp_path / "S1.zarr")
    for name in ("coords", "mask", "tissue_fraction"):
        with pytest.raises(ValueError):
            store.write_array(name, np.zeros(5))
    for name in ("", "scores/", "../x", "scores/.hidden"):
        with pytest.raises(ValueError):
            store.write_array(name, np.zeros(5))


def test_failed_array_write_leaves_the_previous_array(tmp_path, monkeypatch):
    store, *_ = _write(tmp_path / "S1.zarr")
    store.write_array("scores/run1", np.ones(5, np.float32))

    def broken_rename(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError):
        store.write_array("scores/run1", np.zeros(5, np.float32))
    monkeypatch.undo()
    assert store.read_array("scores/run1").tolist() == [1] * 5
    assert not [p for p in (tmp_path / "S1.zarr").rglob(".*")]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "h5slide.svs"
    write_synthetic_slide(path, 2048, 1536, mpp=0.5, downsamples=(1, 4), seed=2)
    return path


def test_h5_export_has_the_clam_layout_and_imports_back(tmp_path, small_slide):
    attrs = {**ATTRS, "slide_path": str(small_slide), "slide_id": "h5slide", "level0_mpp": [0.5, 0.5],
             "target_mpp": 1.0, "read_level_dimensions": [2048, 1536]}
    store, *_ = _write(tmp_path / "h5slide.zarr", n=6, attrs=attrs)
    export_h5(store, tmp_path / "h5slide.h5")
    with h5py.File(tmp_path / "h5slide.h5", "r") as f:
        coords = f["coords"]
        assert coords.dtype == np.int64 and coords[...].tolist() == store.coords.tolist()
        assert coords.attrs["patch_size"] == 512 and coords.attrs["patch_level"] == 0
        assert coords.attrs["patch_size_level0"] == 512
        assert coords.attrs["target_magnification"] == pytest.approx(10.0)
        assert coords.attrs["name"] == "h5slide"
        assert coords.attrs["level_dim"].tolist() == [2048, 1536]
    imported = import_h5(tmp_path / "h5slide.h5", small_slide, tmp_path / "imported.zarr", target_mpp=1.0)
    assert imported.coords.tolist() == store.coords.tolist()
    assert (imported.patch_size, imported.patch_size_level0, imported.target_mpp) == (256, 512, 1.0)
    assert (imported.read_level, imported.read_size) == (0, 512)
    assert imported.attrs["imported_from"].endswith("h5slide.h5")
    reopened = TileStore.open(tmp_path / "imported.zarr")
    assert reopened.tissue_fraction.shape == (6,) and reopened.mask()[0].any()


def test_clam_h5_with_a_patch_level_imports(tmp_path, small_slide):
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f.create_dataset("coords", data=np.array([[0, 0], [1024, 512]]))
        f["coords"].attrs["patch_size"] = 64  # at level 1, downsample 4: 256 level-0 px
        f["coords"].attrs["patch_level"] = 1
    store = import_h5(tmp_path / "clam.h5", small_slide, tmp_path / "clam.zarr", target_mpp=2.0)
    assert store.patch_size_level0 == 256 and store.patch_size == 64
    assert (store.read_level, store.read_size) == (1, 64)


def test_h5_without_coords_is_bad_input(tmp_path, small_slide):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("features", data=np.zeros(3))
    with pytest.raises(BadInputError, match="no 'coords'"):
        import_h5(tmp_path / "x.h5", small_slide, tmp_path / "x.zarr", target_mpp=0.5)
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(BadInputError, match="junk.h5"):
        import_h5(tmp_path / "junk.h5", small_slide, tmp_path / "y.zarr", target_mpp=0.5)
