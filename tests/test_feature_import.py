"""Feature files of TRIDENT, CLAM and STAMP become tile-store features that train and predict use."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from tool_h5 import write_clam, write_stamp, write_trident

from ips_path.cli.main import main
from ips_path.runtime.errors import BadInputError, RefusedError
from ips_path.stores import feature_import
from ips_path.stores.feature_import import import_features
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import in_lesion, write_synthetic_cohort

MPP = 0.5          # level-0 µm/px of the generated slides
SIZE = (1024, 768)
PATCH_L0 = 128     # patch side at level 0: 32 px at 2 µm/px
DIM = 16


def _grid(width: int, height: int, step: int = PATCH_L0) -> np.ndarray:
    xs, ys = np.arange(0, width - step + 1, step), np.arange(0, height - step + 1, step)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def _features(spec, coords: np.ndarray, seed: int) -> np.ndarray:
    """Features where dimension 0 says "lesion": a model can learn the slide label from them."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 0.3, (len(coords), DIM)).astype(np.float32)
    features[:, 0] += 3.0 * in_lesion(spec, coords, PATCH_L0, min_fraction=0.2)
    return features


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 generated slides (0.5 µm/px, levels 1/4) and their manifest; each slide's grid and features."""
    root = tmp_path_factory.mktemp("import_cohort")
    specs = write_synthetic_cohort(root / "slides", 4, size=SIZE, mpp=MPP, downsamples=(1, 4), seed=11, workers=2,
                                   lesion_diameter_um=(150.0, 300.0))
    coords = _grid(*SIZE)
    grids = {s.path.stem: (coords, _features(s, coords, i)) for i, s in enumerate(specs)}
    return root / "slides" / "manifest.csv", grids


def _write_trident_folder(folder: Path, grids: dict, order: str = "row") -> Path:
    for slide_id, (coords, features) in grids.items():
        index = np.arange(len(coords)) if order == "row" else np.lexsort((coords[:, 1], coords[:, 0]))
        write_trident(folder, slide_id, coords[index], features[index], patch_size=32, level0_magnification=20,
                      target_magnification=5, dimensions=SIZE)
    return folder


