"""`ipspath features import` against hostile feature files: one line naming the file and the fix,
exit code 2, nothing written; identical files re-imported after a copy or a touch are reused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from tool_h5 import write_clam, write_stamp, write_trident

from ips_path.cli.main import main
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import write_synthetic_cohort

MPP = 0.5
SIZE = (1024, 768)
PATCH_L0 = 128
DIM = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """2 generated slides (0.5 µm/px) and their manifest; one patch grid and features for all."""
    root = tmp_path_factory.mktemp("hostile_import")
    write_synthetic_cohort(root / "slides", 2, size=SIZE, mpp=MPP, downsamples=(1, 4), seed=3, workers=1)
    xs, ys = np.arange(0, SIZE[0] - PATCH_L0 + 1, PATCH_L0), np.arange(0, SIZE[1] - PATCH_L0 + 1, PATCH_L0)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    features = np.random.default_rng(0).normal(size=(len(coords), DIM)).astype(np.float32)
    return root / "slides" / "manifest.csv", ["slide_000", "slide_001"], coords, features


def _trident(folder: Path, ids, coords, features, edit=None) -> Path:
    for slide_id in ids:
        path = write_trident(folder, slide_id, coords, features, patch_size=32, level0_magnification=20,
                             target_magnification=5, dimensions=SIZE)
        if edit is not None:
            with h5py.File(path, "a") as f:
                edit(f)
    return folder


def _import(folder: Path, manifest: Path, tiles: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(["-q", "features", "import", str(folder), "--manifest", str(manifest), "-o", str(tiles), *extra])
    return int(info.value.code), capsys.readouterr().err.strip().splitlines()


def _refused(code: int, err: list[str], *words: str) -> None:
    """Exit 2, one line 'ipspath: error: ...' holding ``words``, no traceback, no internal error."""
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ipspath: error: "), err
    assert "internal error" not in err[0] and "Traceback" not in err[0]
    for word in words:
        assert word in err[0], err


def _nothing_written(tiles: Path) -> None:
    assert not list(tiles.glob("*.zarr")) if tiles.exists() else True


def _set(dataset: str, key: str, value):
    def edit(f):
        (f[dataset] if dataset else f).attrs[key] = value
    return edit


def _replace(dataset: str, values):
    def edit(f):
        del f[dataset]
        f[dataset] = values
    return edit


@pytest.mark.parametrize("case, words", [
    ("target_magnification 0", ["slide_000.h5", "target_magnification", "0"]),
    ("patch_size abc", ["slide_000.h5", "patch_size", "'abc'"]),
    ("string features", ["slide_000.h5", "'features'", "numbers"]),
    ("complex features", ["slide_000.h5", "'features'", "complex"]),
    ("bool features", ["slide_000.h5", "'features'", "bool"]),
])
def test_bad_trident_files_are_one_line_naming_the_file(cohort, tmp_path, capsys, case, words):
    manifest, ids, coords, features = cohort
    edit = {
        "target_magnification 0": _set("coords", "target_magnification", 0),
        "patch_size abc": _set("coords", "patch_size", "abc"),
        "string features": _replace("features", np.full(features.shape, b"a", dtype="S1")),
        "complex features": _replace("features", features.astype(np.complex64)),
        "bool features": _replace("features", features > 0),
    }[case]
    folder = _trident(tmp_path / "features_uni_v1", ids, coords, features, edit)
    code, err = _import(folder, manifest, tmp_path / "tiles", capsys)
    _refused(code, err, *words)
    _nothing_written(tmp_path / "tiles")


def test_stamp_tile_size_px_0_and_clam_downsample_nan_are_one_line(cohort, tmp_path, capsys):
    manifest, ids, coords, features = cohort
    for slide_id in ids:
        write_stamp(tmp_path / "stamp", slide_id, coords * MPP, features, tile_size_um=PATCH_L0 * MPP, tile_size_px=0)
    code, err = _import(tmp_path / "stamp", manifest, tmp_path / "tiles", capsys)
    _refused(code, err, "slide_000.h5", "tile_size_px", "0")
    for slide_id in ids:
        write_clam(tmp_path / "clam", tmp_path / "patches", slide_id, coords, features, patch_size=32, patch_level=1,
                   level_downsample=float("nan"), level_dim=(256, 192))
    code, err = _import(tmp_path / "clam" / "h5_files", manifest, tmp_path / "tiles", capsys,
                        "--clam-patches", str(tmp_path / "patches"), "--name", "clam_feats")
    _refused(code, err, "slide_000.h5", "downsample", "nan")
    _nothing_written(tmp_path / "tiles")


def test_nan_stamp_coordinates_are_reported_as_nan(cohort, tmp_path, capsys):
    manifest, ids, coords, features = cohort
    coords_um = (coords * MPP).astype(np.float64)
    coords_um[2, 0] = np.nan
    for slide_id in ids:
        write_stamp(tmp_path / "stamp", slide_id, coords_um, features, tile_size_um=PATCH_L0 * MPP, tile_size_px=32)
    code, err = _import(tmp_path / "stamp", manifest, tmp_path / "tiles", capsys)
    _refused(code, err, "slide_000.h5", "NaN")
    assert "outside the slide" not in err[0]
    _nothing_written(tmp_path / "tiles")


def test_coords_stored_as_2_by_n_are_refused_for_their_shape(cohort, tmp_path, capsys):
    manifest, ids, coords, features = cohort
    # a square grid whose transposed coordinates all lie inside the slide: reshape(-1, 2) scrambles them silently
    square = coords[(coords < 640).all(axis=1)]
    folder = _trident(tmp_path / "features_uni_v1", ids, np.ascontiguousarray(square.T), features[:len(square)])
    code, err = _import(folder, manifest, tmp_path / "tiles", capsys)
    _refused(code, err, "slide_000.h5", f"(2, {len(square)})", "(N, 2)")
    assert "repeated" not in err[0]
    _nothing_written(tmp_path / "tiles")
    # two patches, (2, 2): rows of (x, y), as every tool writes them
    folder = _trident(tmp_path / "two" / "features_uni_v1", ids, coords[:2], features[:2])
    code, err = _import(folder, manifest, tmp_path / "tiles", capsys)
    assert code == 0, err
    np.testing.assert_array_equal(TileStore.open(tmp_path / "tiles" / "slide_000.zarr").coords, coords[:2])


def test_coordinates_off_the_slide_pixel_grid_are_refused(cohort, tmp_path, capsys):
    manifest, ids, coords, features = cohort
    fractional = coords.astype(np.float64)
    fractional[5] += 0.5  # level-0 px of a TRIDENT file are whole pixels; 0.5 is another frame

    def edit(f):
        attrs = dict(f["coords"].attrs)  # TRIDENT's attributes stay on the new coords
        _replace("coords", fractional)(f)
        f["coords"].attrs.update(attrs)

    folder = _trident(tmp_path / "features_uni_v1", ids, coords, features, edit)
    code, err = _import(folder, manifest, tmp_path / "tiles", capsys)
    _refused(code, err, "slide_000.h5", "whole", "pixel")
    _nothing_written(tmp_path / "tiles")


def test_identical_files_after_cp_r_or_touch_are_reused(cohort, tmp_path, capsys):
    manifest, ids, coords, features = cohort
    folder = _trident(tmp_path / "features_uni_v1", ids, coords, features)
    tiles = tmp_path / "tiles"
    assert _import(folder, manifest, tiles, capsys)[0] == 0
    copied = tmp_path / "copy" / "features_uni_v1"
    shutil.copytree(folder, copied)  # cp -r: new mtimes, same bytes
    code, err = _import(copied, manifest, tiles, capsys)
    assert code == 0, err
    for path in folder.glob("*.h5"):
        os.utime(path, (1e9, 1e9))  # touch
    code, err = _import(folder, manifest, tiles, capsys)
    assert code == 0, err


def test_a_full_disk_during_import_names_the_output(cohort, tmp_path, full_dir, capsys):
    manifest, ids, coords, features = cohort
    big = np.random.default_rng(1).normal(size=(len(coords), 4096)).astype(np.float32)  # 48 x 4096 float16: 384 KiB
    folder = _trident(tmp_path / "features_uni_v1", ids, coords, big)
    code, err = _import(folder, manifest, full_dir, capsys)
    assert code == 2, err
    failures = [line for line in err if "no space left on device" in line]
    assert failures and all(str(full_dir) in line and str(folder) not in line for line in failures), err
    assert "internal error" not in "\n".join(err)
