"""What ``ipspath`` logs: its own lines at the level asked, other libraries only from WARNING unless asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*IPSPATH, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_debug_keeps_the_debug_lines_of_other_libraries_out_unless_asked(cohort, tmp_path):
    manifest, _ = cohort
    done = _run("--debug", "tile", "--manifest", manifest, "-o", tmp_path / "tiles", "--mpp", "2", "--patch-size", "32")
    assert done.returncode == 0, done.stderr
    debug = [line for line in done.stderr.splitlines() if line.startswith("DEBUG:")]
    assert not [line for line in debug if "Registering codec" in line or "Zarr event loop" in line], debug[:5]
    asked = _run("--debug-all", "tile", "--manifest", manifest, "-o", tmp_path / "tiles2", "--mpp", "2",
                 "--patch-size", "32")
    assert asked.returncode == 0 and "DEBUG: Registering codec" in asked.stderr  # asked for: there they are


@pytest.mark.slow
def test_survival_training_prints_no_info_line_of_numexpr(cohort, tmp_path):
    pytest.importorskip("sksurv", reason="survival training needs the survival extra (scikit-survival)")
    from tests.test_survival_train import FAST_OPTIONS, survival_manifest  # that module skips without sksurv

    manifest, tiles = cohort
    done = _run("train", "--manifest", survival_manifest(manifest, tmp_path / "m.csv"), "--tiles", tiles,
                "-o", tmp_path / "run", "--task", "survival", "--epochs", "1", *FAST_OPTIONS)
    assert done.returncode == 0, done.stderr
    assert "NumExpr" not in done.stderr, done.stderr