def _stored(store: TileStore, name: str, coords: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The stored features re-ordered as ``coords`` (to compare with what the file held)."""
    where = {tuple(c): i for i, c in enumerate(store.coords.tolist())}
    return store.read_array(f"features/{name}")[[where[tuple(c)] for c in coords.tolist()]]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code), capsys.readouterr().err


def _arrays(tiles: Path) -> dict[str, list[str]]:
    return {p.stem: TileStore.open(p).array_names("features") for p in sorted(tiles.glob("*.zarr"))}


def test_a_trident_folder_trains_and_predicts_with_heatmaps(cohort, tmp_path, capsys):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "20x_256px_0px_overlap" / "features_uni_v1", grids, order="column")
    tiles = tmp_path / "tiles"
    code, err = _run(["-q", "features", "import", str(folder), "--manifest", str(manifest), "-o", str(tiles)], capsys)
    assert code == 0, err
    for slide_id, (coords, features) in grids.items():
        store = TileStore.open(tiles / f"{slide_id}.zarr")
        assert store.n_patches == len(coords) and store.patch_size_level0 == PATCH_L0
        assert store.target_mpp == pytest.approx(2.0) and store.patch_size == 32
        np.testing.assert_array_equal(_stored(store, "uni_v1", coords, features), features.astype(np.float16))
        attrs = store.array_attrs("features/uni_v1")
        assert attrs["tool"] == "trident" and attrs["encoder"] == "uni_v1" and attrs["dim"] == DIM
        assert attrs["source_file"] == str((folder / f"{slide_id}.h5").resolve())
        assert attrs["identity"]["source"]["size"] == (folder / f"{slide_id}.h5").stat().st_size

    run = tmp_path / "run"
    code, err = _run(["-q", "train", "--manifest", str(manifest), "--tiles", str(tiles), "--features", "uni_v1",
                      "-o", str(run), "--epochs", "1", "--batch-size", "2", "--n-select", "8", "--dim", "16",
                      "--heads", "2", "--device", "cpu", "--val-fraction", "0.5", "--warmup-epochs", "0"], capsys)
    assert code == 0, err
    pred = tmp_path / "pred"
    code, err = _run(["-q", "predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles),
                      "-o", str(pred), "--device", "cpu", "--thumbnail-size", "128", "--top-k", "2"], capsys)
    assert code == 0, err
    with open(pred / "predictions.csv", newline="") as f:
        assert sorted(r["slide_id"] for r in csv.DictReader(f)) == sorted(grids)
    for slide_id in grids:
        assert (pred / "heatmaps" / slide_id / "overlay.png").is_file()
    # New slides: predict cannot make TRIDENT's features; it says so once, naming the extractor.
    code, err = _run(["predict", "--model", str(run), "--manifest", str(manifest), "-o", str(tmp_path / "new"),
                      "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("4 slide(s) lack the features/uni_v1 the model reads, imported from TRIDENT files of the extractor "
            "'uni_v1': new slides need features from the same extractor") in err, err
    assert "--format trident --name uni_v1; then run this predict again" in err


def test_features_are_copied_block_by_block_in_store_order(cohort, tmp_path, monkeypatch):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "features_uni_v1", grids, order="column")
    monkeypatch.setattr(feature_import, "BLOCK_BYTES", 5 * DIM * 4)  # five rows a block: many blocks
    results = import_features(folder, manifest, tmp_path / "tiles", progress=False)
    assert {(r.status, r.extra["store_created"]) for r in results} == {("done", True)}
    for slide_id, (coords, features) in grids.items():
        store = TileStore.open(tmp_path / "tiles" / f"{slide_id}.zarr")
        np.testing.assert_array_equal(_stored(store, "uni_v1", coords, features), features.astype(np.float16))


def test_clam_files_need_their_patch_files_and_join_existing_stores(cohort, tmp_path):
    manifest, grids = cohort
    tiles = tmp_path / "tiles"
    import_features(_write_trident_folder(tmp_path / "features_uni_v1", grids), manifest, tiles, progress=False)
    feat_dir, patches = tmp_path / "clam_feats", tmp_path / "clam" / "patches"
    clam = {}
    for slide_id, (coords, features) in grids.items():
        clam[slide_id] = features[:, ::-1].copy()
        write_clam(feat_dir, patches, slide_id, coords, clam[slide_id], patch_size=32, patch_level=1,
                   level_downsample=4.0, level_dim=(SIZE[0] // 4, SIZE[1] // 4))
    with pytest.raises(BadInputError, match="--clam-patches"):
        import_features(feat_dir / "h5_files", manifest, tiles, name="resnet50_trunc", progress=False)
    with pytest.raises(BadInputError, match="give --name"):
        import_features(feat_dir / "h5_files", manifest, tiles, clam_patches=patches, progress=False)
    results = import_features(feat_dir / "h5_files", manifest, tiles, name="resnet50_trunc", clam_patches=patches,
                              progress=False)
    assert {(r.status, r.extra["store_created"]) for r in results} == {("done", False)}
    for slide_id, (coords, _) in grids.items():
        store = TileStore.open(tiles / f"{slide_id}.zarr")
        assert store.array_names("features") == ["resnet50_trunc", "uni_v1"]
        np.testing.assert_array_equal(_stored(store, "resnet50_trunc", coords, clam[slide_id]),
                                      clam[slide_id].astype(np.float16))
        assert store.array_attrs("features/resnet50_trunc")["tool"] == "clam"


def test_stamp_coordinates_in_microns_land_on_the_level0_grid(cohort, tmp_path):
    manifest, grids = cohort
    tiles = tmp_path / "tiles"
    import_features(_write_trident_folder(tmp_path / "features_uni_v1", grids), manifest, tiles, progress=False)
    for slide_id, (coords, features) in grids.items():
        write_stamp(tmp_path / "stamp", slide_id, coords * MPP, features * 2, tile_size_um=PATCH_L0 * MPP,
                    tile_size_px=32, extractor="virchow2")
    results = import_features(tmp_path / "stamp", manifest, tiles, progress=False)
    # the same grid as TRIDENT's once µm became pixels
    assert {(r.status, r.extra["store_created"]) for r in results} == {("done", False)}
    slide_id, (coords, features) = next(iter(grids.items()))
    store = TileStore.open(tiles / f"{slide_id}.zarr")
    np.testing.assert_array_equal(_stored(store, "virchow2", coords, features),
                                  (features * 2).astype(np.float16))


def test_a_rerun_reuses_and_a_replaced_file_is_refused_unless_overwritten(cohort, tmp_path):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "features_uni_v1", grids)
    tiles = tmp_path / "tiles"
    import_features(folder, manifest, tiles, progress=False)
    assert {r.status for r in import_features(folder, manifest, tiles, progress=False)} == {"reused"}
    moved = shutil.copytree(folder, tmp_path / "moved" / folder.name, copy_function=shutil.copy2)
    assert {r.status for r in import_features(moved, manifest, tiles, progress=False)} == {"reused"}
    slide_id, (coords, features) = next(iter(grids.items()))
    write_trident(folder, slide_id, coords, features + 1, patch_size=32, level0_magnification=20,
                  target_magnification=5, dimensions=SIZE)
    with pytest.raises(RefusedError, match="made from other inputs.*--overwrite"):
        import_features(folder, manifest, tiles, progress=False)
    results = {r.slide_id: r.status for r in import_features(folder, manifest, tiles, overwrite=True,
                                                             progress=False)}
    assert results.pop(slide_id) == "done" and set(results.values()) == {"reused"}
    store = TileStore.open(tiles / f"{slide_id}.zarr")
    np.testing.assert_array_equal(_stored(store, "uni_v1", coords, features), (features + 1).astype(np.float16))


@pytest.mark.parametrize("case, message", [
    ("grid", "another patch grid"),
    ("resolution", "another resolution"),
    ("slide", "belongs to another slide file"),
    ("outside", "outside the slide"),
])
def test_files_that_do_not_fit_are_refused_in_one_line_before_anything_is_written(cohort, tmp_path, capsys,
                                                                                   case, message):
    manifest, grids = cohort
    ids = list(grids)
    tiles = tmp_path / "tiles"
    stored = {k: v for k, v in grids.items() if k != ids[2]}  # slide 2 has no store yet
    import_features(_write_trident_folder(tmp_path / "features_uni_v1", stored),
                    _manifest_of(manifest, tmp_path / "stored.csv", stored), tiles, progress=False)
    before = _arrays(tiles)
    folder, used, extra = tmp_path / "other", manifest, []
    for slide_id, (coords, features) in grids.items():
        if case == "grid" and slide_id == ids[-1]:
            coords, features = coords[:-3] + 16, features[:-3]
        if case == "outside" and slide_id == ids[2]:
            coords = coords + SIZE[0]
        write_trident(folder, slide_id, coords, features, patch_size=32, level0_magnification=20,
                      target_magnification=5, dimensions=SIZE, encoder="conch_v15")
    if case == "resolution":  # CLAM at level 0: patches of 128 px at 0.5 µm/px, not 32 px at 2 µm/px
        coords, features = grids[ids[-1]]
        write_clam(tmp_path / "clam", tmp_path / "patches", ids[-1], coords, features, patch_size=128,
                   patch_level=0, level_downsample=1.0, level_dim=SIZE)
        shutil.copy(tmp_path / "clam" / "h5_files" / f"{ids[-1]}.h5", folder / f"{ids[-1]}.h5")
        extra = ["--clam-patches", str(tmp_path / "patches")]
    if case == "slide":  # the manifest's rows of two stored slides name each other's files
        used = _manifest_of(manifest, tmp_path / "swapped.csv", grids, swap=ids[:2])
    code, err = _run(["features", "import", str(folder), "--manifest", str(used), "-o", str(tiles), *extra], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert _arrays(tiles) == before  # nothing written: no new store, no new features


def _manifest_of(manifest: Path, out: Path, grids: dict, swap: list[str] | None = None) -> Path:
    """A manifest of the slides in ``grids`` (absolute paths); ``swap`` exchanges two slides' files."""
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["slide_id"] in grids]
    for r in rows:
        r["slide_path"] = str((manifest.parent / r["slide_path"]).resolve())
    if swap:
        a, b = (next(r for r in rows if r["slide_id"] == s) for s in swap)
        a["slide_path"], b["slide_path"] = b["slide_path"], a["slide_path"]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_bad_feature_folders_are_named_with_the_fix(cohort, tmp_path):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "features_uni_v1", dict(list(grids.items())[:-1]))
    with pytest.raises(BadInputError, match=r"no feature file for 1 slide\(s\)"):
        import_features(folder, manifest, tmp_path / "tiles", progress=False)
    last_id = list(grids)[-1]
    with h5py.File(folder / f"{last_id}.h5", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(BadInputError, match="neither a TRIDENT, a CLAM nor a STAMP"):
        import_features(folder, manifest, tmp_path / "tiles", progress=False)
    (folder / f"{last_id}.h5").write_bytes(b"not hdf5")
    with pytest.raises(BadInputError, match="cannot read as HDF5"):
        import_features(folder, manifest, tmp_path / "tiles", progress=False)
    assert not list((tmp_path / "tiles").glob("*.zarr"))


def test_an_import_refuses_while_another_run_writes_the_stores(cohort, tmp_path):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "features_uni_v1", grids)
    tiles = tmp_path / "tiles"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from ips_path.runtime.locks import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(tiles)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadInputError, match=str(holder.pid)):
            import_features(folder, manifest, tiles, progress=False)
        assert not list(tiles.glob("*.zarr"))
    finally:
        holder.kill()
        holder.wait()


