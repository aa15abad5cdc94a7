"""Checkpoints written before the outcome kinds moved into ``ips_path.tasks`` still load and predict the same.

``tests/data/old_checkpoints/<kind>/`` holds the ``best.pt`` of a tiny run of each kind (cached
``stain_density`` features, ``--dim 8``, two epochs) as ipspath wrote it before that change: one label
column (``label``), two (``labels``: label, grade), Cox (``cox``), discrete-time survival (``nll``)
and a 2-fold cross-validation (``cv``, predicted as the ensemble of its folds).
``tests/data/old_checkpoints/expected/<kind>/`` holds what that version of ``ipspath predict`` wrote
for the cohort :func:`make_cohort` generates: the test predicts it again and compares the files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ips_path.cli.main import main
from ips_path.stores.features import extract_features
from ips_path.synthetic.synth import write_synthetic_cohort
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

DATA = Path(__file__).parent / "data" / "old_checkpoints"
KINDS = ("label", "labels", "cox", "nll", "cv")
EXPECTED = {"label": ("predictions.csv", "metrics.json"), "labels": ("predictions.csv", "metrics.json"),
            "cox": ("predictions.csv", "patients.csv", "survival_metrics.json"),
            "nll": ("predictions.csv", "patients.csv", "survival_metrics.json"),
            "cv": ("predictions.csv", "metrics.json")}
# per slide: grade, time, event
OUTCOMES = [("low", 4, 1), ("high", 10, 0), ("high", 7, 1), ("", 12, 1)]


def make_cohort(root: Path) -> tuple[Path, Path]:
    """Four small generated slides, tiled at 2 µm/px into 32 px patches with stain_density features, and a
    manifest with every kind's columns: (manifest, tiles)."""
    write_synthetic_cohort(root / "slides", 4, size=(1024, 768), mpp=1.0, downsamples=(1,), seed=11, workers=1,
                           lesion_diameter_um=(150.0, 300.0))
    source = root / "slides" / "manifest.csv"
    tiles = root / "tiles"
    tile_slides(collect_inputs([], source), tiles, TilingParams(target_mpp=2.0, patch_size=32, qc=False),
                progress=False)
    assert all(o.ok for o in extract_features(sorted(tiles.glob("*.zarr")), "stain_density", progress=False))
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "case_id", "label", "grade", "time", "event"])
        for row, (grade, time, event) in zip(rows, OUTCOMES, strict=True):
            writer.writerow([row["slide_id"], root / "slides" / row["slide_path"], row["case_id"], row["label"], grade,
                             time, event])
    return manifest, tiles


def predict_with(model: Path, manifest: Path, tiles: Path, out: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["-q", "predict", "--model", str(model), "--manifest", str(manifest), "--tiles", str(tiles), "-o",
              str(out), "--device", "cpu", "--no-heatmaps", "--threads", "1"])
    assert done.value.code == 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("old_checkpoints"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_of_the_old_format_predicts_the_same_numbers(kind, cohort, tmp_path):
    pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")
    manifest, tiles = cohort
    predict_with(DATA / kind, manifest, tiles, tmp_path / "pred")
    for name in EXPECTED[kind]:
        assert (tmp_path / "pred" / name).read_text() == (DATA / "expected" / kind / name).read_text(), name
