"""`ipspath predict` ties every result to what made it: never another model's numbers, never lost.

Hostile reruns of a real trained model on a generated cohort: another model (or one of other
classes) into the same folder, two models whose run folders share a name, a slide file replaced
under the same id, a checkpoint rewritten while the process keeps its model cached, bad options,
kill -9 between the per-slide writes, and two runs at once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ips_path.cli.main import main
from ips_path.inference.predict import predict
from ips_path.runtime.errors import RefusedError
from ips_path.stores.tile_store import TileStore


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _probabilities(out: Path) -> dict[str, list[float]]:
    rows = _rows(out / "predictions.csv")
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return {r["slide_id"]: [float(r[c]) for c in columns] for r in rows if r["status"] in ("done", "reused")}


def _subset(manifest: Path, tmp_path: Path, n: int) -> Path:
    """A manifest of the first ``n`` slides of ``manifest`` (paths made absolute)."""
    rows = _rows(manifest)[:n]
    for row in rows:
        row["slide_path"] = str((manifest.parent / row["slide_path"]).resolve())
    path = tmp_path / f"manifest_{n}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _perturbed_run(run_dir: Path, out: Path, seed: int = 1) -> Path:
    """A copy of a training run whose best.pt holds other weights (another model, same classes)."""
    out.mkdir(parents=True)
    checkpoint = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for name, value in checkpoint["model"].items():
        if value.is_floating_point() and "running_" not in name:  # batch-norm statistics stay valid
            value.add_(torch.randn(value.shape, generator=generator) * 0.2)
    torch.save(checkpoint, out / "best.pt")
    return out


def _other_classes_run(run_dir: Path, out: Path) -> Path:
    """A run of the same architecture over three classes (random head): another model, other classes."""
    from ips_path.config import TrainConfig
    from ips_path.training.checkpoint import build_model

    out.mkdir(parents=True)
    checkpoint = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(TrainConfig.from_dict(checkpoint["config"]), 3, checkpoint["in_features"],
                        load_pretrained=False)
    checkpoint["model"] = model.state_dict()
    checkpoint["class_names"] = ["benign", "in_situ", "invasive"]
    torch.save(checkpoint, out / "best.pt")
    return out


def _cli(*args: str | Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.fixture()
def small(cohort, tmp_path) -> tuple[Path, Path]:
    """Three slides of the cohort (manifest) and a private copy of their tile stores."""
    manifest, tiles = cohort
    subset = _subset(manifest, tmp_path, 3)
    own = tmp_path / "tiles"
    own.mkdir()
    for row in _rows(subset):
        shutil.copytree(tiles / f"{row['slide_id']}.zarr", own / f"{row['slide_id']}.zarr")
    return subset, own


def test_another_model_into_the_same_folder_is_refused_and_keeps_the_first_models_results(
        trained_run, small, tmp_path, capsys):
    manifest, tiles = small
    out = tmp_path / "pred"
    predict(trained_run, out, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    first = _probabilities(out)
    other = _perturbed_run(trained_run, tmp_path / "other" / "run")
    code, _, err = _cli("--model", other, "--manifest", manifest, "--tiles", tiles, "-o", out, "--no-heatmaps",
                        "--device", "cpu", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "another model" in err and "--overwrite" in err
    assert _probabilities(out) == first  # untouched

    code, _, _ = _cli("--model", other, "--manifest", manifest, "--tiles", tiles, "-o", out, "--no-heatmaps",
                      "--device", "cpu", "--overwrite", capsys=capsys)
    assert code == 0
    second = _probabilities(out)
    assert second.keys() == first.keys() and all(second[s] != first[s] for s in first)


def test_a_model_of_other_classes_with_overwrite_writes_rows_that_match_the_header(trained_run, small, tmp_path):
    manifest, tiles = small
    out = tmp_path / "pred"
    predict(trained_run, out, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    three = _other_classes_run(trained_run, tmp_path / "three" / "run")
    with pytest.raises(RefusedError, match="another model"):
        predict(three, out, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    result = predict(three, out, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False, overwrite=True)
    assert result.exit_code == 0 and all(o.status == "done" for o in result.outcomes)
    with (out / "predictions.csv").open(newline="") as f:
        header, *rows = list(csv.reader(f))
    assert [c for c in header if c.startswith("prob_")] == ["prob_benign", "prob_in_situ", "prob_invasive"]
    assert rows and all(len(row) == len(header) for row in rows)
    assert all(sum(v) == pytest.approx(1, abs=1e-4) and len(v) == 3 for v in _probabilities(out).values())
    assert json.loads((out / "run.json").read_text())["classes"] == ["benign", "in_situ", "invasive"]


def test_two_models_in_folders_of_one_name_keep_their_own_scores_and_heatmaps(trained_run, small, tmp_path,
                                                                              capsys):
    manifest, tiles = small
    other = _perturbed_run(trained_run, tmp_path / "elsewhere" / trained_run.name)
    assert other.name == trained_run.name
    a, b = tmp_path / "pred_a", tmp_path / "pred_b"
    predict(trained_run, a, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    predict(other, b, manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    run_a, run_b = (json.loads((p / "run.json").read_text())["run"] for p in (a, b))
    assert run_a != run_b
    for row in _rows(manifest):
        store = TileStore.open(tiles / f"{row['slide_id']}.zarr")
        for out, run in ((a, run_a), (b, run_b)):
            with h5py.File(out / "scores" / f"{row['slide_id']}_scores.h5") as f:
                assert np.array_equal(store.read_array(f"scores/{run}"), f["attention_scores"][...])
        assert not np.array_equal(store.read_array(f"scores/{run_a}"), store.read_array(f"scores/{run_b}"))
    # heatmap --predictions draws each folder's own model; --run with the shared folder name is ambiguous
    from ips_path.review.heatmap import jobs_from_predictions, jobs_from_tiles
    from ips_path.runtime.errors import BadInputError

    assert {job.run for job in jobs_from_predictions(a)} == {run_a}
    assert {job.run for job in jobs_from_predictions(b)} == {run_b}
    with pytest.raises(BadInputError, match=f"scores of 2 models of run '{trained_run.name}'"):
        jobs_from_tiles(tiles, trained_run.name, tmp_path / "maps")
    assert {job.run for job in jobs_from_tiles(tiles, run_b, tmp_path / "maps")} == {run_b}


def test_a_slide_file_replaced_under_the_same_id_is_refused_then_redone_with_overwrite(trained_run, cohort,
                                                                                        tmp_path):
    manifest, _ = cohort
    rows = _rows(manifest)
    slide = tmp_path / "slides" / "case.svs"
    slide.parent.mkdir()
    shutil.copy(manifest.parent / rows[0]["slide_path"], slide)
    out = tmp_path / "pred"
    first = predict(trained_run, out, inputs=[slide], heatmaps=False, progress=False)
    assert first.exit_code == 0
    before = _probabilities(out)["case"]

    shutil.copy(manifest.parent / rows[1]["slide_path"], slide)  # another slide, same id
    refused = predict(trained_run, out, inputs=[slide], heatmaps=False, progress=False)
    outcome = refused.outcomes[0]
    assert outcome.status == "refused" and refused.exit_code == 2
    assert "slide." in outcome.error and "--overwrite" in outcome.error and "\n" not in outcome.error
    assert _probabilities(out) == {}  # no stale probabilities reported for the slide

    redone = predict(trained_run, out, inputs=[slide], heatmaps=False, progress=False, overwrite=True)
    assert redone.outcomes[0].status == "done"
    reference = predict(trained_run, tmp_path / "reference", inputs=[manifest.parent / rows[1]["slide_path"]],
                        heatmaps=False, progress=False)
    after = _probabilities(out)["case"]
    assert after != before
    assert after == pytest.approx(reference.outcomes[0].extra["probabilities"], abs=1e-5)


def test_a_checkpoint_rewritten_in_place_is_not_served_from_the_process_cache(trained_run, small, tmp_path):
    manifest, tiles = small
    run = tmp_path / "live_run"
    shutil.copytree(trained_run, run)
    predict(run, tmp_path / "p1", manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    other = _perturbed_run(trained_run, tmp_path / "next")
    os.replace(other / "best.pt", run / "best.pt")  # as training does when a better epoch comes
    predict(run, tmp_path / "p2", manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    fresh = _perturbed_run(trained_run, tmp_path / "fresh")  # the same weights, another path
    predict(fresh, tmp_path / "p3", manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    assert _probabilities(tmp_path / "p2") != _probabilities(tmp_path / "p1")
    assert _probabilities(tmp_path / "p2") == _probabilities(tmp_path / "p3")


@pytest.mark.parametrize("options", [
    ["--threads", "0"],
    ["--chunk-size", "0"],
    ["--device", "tpu"],
    ["--top-k", "-1"],
    ["--thumbnail-size", "0"],
    ["--tiff-mpp", "nan"],
    ["--tiff-mpp", "inf"],
])
def test_each_bad_option_is_refused_in_one_line_before_any_work(trained_run, small, tmp_path, options, capsys):
    manifest, tiles = small
    out = tmp_path / "never"
    code, _, err = _cli("--model", trained_run, "--manifest", manifest, "--tiles", tiles, "-o", out, "--device",
                        "cpu", *options, capsys=capsys)
    assert code == 2 and err.startswith("ipspath: error: ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_work(trained_run, small, tmp_path, capsys):
    manifest, tiles = small
    code, _, err = _cli("--model", trained_run, "--manifest", manifest, "--tiles", tiles, "-o", tmp_path / "never",
                        "--device", "cuda", capsys=capsys)
    assert code == 2 and "no CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_a_checkpoint_whose_head_does_not_fit_its_classes_or_is_unreadable_is_refused(trained_run, small, tmp_path,
                                                                                       capsys):
    manifest, tiles = small
    checkpoint = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    checkpoint["class_names"] = ["a", "b", "c"]
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for model, expected in (("mismatch.pt", "do not fit its configuration or class names"),
                            ("garbage.pt", "not a readable checkpoint")):
        code, _, err = _cli("--model", tmp_path / model, "--manifest", manifest, "--tiles", tiles, "-o",
                            tmp_path / "never", "--device", "cpu", capsys=capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


def _predict_command(run_dir: Path, manifest: Path, tiles: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ips_path.cli.main", "predict", "--model", str(run_dir), "--manifest", str(manifest),
            "--tiles", str(tiles), "-o", str(out), "--device", "cpu", "--thumbnail-size", "64", "--top-k", "2"]


@pytest.mark.parametrize("point", [
    "predict.store_scores_written#2",
    pytest.param("predict.scores_h5_written#2", marks=pytest.mark.slow),
    pytest.param("predict.heatmaps_written#2", marks=pytest.mark.slow),
    pytest.param("predict.slide_recorded#2", marks=pytest.mark.slow),
])
def test_kill_between_the_per_slide_writes_then_rerun_gives_complete_consistent_outputs(
        trained_run, small, tmp_path, point):
    manifest, tiles = small
    out = tmp_path / "pred"
    command = _predict_command(trained_run, manifest, tiles, out)
    killed = subprocess.run(command, env={**os.environ, "IPSPATH_KILL_AT": point}, capture_output=True, timeout=300)
    assert killed.returncode == -9
    assert not (out / "predictions.csv").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((out / "run.json").read_text())
    rows = _rows(out / "predictions.csv")
    assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in _rows(manifest)]
    assert {r["status"] for r in rows} <= {"done", "reused"} and "done" in {r["status"] for r in rows}
    reference = predict(trained_run, tmp_path / "reference", manifest=manifest, tiles_dir=tiles, heatmaps=False,
                        progress=False)
    expected = {o.slide_id: o.extra["probabilities"] for o in reference.outcomes}
    for slide_id, probabilities in _probabilities(out).items():
        assert probabilities == pytest.approx(expected[slide_id], abs=1e-5)
        record = json.loads((out / "status" / f"{slide_id}.json").read_text())
        assert record["identity"]["model"] == run["model_key"]
        with h5py.File(out / "scores" / f"{slide_id}_scores.h5") as f:
            store = TileStore.open(tiles / f"{slide_id}.zarr")
            assert np.array_equal(f["attention_scores"][...], store.read_array(f"scores/{run['run']}"))
        assert (out / "heatmaps" / slide_id / "overlay.png").is_file()
    assert not list(out.rglob(".*partial-*"))


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_in_one_line_and_the_first_completes(
        trained_run, small, tmp_path):
    manifest, tiles = small
    out = tmp_path / "pred"
    release = tmp_path / "release"
    command = _predict_command(trained_run, manifest, tiles, out) + ["--no-heatmaps"]
    env = {**os.environ, "IPSPATH_PAUSE_AT": "predict.store_scores_written", "IPSPATH_PAUSE_FILE": str(release)}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{release}.reached").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another ipspath run" in second.stderr
        assert second.stderr.strip().count("\n") == 0, second.stderr
        release.touch()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert all(r["status"] == "done" for r in _rows(out / "predictions.csv"))