def test_a_slide_without_patches_gets_an_empty_store_and_a_moved_slide_is_still_its_slide(cohort, tmp_path):
    manifest, grids = cohort
    folder = _write_trident_folder(tmp_path / "features_uni_v1", grids)
    empty_id = list(grids)[0]
    # TRIDENT's file for a slide without tissue patches: features of shape (0,)
    write_trident(folder, empty_id, np.empty((0, 2), np.int64), np.empty((0,), np.float32), patch_size=32,
                  level0_magnification=20, target_magnification=5, dimensions=SIZE)
    tiles = tmp_path / "tiles"
    results = {r.slide_id: r for r in import_features(folder, manifest, tiles, progress=False)}
    assert {r.status for r in results.values()} == {"done"}
    empty = TileStore.open(tiles / f"{empty_id}.zarr")
    assert empty.n_patches == 0 and not empty.has_array("features/uni_v1")
    moved = shutil.copytree(manifest.parent, tmp_path / "moved_slides", copy_function=shutil.copy2)
    results = import_features(folder, moved / manifest.name, tiles, progress=False)
    assert {r.status for r in results} == {"reused"}


def test_non_finite_features_fail_that_slide_and_the_others_go_on(cohort, tmp_path):
    manifest, grids = cohort
    bad_id = list(grids)[1]
    coords, features = grids[bad_id]
    folder = _write_trident_folder(tmp_path / "features_uni_v1", grids)
    write_trident(folder, bad_id, coords, np.where(np.arange(len(coords))[:, None] == 3, np.nan, features),
                  patch_size=32, level0_magnification=20, target_magnification=5, dimensions=SIZE)
    results = {r.slide_id: r for r in import_features(folder, manifest, tmp_path / "tiles", progress=False)}
    assert results[bad_id].status == "failed" and "NaN" in results[bad_id].error
    assert not TileStore.open(tmp_path / "tiles" / f"{bad_id}.zarr").has_array("features/uni_v1")
    assert {r.status for s, r in results.items() if s != bad_id} == {"done"}
