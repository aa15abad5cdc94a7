"""``ipspath train`` warns when the validation split is too small to judge a model, or lacks a class."""

from __future__ import annotations

import csv
import logging
import shutil

import pytest
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.slides.manifest import read_manifest, validation_split_problems

FAST = ["--epochs", "1", "--n-select", "4", "--dim", "16", "--heads", "2", "--batch-size", "4", "--device", "cpu",
        "--features", "stain_density"]


@pytest.fixture(scope="module")
def features(cohort, tmp_path_factory):
    """The cohort's tile stores with cached stain_density features (training reads no pixels)."""
    tiles = tmp_path_factory.mktemp("val-split") / "tiles"
    shutil.copytree(cohort[1], tiles)
    result = CliRunner().invoke(cli, ["-q", "features", str(tiles), "--encoder", "stain_density"])
    assert result.exit_code == 0, result.output
    return tiles


def _train(manifest, tiles, out, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ips_path"):
        result = CliRunner().invoke(cli, ["train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(out),
                                          *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_train_warns_about_a_small_validation_split_and_a_class_without_validation_slides(cohort, features, tmp_path,
                                                                                         caplog):
    manifest, tiles = cohort[0], features
    warnings = _train(manifest, tiles, tmp_path / "run", caplog)
    small = [w for w in warnings if "validation slides (fewer than 10)" in w]
    assert len(small) == 1 and small[0].startswith(f"{manifest}: only 2 validation slides") and "--folds" in small[0]

    # the manifest's own split: both validation slides negative
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    negatives = [r["slide_id"] for r in rows if r["label"] == "negative"][:2]
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "split"])
        writer.writeheader()
        writer.writerows({**r, "slide_path": str(manifest.parent / r["slide_path"]),
                          "split": "val" if r["slide_id"] in negatives else "train"} for r in rows)
    warnings = _train(split, tiles, tmp_path / "run2", caplog)
    assert [w for w in warnings if "no validation slide of class" in w] == [
        f"{split}: no validation slide of class positive: the validation AUC and balanced accuracy cannot judge it"]


def test_a_large_stratified_validation_split_is_not_warned_about(cohort, tmp_path):
    manifest, _ = cohort
    rows = read_manifest(manifest, check_files=False)
    many = [r.__class__(**{**r.__dict__, "slide_id": f"{r.slide_id}-{i}"}) for r in rows for i in range(3)]
    splits = {r.slide_id: "val" if i % 2 else "train" for i, r in enumerate(many)}
    assert validation_split_problems(many, splits) == []
    assert validation_split_problems(many, {r.slide_id: "train" for r in many})[0].startswith("no validation slides")
