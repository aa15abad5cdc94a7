"""Fault points kill or hold a real process only when a test asks for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SCRIPT = (
    "from ips_path.runtime.faults import fault_point\n"
    "for i in range(3):\n    fault_point('step')\n    print(i, flush=True)\n"
)


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def test_without_variables_a_fault_point_does_nothing():
    done = run({})
    assert done.returncode == 0 and done.stdout.split() == ["0", "1", "2"]


def test_kill_at_the_kth_visit_kills_with_sigkill_there():
    done = run({"IPSPATH_KILL_AT": "other, step#2"})
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0"]


def test_pause_holds_the_process_until_released(tmp_path):
    release = tmp_path / "go"
    env = {**os.environ, "IPSPATH_PAUSE_AT": "step", "IPSPATH_PAUSE_FILE": str(release)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "go.reached").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        assert proc.poll() is None
        release.touch()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.split() == ["0", "1", "2"]
