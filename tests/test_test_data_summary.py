"""A clone without the shared test data says in the pytest summary what it skipped and how to point at it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_summary_names_the_missing_folders_and_ipspath_test_data(tmp_path):
    missing = tmp_path / "no-data"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
         "tests/test_slide.py", "-k", "shared_slide_opens or bad_file_fails"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "IPSPATH_TEST_DATA": str(missing)})
    assert done.returncode == 0, done.stdout[-2000:]
    out = done.stdout
    assert "tests skipped for want of test data" in out
    assert f"need {missing / 'slides'}: real slide files" in out and f"need {missing / 'bad'}: broken slide" in out
    assert "IPSPATH_TEST_DATA=/path/to/data" in out
    skipped = sum(int(line.split()[0]) for line in out.splitlines() if line.strip().split(" need ")[0].isdigit()
                  and " need " in line)
    assert f"{skipped} tests did not run" in out and skipped > 10
