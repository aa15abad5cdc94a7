"""The thread policy: torch gets every core but one, unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ips_path.runtime.threads import compute_threads

# `ipspath features` on 2 cores (as on a laptop, or a 2-core job), then how many threads torch ran on.
SCRIPT = """
import json, os, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
import torch
from ips_path.cli.main import main
try:
    main(["-q", "features", sys.argv[1], "--encoder", "stain_density", "--device", "cpu"])
except SystemExit as done:
    print(json.dumps({"code": done.code, "torch_threads": torch.get_num_threads()}))
"""


def _features_run(tiles, env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiles)], capture_output=True, text=True, timeout=300,
                          env={**env, **env_extra})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores and CPU affinity (Linux)")
def test_on_two_cores_torch_runs_one_thread_beside_the_readers_and_omp_num_threads_wins(cohort, tmp_path):
    tiles = shutil.copytree(cohort[1], tmp_path / "tiles")
    # torch's default took both cores beside 2 reader threads: 3-5x slower training on a busy machine
    assert _features_run(tiles, {}) == {"code": 0, "torch_threads": 1}
    assert _features_run(tiles, {"OMP_NUM_THREADS": "2"}) == {"code": 0, "torch_threads": 2}  # the user's choice


def test_the_policy_leaves_one_core_beside_torch_and_torch_at_least_one():
    assert [compute_threads(cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]
