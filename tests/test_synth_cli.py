"""``ipspath synth``: the cohort generator as a command, for users who want to try options."""

from __future__ import annotations

import csv
import subprocess
import sys

from ips_path.slides.slide import Slide

IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]


def _run(*args):
    return subprocess.run([*IPSPATH, "synth", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_synth_writes_a_cohort_that_opens_and_a_manifest(tmp_path):
    out = tmp_path / "cohort"
    done = _run("-o", out, "-n", "4", "--width", "512", "--height", "384", "--levels", "1,4", "--format", "tiff",
                "--positive-fraction", "0.5", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote 4 slides (2 positive)" in done.stderr and "ipspath tile --manifest" in done.stderr
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["slide_000", "slide_001", "slide_002", "slide_003"]
    assert sorted(r["label"] for r in rows) == ["negative", "negative", "positive", "positive"]
    for row in rows:
        with Slide(out / row["slide_path"]) as slide:
            assert slide.dimensions == (512, 384) and len(slide.level_dimensions) == 2
            assert slide.level0_mpp == (0.5, 0.5)
    # a second run into the same folder is refused in one line, and the cohort is kept
    again = _run("-o", out, "-n", "2")
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr


def test_synth_refuses_bad_options_before_writing_anything(tmp_path):
    for args, message in ((["--lesions", "3", "1"], "--lesions 3 1"), (["--levels", "1,3"], "--levels"),
                          (["--positive-fraction", "2"], "--positive-fraction")):
        done = _run("-o", tmp_path / "out", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_synth_help_explains_the_options():
    done = subprocess.run([*IPSPATH, "synth", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--slides", "--positive-fraction", "--lesions", "--lesion-diameter", "--nucleus-scale",
                   "--lookalikes", "--stain-shift", "--mpp", "--levels", "--seed"):
        assert option in done.stdout
    assert "ipspath tile --manifest OUT/manifest.csv" in done.stdout
