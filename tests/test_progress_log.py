"""Progress outside a terminal (SLURM, nohup, a pipe): a periodic log line with counts, rate and ETA."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ips_path.cli.main import cli

# the CLI as the ``ipspath`` script runs it, with this interpreter
IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]
# every update writes a line, so that a few small slides show what a long run shows every 30 s
EVERY_UPDATE = {"IPSPATH_PROGRESS_S": "0"}


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ips_path.runtime.progress"]


def test_tile_under_a_batch_system_writes_progress_lines_to_stderr(cohort, tmp_path):
    manifest, _ = cohort
    done = subprocess.run([*IPSPATH, "tile", "--manifest", str(manifest), "-o", str(tmp_path), "--mpp", "2",
                           "--patch-size", "32", "--no-qc"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env={**os.environ, **EVERY_UPDATE}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("INFO: tiling:")]
    assert re.fullmatch(r"INFO: tiling: 1/8 slides \(12%\), [\d.]+ slides/s, ETA \d+s", lines[0]), lines
    assert re.fullmatch(r"INFO: tiling: 8/8 slides \(100%\), [\d.]+ slides/s, done in \d+s", lines[-1]), lines


def test_features_and_training_epochs_count_patches(cohort, tmp_path, caplog, monkeypatch):
    manifest, tiles = cohort
    shutil.copytree(tiles, tmp_path / "tiles")
    monkeypatch.setenv("IPSPATH_PROGRESS_S", "0")
    caplog.set_level(logging.INFO, logger="ips_path.runtime.progress")
    result = CliRunner().invoke(cli, ["features", str(tmp_path / "tiles"), "--encoder", "stain_density"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = _progress_lines(caplog)
    total = re.match(r"features: \d+/(\d+) patches", lines[0]).group(1)
    assert int(total) > 8  # patches, not slides
    assert any(re.fullmatch(rf"features: \d+/{total} patches \(\d+%\), slides 1/8, [\d.,]+ patches/s, ETA \d+s", line)
               for line in lines), lines
    assert re.fullmatch(rf"features: {total}/{total} patches \(100%\), slides 8/8, [\d.,]+ patches/s, done in \d+s",
                        lines[-1]), lines

    caplog.clear()
    result = CliRunner().invoke(cli, ["train", "--manifest", str(manifest), "--tiles", str(tmp_path / "tiles"),
                                      "-o", str(tmp_path / "run"), "--features", "stain_density", "--epochs", "2",
                                      "--n-select", "4", "--batch-size", "2", "--dim", "16", "--heads", "2",
                                      "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = _progress_lines(caplog)
    for epoch in (1, 2):
        ends = [line for line in lines if line.startswith(f"epoch {epoch}/2: ") and "done in" in line]
        assert len(ends) == 1 and re.search(r"\d+/\d+ patches \(100%\), slides (\d+)/\1, loss [\d.]+", ends[0]), lines
    assert any("ETA" in line for line in lines)


def test_quiet_writes_no_progress_lines(cohort, tmp_path, caplog, monkeypatch):
    manifest, _ = cohort
    monkeypatch.setenv("IPSPATH_PROGRESS_S", "0")
    caplog.set_level(logging.INFO, logger="ips_path.runtime.progress")
    result = CliRunner().invoke(cli, ["-q", "tile", "--manifest", str(manifest), "-o", str(tmp_path), "--mpp", "2",
                                      "--patch-size", "32", "--no-qc"], catch_exceptions=False)
    assert result.exit_code == 0 and _progress_lines(caplog) == []


@pytest.mark.slow
def test_predict_and_heatmap_write_progress_lines(cohort, trained_run, tmp_path, caplog, monkeypatch):
    manifest, _ = cohort
    monkeypatch.setenv("IPSPATH_PROGRESS_S", "0")
    caplog.set_level(logging.INFO, logger="ips_path.runtime.progress")
    result = CliRunner().invoke(cli, ["predict", "--model", str(trained_run), "--manifest", str(manifest), "-o",
                                      str(tmp_path / "pred"), "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert any(re.fullmatch(r"predict: 8/8 slides \(100%\), [\d.]+ slides/s, done in \d+s", line)
               for line in _progress_lines(caplog))
    caplog.clear()
    result = CliRunner().invoke(cli, ["heatmap", "--predictions", str(tmp_path / "pred"), "-o", str(tmp_path / "h"),
                                      "--thumbnail-size", "128", "--top-k", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert any(re.match(r"heatmaps: 1/8 slides \(12%\), .*ETA", line) for line in _progress_lines(caplog))
