"""bench/gpu_check.py at toy sizes on the CPU: every step runs and passes, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_passes_every_step_at_toy_sizes_on_the_cpu(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke"],
                               capture_output=True, text=True, timeout=1800, check=False,
                               env={**os.environ, "IPSPATH_BENCH_RESULTS": str(tmp_path)})
    result = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert (tmp_path / "gpu_check_memory_n_smoke.json").is_file()
    failed = {name: step for name, step in result["steps"].items() if step["status"] != "passed"}
    assert not failed, json.dumps(failed, indent=1)[:3000]
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert set(result["steps"]) >= {"loader", "selection", "train_step", "cli", "memory_features", "memory_pixels",
                                    "scoring", "mnist"}
