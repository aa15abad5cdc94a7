"""``--verify full``: an edit of a slide that keeps its size and misses the fingerprint's blocks is found.

The fast default (size and three 64 KiB blocks) cannot see such an edit, so ``tile`` skips the slide
and ``predict`` reuses it; with ``--verify full`` both compare the SHA-256 of the whole file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os

import pytest

from ips_path.cli.main import main
from ips_path.runtime.identity import FINGERPRINT_BLOCK
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import write_synthetic_slide

TILE = ["--mpp", "2", "--patch-size", "32", "--no-qc"]


def _ipspath(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, out.getvalue()


def _edit_outside_the_fingerprint(path, nth: int = 0) -> None:
    """Flip one byte between the first and the middle block: same size, same fingerprint."""
    size = os.path.getsize(path)
    offset = FINGERPRINT_BLOCK + (size // 2 - FINGERPRINT_BLOCK // 2 - FINGERPRINT_BLOCK) // 2 + nth
    assert FINGERPRINT_BLOCK < offset < size // 2 - FINGERPRINT_BLOCK // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    assert os.path.getsize(path) == size


@pytest.fixture()
def slide(tmp_path):
    path = tmp_path / "slides" / "edited.svs"
    path.parent.mkdir()
    write_synthetic_slide(path, 2048, 1536, mpp=1.0, downsamples=(1, 4), seed=3)
    assert os.path.getsize(path) > 4 * FINGERPRINT_BLOCK
    return path


def test_tile_verify_full_tiles_a_slide_edited_in_place_again(slide, tmp_path):
    tiles = tmp_path / "tiles"
    assert "1 tiled" in _ipspath("tile", slide, "-o", tiles, *TILE)[1]
    _edit_outside_the_fingerprint(slide)
    code, output = _ipspath("tile", slide, "-o", tiles, *TILE)
    assert code == 0 and "1 skipped" in output  # the fast default: documented, not seen
    code, output = _ipspath("tile", slide, "-o", tiles, *TILE, "--verify", "full")
    assert code == 0 and "1 tiled" in output, output  # no whole-file hash recorded: tiled again, with it
    assert "sha256" in TileStore.open(tiles / "edited.zarr").attrs["slide_identity"]
    code, output = _ipspath("tile", slide, "-o", tiles, *TILE, "--verify", "full")
    assert code == 0 and "1 skipped" in output, output
    _edit_outside_the_fingerprint(slide, nth=1)
    code, output = _ipspath("tile", slide, "-o", tiles, *TILE, "--verify", "full")
    assert code == 0 and "1 tiled" in output, output


def test_predict_verify_full_does_not_reuse_a_slide_edited_in_place(slide, trained_run, tmp_path):
    pred = tmp_path / "pred"
    command = ["-q", "predict", "--model", trained_run, slide, "-o", pred, "--no-heatmaps", "--device", "cpu"]

    def status() -> str:
        with (pred / "predictions.csv").open(newline="") as f:
            return next(csv.DictReader(f))["status"]

    assert _ipspath(*command)[0] == 0 and status() == "done"
    _edit_outside_the_fingerprint(slide)
    assert _ipspath(*command)[0] == 0 and status() == "reused"  # the fast default
    code, output = _ipspath(*command, "--verify", "full")
    assert code == 0 and status() == "done", output  # verified: store tiled again, slide predicted again
    assert _ipspath(*command, "--verify", "full")[0] == 0 and status() == "reused"
    _edit_outside_the_fingerprint(slide, nth=1)
    code, output = _ipspath(*command, "--verify", "full")
    assert code == 2 and "slide.sha256" in output and "--overwrite" in output, output
