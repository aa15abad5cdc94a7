"""The README's first path runs as written, on a machine with no model weights."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_path() -> list[str]:
    """The commands of the fenced block after the README's ``first-path`` marker, comments dropped."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- first-path[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its first-path block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_first_path_names_only_commands_that_need_no_weights():
    commands = _first_path()
    assert commands[0].startswith("ipspath synth") and any(c.startswith("ipspath predict") for c in commands)
    assert not [c for c in commands if "--pretrained" in c or not c.startswith("ipspath ")]


@pytest.mark.slow
def test_the_first_path_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in _first_path():
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert (tmp_path / "pred" / "report.html").is_file()
    with (tmp_path / "pred" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["done"] * 8  # the new slides, tiled and featured by predict
