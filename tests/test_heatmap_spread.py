"""Flat attention must look flat: the spread beside every colour bar, and a weight scale shared by all slides."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ips_path.cli.main import cli
from ips_path.review.heatmap import attention_spread, colormap_lut
from ips_path.review.view.cohort import open_cohort
from ips_path.review.view.server import ViewerApp
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide

PATCH = 128
LUT = colormap_lut("viridis").astype(int)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory) -> Path:
    """A prediction folder of two slides: "flat" (logits -0.10 .. 0.01, as on a real slide) and "peaked"
    (two patches far above the rest)."""
    root = tmp_path_factory.mktemp("spread")
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[-1:1:12j, -1:1:16j]
    for slide_id in ("flat", "peaked"):
        spec = write_synthetic_slide(root / f"{slide_id}.svs", 1024, 768, mpp=0.5, downsamples=(1,), seed=3,
                                     tissue=rows**2 + cols**2 < 0.8)
        grid = np.stack(np.meshgrid(np.arange(0, 1024, PATCH), np.arange(0, 768, PATCH)), -1).reshape(-1, 2)
        coords = grid[[spec.tissue_fraction(x, y, PATCH, PATCH) >= 0.5 for x, y in grid]]
        store = write_tile_store(
            root / "tiles" / f"{slide_id}.zarr", coords, np.ones(len(coords), np.float32), spec.tissue_mask,
            spec.mask_mpp, {"slide_path": str(spec.path), "slide_id": slide_id, "level0_mpp": [0.5, 0.5],
                            "target_mpp": 0.5, "patch_size": PATCH, "patch_size_level0": PATCH,
                            "stride_level0": PATCH, "read_level": 0, "read_size": PATCH,
                            "slide_dimensions": [1024, 768]})
        if slide_id == "flat":
            scores = rng.uniform(-0.10, 0.01, store.n_patches)
        else:
            scores = rng.normal(size=store.n_patches)
            scores[[store.n_patches // 2, store.n_patches // 2 + 1]] = 12.0
        store.write_array("scores/run1", scores.astype(np.float32))
    pred = root / "pred"
    pred.mkdir()
    (pred / "run.json").write_text(json.dumps({"run": "run1", "tiles": str(root / "tiles")}))
    with open(pred / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "predicted", "status"])
        writer.writerows([["flat", "", "positive", "done"], ["peaked", "", "positive", "done"]])
    return pred


def _heatmaps(pred: Path, out: Path, *options: str) -> None:
    result = CliRunner().invoke(cli, ["heatmap", "--predictions", str(pred), "-o", str(out), "--thumbnail-size",
                                      "512", "--top-k", "0", "--no-geojson", "--alpha", "1", *options],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _patch_colours(pred: Path, out: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The colour value (0-255, nearest colormap entry) at each patch centre of overlay.png, and the scores,
    of the patches the legend does not cover."""
    store = TileStore.open(pred.parent / "tiles" / f"{slide_id}.zarr")
    overlay = np.asarray(Image.open(out / slide_id / "overlay.png")).astype(int)
    centres = ((store.coords + PATCH / 2) * overlay.shape[1] / 1024).astype(int)
    pixels = overlay[centres[:, 1], centres[:, 0]]
    distance = np.abs(pixels[:, None, :] - LUT[None]).sum(-1)
    seen = distance.min(1) <= 6  # opaque colours (--alpha 1): exactly a colormap entry, unless under the legend
    assert seen.mean() > 0.8
    return distance.argmin(1)[seen], store.read_array("scores/run1")[seen]


def test_the_legend_states_the_spread_and_flat_attention_is_flagged(two_slides, tmp_path):
    _heatmaps(two_slides, tmp_path)
    flat = json.loads((tmp_path / "flat" / "attention.json").read_text())
    assert flat["scale"] == "rank" and flat["title"] == "attention: rank in slide"
    assert flat["spread"]["flat"] and flat["spread"]["effective_share"] > 0.99
    assert flat["spread"]["text"].startswith("logits -0.") and "nearly flat" in flat["spread"]["text"]
    peaked = json.loads((tmp_path / "peaked" / "attention.json").read_text())
    assert not peaked["spread"]["flat"] and peaked["spread"]["effective_share"] < 0.1
    assert "nearly flat" not in peaked["spread"]["text"]
    # ranks use the whole colour range even on the flat slide: what the legend's spread is there for
    values, _ = _patch_colours(two_slides, tmp_path, "flat")
    assert values.min() < 30 and values.max() > 225


def test_the_weight_scale_is_shared_by_all_slides(two_slides, tmp_path):
    _heatmaps(two_slides, tmp_path / "rank")
    _heatmaps(two_slides, tmp_path / "weight", "--scale", "weight")
    shown = json.loads((tmp_path / "weight" / "flat" / "attention.json").read_text())
    assert shown["scale"] == "weight" and (shown["low"], shown["mid"], shown["high"]) == ("1/8x", "1x", "8x")
    flat, flat_scores = _patch_colours(two_slides, tmp_path / "weight", "flat")
    peaked, peaked_scores = _patch_colours(two_slides, tmp_path / "weight", "peaked")
    assert np.ptp(flat) <= 8 and abs(np.median(flat) - 128) <= 8  # flat attention: one colour, the middle one
    assert peaked[np.argmax(peaked_scores)] >= 250 and np.median(peaked) < 40  # focus: top colour, the rest low
    # on ranks both slides' most attended patches get the top colour alike
    for slide_id in ("flat", "peaked"):
        values, scores = _patch_colours(two_slides, tmp_path / "rank", slide_id)
        assert values[np.argmax(scores)] >= 250


def test_the_report_shows_the_scale_and_the_spread_beside_the_overlay(two_slides, tmp_path):
    _heatmaps(two_slides, two_slides / "heatmaps")
    result = CliRunner().invoke(cli, ["report", str(two_slides), "-o", str(tmp_path / "report.html")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    flat = attention_spread(TileStore.open(two_slides.parent / "tiles" / "flat.zarr").read_array("scores/run1"))
    assert page.count('<p class="spread flat">') == 1 and page.count('<p class="spread">') == 1
    assert "Colours: attention: rank in slide (lowest \u2013 highest)" in page
    assert flat.describe() in page and "nearly flat" in flat.describe()


def test_the_viewer_gives_the_spread_and_serves_the_weight_scale(two_slides):
    cohort = open_cohort(two_slides)
    try:
        app = ViewerApp(cohort)
        info = json.loads(app.slide_info("flat"))
        assert info["spread"]["flat"] and "nearly flat" in info["spread"]["text"]
        assert info["scales"]["weight"]["title"] == "attention vs. flat (all slides)"
        view = cohort.slide("flat")
        level = info["max_level"] - 2
        rank_tile, _ = app.tile("flat", view.version, "attention", str(level), "0_0")
        weight_tile, _ = app.tile("flat", view.version, "weight", str(level), "0_0")
        rank = np.asarray(Image.open(io.BytesIO(rank_tile)))
        weight = np.asarray(Image.open(io.BytesIO(weight_tile)))
        drawn = weight[..., 3] > 0
        assert drawn.any() and (rank[..., 3] > 0).sum() == drawn.sum()
        # the weight layer of a flat slide is one colour; its rank layer spans the colour map
        assert np.ptp(weight[drawn][:, :3], axis=0).max() <= 16 < np.ptp(rank[drawn][:, :3], axis=0).max()
        page = app.viewer_page("flat").decode()
        assert '<select id="scale">' in page and 'value="weight"' in page and 'id="spread"' in page
    finally:
        cohort.close()
