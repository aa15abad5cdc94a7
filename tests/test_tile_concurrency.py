"""Two `ipspath tile` runs on one output, and runs killed midway: real processes, held at fault points."""

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
def slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("concurrency")
    return [write_synthetic_slide(folder / f"{name}.svs", 1024, 768, mpp=1.0, downsamples=(1,), seed=seed).path
            for name, seed in (("A", 1), ("B", 2))]


def _start(args: list, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*TILE, *map(str, args)], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and ".partial-" in p.name)


def test_a_second_run_never_removes_the_work_of_a_first_run_held_midway(slides, tmp_path):
    slide_a, slide_b = slides
    out, release = tmp_path / "out", tmp_path / "go"
    first = _start([slide_a, "-o", out], {"IPSPATH_PAUSE_AT": "store.arrays_written",
                                         "IPSPATH_PAUSE_FILE": str(release)})
    try:
        _wait_for(Path(f"{release}.reached"), first)  # A's arrays written, its attrs not yet
        assert _hidden(out)  # its temporary store is there
        second = subprocess.run([*TILE, slide_a, slide_b, "-o", out], capture_output=True, text=True, timeout=300)
        assert second.returncode == 1  # B tiled, A left to the first run
        assert "A.zarr: in use by another ipspath run, pid" in second.stderr and "Traceback" not in second.stderr
        assert _hidden(out)  # the second run did not clean away the first run's work
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    for slide in slides:
        assert TileStore.open(out / f"{slide.stem}.zarr", slide_id=slide.stem, slide_path=slide).n_patches > 0
    with (out / "tiling_summary.csv").open() as f:
        assert {row["slide_id"]: row["status"] for row in csv.DictReader(f)} == {"A": "tiled", "B": "tiled"}
    assert _hidden(out) == []


@pytest.mark.parametrize("moment", ["store.arrays_written", "store.old_moved_aside"])
def test_leftovers_of_a_run_killed_midway_are_cleaned_by_the_next_run(slides, tmp_path, moment):
    slide_a, slide_b = slides
    out = tmp_path / "out"
    assert subprocess.run([*TILE, slide_a, "-o", out], capture_output=True, timeout=300).returncode == 0
    killed = _start([slide_a, "-o", out, "--overwrite"], {"IPSPATH_KILL_AT": moment})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    left = _hidden(out)
    assert left and (moment != "store.old_moved_aside" or any(name.endswith("-old") for name in left))
    # the next run, even one for another slide, removes what the dead run left
    done = subprocess.run([*TILE, slide_b, "-o", out], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _hidden(out) == []
    done = subprocess.run([*TILE, slide_a, "-o", out], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert TileStore.open(out / "A.zarr", slide_id="A", slide_path=slide_a).n_patches > 0


def test_tile_outcomes_follow_the_job_contract():
    from ips_path.runtime.jobs import Status
    from ips_path.tiling.run import TileResult, exit_code

    done, reused = TileResult("a", "a.svs", "tiled", n_patches=3), TileResult("b", "b.svs", "skipped")
    empty, bad = TileResult("c", "c.svs", "no-tissue"), TileResult("d", "d.svs", "failed", error="x", exit_code=2)
    assert [r.as_outcome().status for r in (done, reused, empty, bad)] == [Status.DONE, Status.REUSED, Status.DONE,
                                                                         Status.FAILED]
    assert done.as_outcome().extra["n_patches"] == 3 and empty.as_outcome().extra["tile_status"] == "no-tissue"
    assert exit_code([done, reused, empty]) == 0 and exit_code([bad]) == 2 and exit_code([done, bad]) == 1
