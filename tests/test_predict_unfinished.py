"""predict refuses a training run that has not finished an epoch, and a cross-validation with unfinished folds.

Before, a run killed before its first epoch was predicted from its untrained ``last.pt``, and a
``--folds 3`` run killed as fold 1 started from fold 0's ``best.pt``, fold 1's untrained ``last.pt``
and no fold 2, all with exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]  # `ipspath`, with this checkout's interpreter
TRAIN = ["--epochs", "1", "--dim", "32", "--heads", "2", "--n-select", "8", "--batch-size", "4", "--chunk-size",
         "32", "--threads", "1", "--device", "cpu", "--no-augment"]


def _ipspath(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"IPSPATH_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([*IPSPATH, "-q", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _predict(run: Path, manifest: Path, tiles: Path, out: Path) -> subprocess.CompletedProcess:
    return _ipspath("predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(out),
                    "--no-heatmaps", "--device", "cpu")


def test_a_run_killed_before_its_first_epoch_is_not_predicted(cohort, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "run"
    killed = _ipspath("train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), *TRAIN,
                      kill_at="train.started")
    assert killed.returncode == -signal.SIGKILL and (run / "last.pt").is_file(), killed.stderr
    result = _predict(run, manifest, tiles, tmp_path / "pred")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "last.pt" in line and "no epoch" in line and "--resume" in line, result.stderr
    assert not (tmp_path / "pred" / "predictions.csv").exists()


@pytest.mark.slow  # trains a fold
def test_a_cross_validation_killed_as_fold_1_started_is_not_predicted(cohort, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "cv"
    killed = _ipspath("train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--folds", "3",
                      *TRAIN, kill_at="train.started#2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "fold_0" / "best.pt").is_file() and (run / "fold_1" / "last.pt").is_file()
    assert not (run / "fold_2").exists()
    result = _predict(run, manifest, tiles, tmp_path / "pred")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "(2 of its 3 folds" in line and "fold_1 (stopped after epoch 0 of 1)" in line, line
    assert "fold_2 (not started)" in line and "--folds 3 --resume" in line, line
    assert not (tmp_path / "pred" / "predictions.csv").exists()
