"""tile, features and predict on a real Dask LocalCluster (processes): same outputs as the local path."""

from __future__ import annotations

import csv
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.stores.tile_store import TileStore

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "tiling_summary.csv").open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def _invoke(*args: str):
    result = CliRunner().invoke(cli, ["-q", *args], standalone_mode=False)
    assert result.exception is None, result.output
    return result


def test_tile_features_and_predict_through_a_scheduler_match_the_local_path(cohort, tmp_path):
    manifest, _ = cohort
    tile_args = ["--manifest", str(manifest), "--mpp", "2", "--patch-size", "32", "--no-qc"]
    _invoke("tile", *tile_args, "-o", str(tmp_path / "local"), "--workers", "2")
    _invoke("tile", *tile_args, "-o", str(tmp_path / "dask"), "--scheduler", "local:2")
    local, dask = _summary(tmp_path / "local"), _summary(tmp_path / "dask")
    assert local.keys() == dask.keys()
    for slide_id in local:
        assert local[slide_id]["status"] == dask[slide_id]["status"] == "tiled"
        a, b = (TileStore.open(tmp_path / kind / f"{slide_id}.zarr") for kind in ("local", "dask"))
        assert np.array_equal(a.coords, b.coords) and np.array_equal(a.tissue_fraction, b.tissue_fraction)

    _invoke("features", str(tmp_path / "local"), "--encoder", "smallcnn", "--device", "cpu")
    _invoke("features", str(tmp_path / "dask"), "--encoder", "smallcnn", "--device", "cpu", "--scheduler", "local:2")
    for slide_id in local:
        a, b = (TileStore.open(tmp_path / kind / f"{slide_id}.zarr").read_array("features/smallcnn")
                for kind in ("local", "dask"))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_predict_through_a_scheduler_matches_the_local_path(cohort, trained_run, tmp_path):
    manifest, tiles = cohort
    for kind, extra in (("local", []), ("dask", ["--scheduler", "local:2"])):
        shutil.copytree(tiles, tmp_path / f"tiles_{kind}")
        _invoke("predict", "--model", str(trained_run), "--manifest", str(manifest), "--tiles",
                str(tmp_path / f"tiles_{kind}"), "-o", str(tmp_path / kind), "--no-heatmaps", "--device", "cpu",
                *extra)
    rows = {}
    for kind in ("local", "dask"):
        with (tmp_path / kind / "predictions.csv").open(newline="") as f:
            rows[kind] = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows["local"]] == [r["slide_id"] for r in rows["dask"]]
    for a, b in zip(rows["local"], rows["dask"], strict=True):
        assert a["status"] == b["status"] == "done" and a["predicted"] == b["predicted"]
        assert float(a["prob_positive"]) == pytest.approx(float(b["prob_positive"]), abs=1e-4)


def test_a_worker_killed_while_tiling_loses_and_duplicates_no_slide(tmp_path):
    from ips_path.synthetic.synth import write_synthetic_cohort
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    write_synthetic_cohort(tmp_path / "slides", 12, size=(3072, 2304), mpp=0.5, downsamples=(1, 4), seed=2)
    inputs = collect_inputs([], tmp_path / "slides" / "manifest.csv")
    out = tmp_path / "tiles"
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(tile_slides(
        inputs, out, TilingParams(target_mpp=0.5, patch_size=64), scheduler="local:2", progress=False)))
    worker.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and worker.is_alive():
        if any(out.glob("*.zarr")):  # work is under way: terminate one worker process
            candidates = [p for p in psutil.Process().children(recursive=True)
                          if "distributed" in " ".join(p.cmdline()) or p.name().startswith("python")]
            workers = [p for p in candidates if not p.children()]
            if workers:
                killed = workers[0].pid
                workers[0].kill()
        time.sleep(0.02)
    worker.join(timeout=300)
    assert killed is not None, "no worker process was found to kill"
    assert sorted(r.slide_id for r in results) == sorted(i.slide_id for i in inputs)
    assert all(r.status in ("tiled", "skipped") for r in results), [r.error for r in results]
    assert sorted(_summary(out)) == sorted(i.slide_id for i in inputs)  # one row per slide
    for item in inputs:
        assert TileStore.open(out / f"{item.slide_id}.zarr").n_patches > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written store left


def test_an_unreachable_scheduler_is_one_clear_line(tmp_path, cohort):
    manifest, _ = cohort
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["tile", "--manifest", str(manifest), "-o", str(tmp_path / "t"),
                                      "--scheduler", "tcp://127.0.0.1:9"], standalone_mode=False)
    assert "no Dask scheduler answered" in str(result.exception)
    assert time.monotonic() - started < 20
    assert not list((tmp_path / "t").glob("*.zarr"))
