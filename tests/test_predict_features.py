"""A model trained on cached features predicts new slides: predict makes the same features, or says once how."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ips_path.cli.main import main
from ips_path.model.encoders import build_encoder
from ips_path.stores.tile_store import TileStore

IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]
TRAIN = ["--epochs", "1", "--batch-size", "2", "--n-select", "8", "--chunk-size", "32", "--dim", "16", "--heads", "2",
         "--device", "cpu", "--warmup-epochs", "0", "--threads", "1"]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["-q", *argv])
    return int(done.value.code), capsys.readouterr().err


def _probabilities(pred: Path) -> dict[str, str]:
    with (pred / "predictions.csv").open(newline="") as f:
        return {row["slide_id"]: row["prob_positive"] for row in csv.DictReader(f)}


def _slides(manifest: Path) -> list[str]:
    with manifest.open(newline="") as f:
        return [str(manifest.parent / row["slide_path"]) for row in csv.DictReader(f)]


@pytest.fixture
def tiles(cohort, tmp_path) -> Path:
    """A copy of the cohort's tile stores, to add features to."""
    return Path(shutil.copytree(cohort[1], tmp_path / "tiles"))


def test_a_model_on_stain_density_features_predicts_new_slides_from_features_it_computes(cohort, tiles, tmp_path,
                                                                                        capsys):
    manifest, _ = cohort
    assert _cli(["features", str(tiles), "--encoder", "stain_density", "--device", "cpu"], capsys)[0] == 0
    run = tmp_path / "run"
    code, err = _cli(["train", "--manifest", str(manifest), "--tiles", str(tiles), "--features", "stain_density",
                      "-o", str(run), *TRAIN], capsys)
    assert code == 0, err
    known = tmp_path / "known"
    assert _cli(["predict", "--model", str(run), "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(known),
                 "--device", "cpu", "--no-heatmaps"], capsys)[0] == 0
    new = tmp_path / "new"  # the slides as new ones: no tile store, no features; predict makes both
    code, err = _cli(["predict", "--model", str(run), *_slides(manifest), "-o", str(new), "--device", "cpu",
                      "--no-heatmaps"], capsys)
    assert code == 0, err
    assert _probabilities(new) == _probabilities(known)  # the same features, so the same predictions
    for store in sorted((new / "tiles").glob("*.zarr")):
        made = TileStore.open(store).array_attrs("features/stain_density")["identity"]
        assert made == TileStore.open(tiles / store.name).array_attrs("features/stain_density")["identity"]


def test_features_of_an_encoder_whose_weights_the_model_lacks_are_asked_for_once_with_the_command(cohort, tiles,
                                                                                                  tmp_path, capsys):
    manifest, _ = cohort
    weights = tmp_path / "smallcnn.pt"
    torch.manual_seed(1)
    torch.save(build_encoder("smallcnn").state_dict(), weights)
    code, err = _cli(["features", str(tiles), "--encoder", "smallcnn", "--pretrained", str(weights), "--name", "cnn",
                      "--device", "cpu"], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    code, err = _cli(["train", "--manifest", str(manifest), "--tiles", str(tiles), "--features", "cnn", "-o", str(run),
                      *TRAIN], capsys)
    assert code == 0, err
    pred = tmp_path / "pred"
    done = subprocess.run([*IPSPATH, "predict", "--model", str(run), *_slides(manifest), "-o", str(pred),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # once, not once per slide or 2-3 times
    assert "8 slide(s) lack the features/cnn the model reads" in lines[0] and "--encoder ...` " not in lines[0]
    tiles_dir = pred / "tiles"
    assert (f"ipspath tile {' '.join(_slides(manifest))} -o {tiles_dir} --mpp 2 --patch-size 32 && ipspath features "
            f"{tiles_dir} --name cnn --encoder smallcnn --pretrained WEIGHTS_FILE; then run this predict again"
            ) in lines[0]
    assert not (pred / "predictions.csv").exists()  # found before any work
