"""A slide tiled again after predict loses its scores: predict redoes it, and review goes on for the others.

Before, predict called the slide "reused" (its done record matched, though the scores it pointed to
were gone), and ``heatmap`` and ``view`` then refused the whole folder for that one slide.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil

import pytest
from tool_manifest import first_slides

from ips_path.cli.main import main
from ips_path.review.view.cohort import open_cohort
from ips_path.stores.tile_store import TileStore


def _ipspath(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, out.getvalue()


def _statuses(pred) -> dict[str, str]:
    with (pred / "predictions.csv").open(newline="") as f:
        return {row["slide_id"]: row["status"] for row in csv.DictReader(f)}


@pytest.fixture()
def predicted(cohort, trained_run, tmp_path):
    """Three slides predicted with heatmaps into ``pred`` from a private copy of their stores."""
    manifest, tiles = cohort
    subset = tmp_path / "three.csv"
    rows = first_slides(manifest, 3, subset)
    own = tmp_path / "tiles"
    for row in rows:
        shutil.copytree(tiles / f"{row['slide_id']}.zarr", own / f"{row['slide_id']}.zarr")
    pred = tmp_path / "pred"
    command = ["-q", "predict", "--model", trained_run, "--manifest", subset, "--tiles", own, "-o", pred, "--device",
               "cpu", "--thumbnail-size", "128", "--top-k", "2"]
    code, output = _ipspath(*command)
    assert code == 0, output
    # `ipspath tile --overwrite` of one slide, with the same parameters: its store loses its scores
    code, output = _ipspath("-q", "tile", rows[0]["slide_path"], "-o", own, "--mpp", "2", "--patch-size", "32",
                            "--overwrite", "--no-qc")
    assert code == 0 and TileStore.open(own / "slide_000.zarr").array_names("scores") == [], output
    return pred, command


def test_heatmap_and_view_review_the_other_slides_when_one_lost_its_scores(predicted, caplog):
    pred, _ = predicted
    code, output = _ipspath("heatmap", "--predictions", pred, "--thumbnail-size", "128", "--top-k", "0")
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("ipspath: error:")]
    assert len(errors) == 1 and "slide_000" in errors[0] and "scores/" in errors[0] and "ipspath predict" in errors[0]
    assert "2 of 3 slides drawn" in output

    with caplog.at_level(logging.WARNING):
        cohort = open_cohort(pred)
    try:
        assert cohort.ids == ["slide_001", "slide_002"]
        assert any("slide_000" in r.getMessage() and "ipspath predict" in r.getMessage() for r in caplog.records)
    finally:
        cohort.close()


def test_predict_redoes_a_slide_whose_scores_are_gone_instead_of_calling_it_reused(predicted):
    pred, command = predicted
    code, output = _ipspath(*command)
    assert code == 0, output
    assert _statuses(pred) == {"slide_000": "done", "slide_001": "reused", "slide_002": "reused"}
    code, output = _ipspath("heatmap", "--predictions", pred, "--thumbnail-size", "128", "--top-k", "0")
    assert code == 0, output
