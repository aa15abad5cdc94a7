"""`tile --workers N` with real processes: workers die with their parent, and a dying worker
costs only its own slide."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import write_synthetic_slide

TILE = [sys.executable, "-m", "ips_path.cli.main", "tile", "--mpp", "2", "--patch-size", "32", "--no-qc"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("workers")
    for seed, name in enumerate("ABCD"):
        write_synthetic_slide(folder / f"{name}.svs", 768, 512, mpp=1.0, downsamples=(1,), seed=seed)
    return folder


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_killing_the_parent_kills_its_workers_before_they_write(slides, tmp_path):
    out, release = tmp_path / "out", tmp_path / "go"
    parent = subprocess.Popen([*TILE, slides, "-o", out, "--workers", "2"],
                              env={**os.environ, "IPSPATH_PAUSE_AT": "store.arrays_written",
                                   "IPSPATH_PAUSE_FILE": str(release)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():  # a worker holds a slide's store half-written
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        workers = _children(parent.pid)
        assert len(workers) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "orphan workers are still running"
            time.sleep(0.05)
    finally:
        release.touch()  # an orphan would now go on and write its store
        parent.kill()
    time.sleep(1.0)
    assert not list(out.glob("*.zarr"))


def test_a_worker_dying_on_one_slide_fails_that_slide_only(slides, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*TILE, slides, "-o", out, "--workers", "2"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "IPSPATH_KILL_AT": "tile.started:C"})
    assert done.returncode == 1, done.stderr
    with (out / "tiling_summary.csv").open() as f:
        status = {row["slide_id"]: row["status"] for row in csv.DictReader(f)}
    assert status.pop("C") == "failed"
    # A slide that finished in the pool C's death broke has its result lost with the pool; it is run again
    # and then finds its own complete store ("skipped"). Either way it is done, never failed.
    assert sorted(status) == ["A", "B", "D"] and set(status.values()) <= {"tiled", "skipped"}
    assert "C.svs: the worker tiling it died" in done.stderr
    for name in "ABD":
        assert TileStore.open(out / f"{name}.zarr").n_patches > 0
    # C's worker died holding C's claim: the next run takes the stale claim over and tiles C
    again = subprocess.run([*TILE, slides, "-o", out, "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert TileStore.open(out / "C.zarr").n_patches > 0
