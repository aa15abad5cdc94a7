"""Cached features belong to the patch grid they were computed on: a store tiled again never pairs with them.

Before, ``features`` wrote into whatever store was at the path when it finished (a store re-tiled
meanwhile got rows of the old grid), a rerun said "already there", and ``train --features`` trained on
misaligned rows.
"""

from __future__ import annotations

import shutil

import pytest

import ips_path.stores.features as features_module
from ips_path.cli.main import main
from ips_path.stores.feature_grid import open_features
from ips_path.stores.features import extract_features
from ips_path.stores.tile_store import StoreMismatchError, TileStore, write_tile_store


class _Ran:
    def __init__(self, exit_code: int, output: str):
        self.exit_code, self.output = exit_code, output


def _invoke(*args: str) -> _Ran:
    """``ipspath ARGS`` as typed: its exit code, and what it printed (stdout and stderr)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exited:
        main(list(args))
    return _Ran(exited.value.code, out.getvalue())


def _retile(slide: str, tiles, min_tissue: str = "0.9") -> None:
    """``ipspath tile SLIDE --overwrite`` with another --min-tissue: another grid for the same slide."""
    result = _invoke("-q", "tile", slide, "-o", str(tiles), "--mpp", "2", "--patch-size", "32", "--min-tissue",
                     min_tissue, "--overwrite", "--no-qc")
    assert result.exit_code == 0, result.output


def test_a_store_tiled_again_while_features_run_gets_no_features_of_the_old_grid(cohort, tmp_path, monkeypatch):
    _, tiles = cohort
    shutil.copytree(tiles, tmp_path / "tiles")
    store_path = tmp_path / "tiles" / "slide_000.zarr"
    slide = str(TileStore.open(store_path).slide_path)
    old_rows = TileStore.open(store_path).n_patches
    embed = features_module.embed_store

    def embed_then_retile(encoder, store, streamer):
        embedded = embed(encoder, store, streamer)
        _retile(slide, tmp_path / "tiles")  # `tile --overwrite` finishes while the embeddings are computed
        return embedded

    monkeypatch.setattr(features_module, "embed_store", embed_then_retile)
    outcomes = extract_features([store_path], "smallcnn", chunk_size=64, threads=1, progress=False)
    monkeypatch.undo()
    assert [o.status.value for o in outcomes] == ["failed"]
    assert "tiled again" in outcomes[0].error and "nothing was written" in outcomes[0].error
    retiled = TileStore.open(store_path)
    assert retiled.n_patches != old_rows and not retiled.has_array("features/smallcnn")
    # the rerun computes them on the store's grid
    result = _invoke("features", str(store_path), "--encoder", "smallcnn", "--device", "cpu")
    assert result.exit_code == 0 and "1 extracted" in result.output, result.output
    assert open_features(TileStore.open(store_path), "smallcnn").shape[0] == retiled.n_patches


def test_features_of_an_older_grid_are_refused_by_train_and_predict_and_computed_again(cohort, tmp_path):
    manifest, tiles = cohort
    tiles = shutil.copytree(tiles, tmp_path / "tiles")
    assert _invoke("-q", "features", str(tiles), "--encoder", "smallcnn", "--device", "cpu").exit_code == 0
    store_path = tiles / "slide_000.zarr"
    slide = str(TileStore.open(store_path).slide_path)
    run = tmp_path / "run"
    train = ["-q", "train", "--manifest", str(manifest), "--tiles", str(tiles), "--features", "smallcnn", "--epochs",
             "1", "--dim", "32", "--heads", "2", "--n-select", "8", "--batch-size", "4", "--device", "cpu"]
    assert _invoke(*train, "-o", str(run)).exit_code == 0
    # what the race left before: the store tiled again, the old grid's features in it
    old_features = tmp_path / "old_features"
    shutil.copytree(store_path / "features", old_features)
    _retile(slide, tiles)
    shutil.rmtree(store_path / "features", ignore_errors=True)
    shutil.copytree(old_features, store_path / "features")
    assert TileStore.open(store_path).n_patches < TileStore.open(store_path).open_array("features/smallcnn").shape[0]

    result = _invoke(*train, "-o", str(tmp_path / "run2"))
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert str(store_path) in line and "another patch grid" in line and "ipspath features" in line, result.output

    result = _invoke("-q", "predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles),
                     "-o", str(tmp_path / "pred"), "--no-heatmaps", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "slide_000" in result.output and "another patch grid" in result.output and "ipspath features" in \
        result.output

    # a rerun of features does not call them "already there": it computes them on the store's grid
    result = _invoke("features", str(tiles), "--encoder", "smallcnn", "--device", "cpu")
    assert result.exit_code == 0 and "1 extracted, 7 already there" in result.output, result.output
    assert _invoke(*train, "-o", str(tmp_path / "run3")).exit_code == 0


def test_features_at_the_same_count_but_other_coordinates_are_refused(cohort, tmp_path):
    _, tiles = cohort
    tiles = shutil.copytree(tiles, tmp_path / "tiles")
    store_path = tiles / "slide_000.zarr"
    assert _invoke("-q", "features", str(store_path), "--encoder", "smallcnn", "--device", "cpu").exit_code == 0
    store = TileStore.open(store_path)
    # another grid of as many patches: the same store with its patches shifted by one patch
    mask, mask_mpp = store.mask()
    attrs = {k: v for k, v in store.attrs.items() if k not in ("complete", "n_patches")}
    saved = shutil.copytree(store_path / "features", tmp_path / "saved")
    write_tile_store(store_path, store.coords + store.stride_level0, store.tissue_fraction, mask, mask_mpp, attrs,
                     mask_downsample=store.mask_downsample())
    shutil.copytree(saved, store_path / "features")
    moved = TileStore.open(store_path)
    assert moved.n_patches == store.n_patches
    with pytest.raises(StoreMismatchError, match="other coordinates"):
        open_features(moved, "smallcnn")
