"""A training run that cannot start leaves nothing in its run folder."""

from __future__ import annotations

import pytest
import torch

from ips_path.cli.main import main


@pytest.mark.parametrize("weights", ["junk", "another_model"])
def test_a_start_refused_for_its_weights_writes_no_run_folder(cohort, tmp_path, capsys, weights):
    manifest, tiles = cohort
    path = tmp_path / "resnet18.pth"
    if weights == "junk":
        path.write_bytes(b"not a state dict")
    else:  # a readable file of another model
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["-q", "train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--encoder",
              "resnet18", "--pretrained", str(path), "--device", "cpu", "--epochs", "1"])
    assert done.value.code == 2
    assert str(path) in capsys.readouterr().err
    assert not run.exists() or not any(run.iterdir())  # no config.yaml, no splits.csv
