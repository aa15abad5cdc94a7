"""Named fault points, so tests can kill or hold a run between two of its writes.

Production code marks the moments that matter for crash-safety with :func:`fault_point`
("train.best_written", "tile.store_renamed", ...). Unless a test set the variables below, a
fault point costs one dictionary lookup and does nothing.

``IPSPATH_KILL_AT=name[#k]``
    The process kills itself with SIGKILL (as ``kill -9`` would) when it reaches ``name`` for the
    k-th time (default: the first). Several points may be given, separated by commas.
``IPSPATH_PAUSE_AT=name`` and ``IPSPATH_PAUSE_FILE=path``
    On reaching ``name`` the process creates ``path + ".reached"`` and waits until ``path``
    exists, so a test can run a second process at exactly that moment, then release the first.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

__all__ = ["fault_point"]

_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill or pause the process here if a test asked for it (see the module docstring)."""
    kill_at = os.environ.get("IPSPATH_KILL_AT")
    pause_at = os.environ.get("IPSPATH_PAUSE_AT")
    if not kill_at and not pause_at:
        return
    _reached[name] += 1
    if kill_at:
        for point in kill_at.split(","):
            target, _, count = point.strip().partition("#")
            if target == name and _reached[name] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)
    if pause_at == name:
        release = Path(os.environ["IPSPATH_PAUSE_FILE"])
        Path(f"{release}.reached").touch()
        while not release.exists():
            time.sleep(0.02)
