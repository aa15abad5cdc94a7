"""``ipspath predict --model CV_RUN``: the ensemble of a cross-validation's fold models."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from ips_path.config import TrainConfig
from ips_path.inference.predict import predict
from ips_path.runtime.errors import BadInputError, RefusedError
from ips_path.training.cross_validation import train_cross_validated

FAST = dict(n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=1, threads=2, warmup_epochs=0.0,
            device="cpu", augment=False)


@pytest.fixture(scope="module")
def cv_run(cohort, tmp_path_factory):
    manifest, tiles = cohort
    run = tmp_path_factory.mktemp("cv") / "cv"
    train_cross_validated(manifest, tiles, run, TrainConfig(**FAST), 2, progress=False)
    return run


def _rows(folder):
    with (folder / "predictions.csv").open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def _scores(folder, slide_id):
    with h5py.File(folder / "scores" / f"{slide_id}_scores.h5") as f:
        return f["attention_scores"][:]


def test_a_cross_validated_run_predicts_with_the_mean_of_its_folds(cohort, cv_run, tmp_path):
    manifest, tiles = cohort
    options = dict(manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    result = predict(cv_run, tmp_path / "ensemble", **options)
    assert result.exit_code == 0
    singles = [predict(cv_run / f"fold_{i}", tmp_path / f"fold_{i}", **options) for i in (0, 1)]
    assert all(s.exit_code == 0 for s in singles)

    classes = result.metrics["classes"]
    ensemble = _rows(tmp_path / "ensemble")
    folds = [_rows(tmp_path / f"fold_{i}") for i in (0, 1)]
    for slide_id, row in ensemble.items():
        for c in classes:
            per_fold = [float(folds[i][slide_id][f"prob_{c}"]) for i in (0, 1)]
            assert [float(row[f"fold{i}_prob_{c}"]) for i in (0, 1)] == pytest.approx(per_fold, abs=1e-5)
            assert float(row[f"prob_{c}"]) == pytest.approx(np.mean(per_fold), abs=1e-5)
        # the heatmaps' attention: the mean of the folds' attention logits
        expected = np.mean([_scores(tmp_path / f"fold_{i}", slide_id) for i in (0, 1)], axis=0)
        np.testing.assert_allclose(_scores(tmp_path / "ensemble", slide_id), expected, rtol=1e-5, atol=1e-6)
    identity = json.loads((tmp_path / "ensemble" / "run.json").read_text())["model_identity"]
    assert sorted(identity["folds"]) == ["fold_0", "fold_1"]


def test_a_changed_fold_model_is_refused_then_redone_with_overwrite(cohort, cv_run, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "cv"
    shutil.copytree(cv_run, run)
    options = dict(manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    predict(run, tmp_path / "p", **options)
    before = _rows(tmp_path / "p")

    checkpoint = torch.load(run / "fold_1" / "best.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, value in checkpoint["model"].items():  # another fold model: every weight moved a little
        if value.is_floating_point():
            checkpoint["model"][name] = value + 0.1 * torch.randn(value.shape, generator=generator)
    torch.save(checkpoint, run / "fold_1" / "best.pt")
    with pytest.raises(RefusedError, match=r"folds\.fold_1\.sha256"):
        predict(run, tmp_path / "p", **options)
    again = predict(run, tmp_path / "p", overwrite=True, **options)
    assert all(o.status.value == "done" for o in again.outcomes)
    after, first = _rows(tmp_path / "p"), f"prob_{again.metrics['classes'][0]}"
    assert any(after[s][f"fold1_{first}"] != before[s][f"fold1_{first}"] for s in after)
    assert all(after[s][f"fold0_{first}"] == before[s][f"fold0_{first}"] for s in after)


def test_a_cross_validation_with_a_fold_left_unfinished_is_refused(cohort, cv_run, tmp_path):
    manifest, tiles = cohort
    run = tmp_path / "cv"
    shutil.copytree(cv_run, run)
    for name in ("best.pt", "last.pt"):
        (run / "fold_1" / name).unlink(missing_ok=True)
    with pytest.raises(BadInputError, match=r"fold_1 \(not started\).*--resume"):
        predict(run, tmp_path / "p", manifest=manifest, tiles_dir=tiles, heatmaps=False, progress=False)
    assert not (tmp_path / "p").exists()
