"""`ipspath train` end to end on a generated cohort: outputs, resume, several processes, refusals."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
import zarr
from click.testing import CliRunner

import ips_path.training.train as train_module
from ips_path.cli.train_cmd import train_cmd
from ips_path.config import TrainConfig
from ips_path.evaluation.metrics import classification_metrics
from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.stores.features import extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides
from ips_path.training.checkpoint import load_checkpoint, load_model
from ips_path.training.distributed import shard_epoch
from ips_path.training.train import EarlyStopping, lr_factor, train

# Small and quick: ~25-50 patches of 32 px per slide, a narrow model.
FAST = dict(n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=2, threads=2, warmup_epochs=1.0,
            device="cpu")
FAST_OPTIONS = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
                "--threads", "2", "--warmup-epochs", "1", "--device", "cpu"]
TIMING_COLUMNS = ("train_seconds", "elapsed_seconds", "slides_per_s", "patches_per_s", "peak_memory_mb")


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


def _invoke(args: list[str]):
    return CliRunner().invoke(train_cmd, args, obj={"quiet": True, "debug": False})


# -- pure parts -------------------------------------------------------------------------------------

def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    for n_slides, world in ((10, 2), (11, 2), (7, 3), (5, 1)):
        for epoch in range(3):
            shards = [shard_epoch(n_slides, epoch, seed=1, rank=r, world_size=world) for r in range(world)]
            seen = [i for shard in shards for i in shard]
            assert len(set(seen)) == len(seen) == n_slides - n_slides % world
            assert len({len(s) for s in shards}) == 1
    assert shard_epoch(10, 0, seed=1) != shard_epoch(10, 1, seed=1)  # reshuffled every epoch
    assert shard_epoch(10, 3, seed=1) == shard_epoch(10, 3, seed=1)


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert lr_factor(0, 4, 20) == pytest.approx(1 / 5)
    assert lr_factor(3, 4, 20) == pytest.approx(4 / 5)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0, 10) == 1.0


def test_early_stopping_breaks_metric_ties_by_loss_and_counts_patience():
    stopping = EarlyStopping("auc", patience=2)
    assert stopping.update(0.8, 0.6, 1)
    assert stopping.update(1.0, 0.5, 2)
    assert stopping.update(1.0, 0.2, 3)  # same AUC, lower loss: better
    assert not stopping.update(1.0, 0.3, 4)
    assert not stopping.update(0.9, float("nan"), 5)
    assert stopping.should_stop and (stopping.best, stopping.best_epoch) == (1.0, 3)
    by_loss = EarlyStopping("loss", patience=0)
    assert by_loss.update(0.5, 0.5, 1) and not by_loss.update(0.7, 0.7, 2) and by_loss.update(0.4, 0.4, 3)
    assert not by_loss.should_stop  # patience 0: never stops
    undefined = EarlyStopping("auc", patience=5)  # a validation set with one class: AUC is NaN
    assert undefined.update(float("nan"), 0.5, 1) and undefined.update(float("nan"), 0.4, 2)
    assert not undefined.update(float("nan"), 0.6, 3) and undefined.best_epoch == 2


# -- end to end -------------------------------------------------------------------------------------

def test_cli_trains_and_writes_a_loadable_run(cohort, tmp_path):
    manifest, tiles = cohort
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("epochs: 2\nn_select: 4\nseed: 3\n")
    run = tmp_path / "run"
    result = _invoke(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--config", str(config_file),
                      "--n-select", "8", *[o for o in FAST_OPTIONS if o not in ("--n-select", "8")]])
    assert result.exit_code == 0, result.output
    assert "completed after 2 epoch(s)" in result.output

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["n_select"] == 8 and saved["seed"] == 3 and saved["epochs"] == 2  # option > YAML > default
    assert saved["mpp"] is None and saved["encoder"] == "smallcnn"

    with (run / "splits.csv").open() as f:
        splits = list(csv.DictReader(f))
    assert {r["split"] for r in splits} == {"train", "val"}
    val_labels = {r["label"] for r in splits if r["split"] == "val"}
    assert val_labels == {"negative", "positive"}  # stratified: each label gets a validation patient

    history = _history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for column in ("lr", "train_loss", "val_loss", "val_auc", "val_balanced_accuracy", "val_recall_negative",
                   "val_recall_positive", "slides_per_s", "patches_per_s", "peak_memory_mb"):
        assert math.isfinite(float(history[-1][column])), column
    assert int(history[0]["train_slides"]) == sum(r["split"] == "train" for r in splits)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["status"] == "completed"
    assert checkpoint["class_names"] == ["negative", "positive"]
    assert checkpoint["tiling"] == {"target_mpp": 2.0, "patch_size": 32}
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == best["early_stopping"]["best_epoch"]

    # The saved model predicts the validation slides as the run measured them.
    model, _ = load_model(run / "last.pt")
    val_ids = [r["slide_id"] for r in splits if r["split"] == "val"]
    streamer = PatchStreamer(chunk_size=16, threads=2)
    logits = [model.predict_slide(streamer.stream(TileStore.open(tiles / f"{s}.zarr"))).logits["label"]
              for s in val_ids]
    streamer.close()
    labels = np.array([["negative", "positive"].index(r["label"]) for r in splits if r["split"] == "val"])
    metrics = classification_metrics(labels, torch.stack(logits).softmax(-1).numpy(), ["negative", "positive"])
    assert float(history[-1]["val_auc"]) == pytest.approx(metrics["auc"])
    assert float(history[-1]["val_balanced_accuracy"]) == pytest.approx(metrics["balanced_accuracy"])


def test_interrupted_run_resumes_to_the_same_result(cohort, tmp_path, monkeypatch):
    manifest, tiles = cohort
    config = TrainConfig(**FAST, seed=11)
    straight = train(manifest, tiles, tmp_path / "straight", config, progress=False)

    # Ctrl-C during the second step of epoch 2 (3 steps per epoch): last.pt holds epoch 1.
    real_step, calls = train_module.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(manifest, tiles, run, config, progress=False)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train_module, "train_step", real_step)

    result = _invoke(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = load_checkpoint(run / "last.pt")
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed["model"][name], value), name
    assert _without_timing(_history(run)) == _without_timing(_history(tmp_path / "straight"))

    # A finished run resumes to nothing; a changed setting is refused.
    again = train(manifest, tiles, run, config, resume=True, progress=False)
    assert again.status == "completed" and again.epochs_completed == 2
    with pytest.raises(BadInputError, match=r"lr \(0\.0003 -> 0\.01\)"):
        train(manifest, tiles, run, TrainConfig(**{**FAST, "lr": 0.01}, seed=11), resume=True)
    with pytest.raises(BadInputError, match="already holds a run"):
        train(manifest, tiles, run, config)


def _ddp_worker(rank: int, world_size: int, port: int, manifest: Path, tiles: Path, run: Path, out: Path) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(manifest, tiles, run, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    torch.save({"model": result.model.state_dict(), "history": result.history}, out / f"rank{rank}.pt")


def test_two_processes_train_one_model_on_disjoint_shards(cohort, tmp_path):
    manifest, tiles = cohort
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(2, port, manifest, tiles, run, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name  # weights and BatchNorm statistics
    assert _without_timing(ranks[0]["history"]) == _without_timing(ranks[1]["history"])

    with (run / "splits.csv").open() as f:
        splits = {r["slide_id"]: r for r in csv.DictReader(f)}
    n_train = sum(r["split"] == "train" for r in splits.values())
    row = ranks[0]["history"][0]
    assert row["train_slides"] == n_train - n_train % 2
    # Validation metrics were gathered from both processes: they are those of all validation slides.
    model, _ = load_model(run / "last.pt")
    val = [r for r in splits.values() if r["split"] == "val"]
    streamer = PatchStreamer(chunk_size=16, threads=2)
    logits = torch.stack([model.predict_slide(streamer.stream(TileStore.open(tiles / f"{r['slide_id']}.zarr")))
                          .logits["label"] for r in val])
    streamer.close()
    labels = torch.tensor([["negative", "positive"].index(r["label"]) for r in val])
    assert row["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_features_mode_trains_on_cached_embeddings_with_three_classes(cohort, tmp_path):
    manifest, tiles = cohort
    tiles_copy = tmp_path / "tiles"
    shutil.copytree(tiles, tiles_copy)
    rows = list(csv.DictReader(manifest.open()))
    for i, row in enumerate(rows):
        row["label"] = ("a", "b", "c")[i % 3]
        row["slide_path"] = str(manifest.parent / row["slide_path"])
    three = tmp_path / "three.csv"
    with three.open("w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    config = TrainConfig(**{**FAST, "features": "smallcnn", "val_fraction": 0.4})

    with pytest.raises(BadInputError, match=r"no cached features 'features/smallcnn'.*ipspath features .* "
                                            r"--encoder smallcnn --name smallcnn"):
        train(three, tiles_copy, tmp_path / "refused", config)

    extract_features(sorted(tiles_copy.glob("*.zarr")), "smallcnn", chunk_size=64, threads=2, progress=False)
    result = train(three, tiles_copy, tmp_path / "run", config, progress=False)
    row = result.history[-1]
    assert {"val_recall_a", "val_recall_b", "val_recall_c"} <= set(row)
    assert 0 <= row["val_auc"] <= 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["in_features"] == 128


# -- refusals ---------------------------------------------------------------------------------------

def test_missing_tile_stores_are_listed_with_the_command_that_makes_them(cohort, tmp_path):
    manifest, tiles = cohort
    partial = tmp_path / "tiles"
    shutil.copytree(tiles, partial)
    for slide_id in ("slide_001", "slide_004"):
        shutil.rmtree(partial / f"{slide_id}.zarr")
    with pytest.raises(BadInputError) as error:
        train(manifest, partial, tmp_path / "run", TrainConfig(**FAST))
    message = str(error.value)
    assert "slide_001, slide_004" in message
    assert f"ipspath tile --manifest {manifest} -o {partial} --mpp 2 --patch-size 32" in message
    assert not (tmp_path / "run").exists()

    # A slide moved away after tiling is found before training starts, not in the middle of it.
    gone = tmp_path / "moved" / "slide_002.svs"
    zarr.open_group(partial / "slide_002.zarr", mode="r+").attrs["slide_path"] = str(gone)
    with pytest.raises(BadInputError, match=re.escape(f"slide_002.zarr: its slide file {gone} is gone")):
        train(manifest, partial, tmp_path / "run", TrainConfig(**FAST))


def test_stores_at_another_resolution_or_disagreeing_are_refused(cohort, tmp_path):
    manifest, tiles = cohort
    with pytest.raises(BadInputError, match=r"8 tile store\(s\) were made at another resolution.*1 µm/px and 32 px"):
        train(manifest, tiles, tmp_path / "run", TrainConfig(**{**FAST, "mpp": 1.0}))

    mixed = tmp_path / "mixed"
    shutil.copytree(tiles, mixed)
    inputs = [i for i in collect_inputs([], manifest) if i.slide_id in ("slide_002", "slide_003")]
    tile_slides(inputs, mixed, TilingParams(target_mpp=2.0, patch_size=16, qc=False), overwrite=True, progress=False)
    with pytest.raises(BadInputError, match=r"different settings \(2 µm/px and 16 px: 2 slide\(s\); "
                                            r"2 µm/px and 32 px: 6 slide\(s\)\)"):
        train(manifest, mixed, tmp_path / "run", TrainConfig(**FAST))
    with pytest.raises(BadInputError, match=r"slide_002 \(2 µm/px, 16 px\), slide_003"):
        train(manifest, mixed, tmp_path / "run", TrainConfig(**{**FAST, "patch_size": 32}))


def test_diverging_run_stops_with_a_clear_error_and_keeps_the_good_checkpoint(cohort, tmp_path, monkeypatch):
    manifest, tiles = cohort
    run = tmp_path / "run"
    config = TrainConfig(**FAST)

    def interrupted_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):  # leaves the checkpoint of the start of the run
        train(manifest, tiles, run, config, progress=False)
    monkeypatch.undo()
    # Poison a weight that selection does not use: the first loss is NaN.
    checkpoint = load_checkpoint(run / "last.pt")
    head = next(k for k in checkpoint["model"] if k.startswith("aggregator.heads.") and k.endswith("bias"))
    checkpoint["model"][head] = torch.full_like(checkpoint["model"][head], float("nan"))
    torch.save(checkpoint, run / "last.pt")
    with pytest.raises(IpspathError, match="training loss is nan at epoch 1, step 1: training diverged"):
        train(manifest, tiles, run, config, resume=True, progress=False)
    kept = load_checkpoint(run / "last.pt")
    assert kept["epoch"] == 0 and not kept["history"]
    assert torch.equal(kept["model"]["aggregator.queries"], checkpoint["model"]["aggregator.queries"])


def test_subprocess_cli_trains_and_reports_bad_input_in_one_line(cohort, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ips_path.cli.main", "-q", "train", "--manifest", str(manifest), "--tiles",
               str(tiles), "-o", str(run), "--epochs", "1", *FAST_OPTIONS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train: completed after 1 epoch(s)" in done.stdout
    assert (run / "best.pt").is_file()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"ipspath: error: {run} already holds a run (last.pt, best.pt); continue it with "
                                    "--resume, or give another output folder")
