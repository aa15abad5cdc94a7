"""`ipspath demo` runs the whole chain and reports AUC and localisation."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from PIL import Image

from ips_path.cli.main import cli
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.demo import DemoSettings, run_demo

TINY = DemoSettings(n_train=8, n_test=4, slide_size=(1024, 768), lesion_um=(150.0, 300.0))
TINY = replace(TINY, train=replace(TINY.train, epochs=1, n_select=8, chunk_size=64, dim=32, heads=2))


def test_tiny_demo_writes_every_output(tmp_path):
    result = run_demo(tmp_path / "demo", TINY, progress=False)
    out = tmp_path / "demo"
    assert result.report == out / "predictions" / "report.html" and result.report.is_file()
    with (out / "predictions" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    # train and test slides have distinct ids, so each has its own tile store
    assert len(list((out / "tiles").glob("*.zarr"))) == TINY.n_train + TINY.n_test
    assert (out / "run" / "best.pt").is_file() and (out / "run" / "curves.png").is_file()
    assert all((out / "predictions" / "heatmaps" / r["slide_id"] / "overlay.png").is_file() for r in rows)
    # overlays are cropped to the tissue (thumbnail_size 1024 is 1 px per level-0 px of these slides)
    sizes = []
    for r in rows:
        folder = out / "predictions" / "heatmaps" / r["slide_id"]
        sizes.append(Image.open(folder / "overlay.png").size)
        assert Image.open(folder / "thumbnail.png").size == sizes[-1]
        store = TileStore.open(out / "tiles" / f"{r['slide_id']}.zarr")
        extent = store.coords.max(axis=0) + store.patch_size_level0 - store.coords.min(axis=0)
        assert (extent <= sizes[-1]).all() and sizes[-1][0] <= 1024 and sizes[-1][1] <= 768
    assert sum(w * h for w, h in sizes) < 0.8 * len(sizes) * 1024 * 768, sizes
    summary = json.loads((out / "demo.json").read_text())
    assert summary["n_positive_test"] == result.n_positive_test == sum(r["label"] == "positive" for r in rows)
    assert result.localisation is None or 0 <= result.localisation <= 1
    assert set(result.seconds) == {"generate", "tile", "train", "predict", "report"}


@pytest.mark.slow
def test_full_demo_learns_and_localises(tmp_path):
    result = CliRunner().invoke(cli, ["-q", "demo", "-o", str(tmp_path / "demo")], standalone_mode=False)
    assert result.exception is None, result.output
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["test_auc"] >= 0.9, result.output
    assert summary["localisation"] >= 0.8, result.output
    assert "open " in result.output and "report.html" in result.output
