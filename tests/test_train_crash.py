"""A training run killed (kill -9) between any two writes of an epoch resumes to the uninterrupted result.

Each case runs the real ``ipspath train`` in a subprocess on the generated cohort, kills it at a named
fault point (:mod:`ips_path.runtime.faults`), then resumes it with ``--resume`` and compares weights, the best
model and the metrics with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ips_path.config import TrainConfig
from ips_path.runtime.locks import LOCK_NAME
from ips_path.training.checkpoint import load_checkpoint
from ips_path.training.train import train

OPTIONS = ["--epochs", "2", "--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size",
           "2", "--threads", "2", "--warmup-epochs", "1", "--device", "cpu", "--seed", "7"]
TIMING_COLUMNS = ("train_seconds", "elapsed_seconds", "slides_per_s", "patches_per_s", "peak_memory_mb")


def _train(manifest: Path, tiles: Path, run: Path, *extra: str, env: dict[str, str] | None = None,
           wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "ips_path.cli.main", "-q", "train", "--manifest", str(manifest), "--tiles",
               str(tiles), "-o", str(run), *OPTIONS, *extra]
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=600)


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("last.pt", "best.pt"):
        got, want = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert (got["epoch"], got["status"]) == (want["epoch"], want["status"]), name
        assert got["early_stopping"] == want["early_stopping"], name
        for key, value in want["model"].items():
            assert torch.equal(got["model"][key], value), f"{name}: {key}"
    assert _metrics(run) == _metrics(reference)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in run.iterdir() if ".partial-" in p.name or p.name == LOCK_NAME]


@pytest.fixture(scope="module")
def reference_run(cohort, tmp_path_factory) -> Path:
    manifest, tiles = cohort
    run = tmp_path_factory.mktemp("reference") / "run"
    done = _train(manifest, tiles, run)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("kill_at", [
    "train.best_written#1",  # best.pt of epoch 1 written, last.pt still at epoch 0
    pytest.param("train.started", marks=pytest.mark.slow),  # after the first last.pt (epoch 0)
    pytest.param("train.metrics_written#2", marks=pytest.mark.slow),  # epoch 2's row written, its checkpoints not
    pytest.param("train.curves_written#2", marks=pytest.mark.slow),
    pytest.param("train.last_written#1", marks=pytest.mark.slow),
])
def test_kill_between_two_writes_then_resume_equals_an_uninterrupted_run(kill_at, cohort, reference_run, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "run"
    killed = _train(manifest, tiles, run, env={"IPSPATH_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / LOCK_NAME).is_file()  # a dead run's lock: the resume must take it over
    # A dead run's half-written file (as a kill during torch.save leaves it) is cleaned up.
    (run / ".last.pt.partial-0123456789abcdef").write_bytes(b"half a checkpoint")

    resumed = _train(manifest, tiles, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "train: completed after 2 epoch(s)" in resumed.stdout
    _assert_same_run(run, reference_run)


def test_resume_rebuilds_the_best_model_metrics_and_curves_that_last_pt_claims(reference_run, cohort, tmp_path):
    # As a run killed under the earlier order (last.pt before best.pt, then metrics) left it: last.pt
    # names its own epoch the best, but best.pt, the metrics row and the curves are missing.
    manifest, tiles = cohort
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    last = load_checkpoint(run / "last.pt")
    last["early_stopping"]["best_epoch"] = last["epoch"]
    torch.save(last, run / "last.pt")
    for name in ("best.pt", "metrics.csv", "curves.png"):
        (run / name).unlink()

    config = TrainConfig.from_dict({**last["config"], "device": "cpu"})
    result = train(manifest, tiles, run, config, resume=True, progress=False)
    assert result.status == "completed"
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == last["epoch"]
    for key, value in last["model"].items():
        assert torch.equal(best["model"][key], value), key
    assert _metrics(run) == _metrics(reference_run)
    assert (run / "curves.png").is_file()


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(cohort, tmp_path):
    manifest, tiles = cohort
    run, release = tmp_path / "run", tmp_path / "release"
    first = _train(manifest, tiles, run, "--epochs", "1",
                   env={"IPSPATH_PAUSE_AT": "train.started", "IPSPATH_PAUSE_FILE": str(release)}, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not Path(f"{release}.reached").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = _train(manifest, tiles, run, "--resume")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another ipspath run, pid {first.pid} on host" in lines[0], lines
        release.touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
