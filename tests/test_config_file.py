"""A YAML config as people write it: every number is a number, and a wrong key is named with its fix."""

from __future__ import annotations

import pytest
import yaml

from ips_path.cli.main import main

FAST_OPTIONS = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
                "--threads", "2", "--device", "cpu", "--epochs", "1"]


def _train(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as done:
        main(["-q", "train", *args])
    return done.value.code, capsys.readouterr().err.strip().splitlines()


def test_numbers_written_as_people_write_them_are_read_as_numbers(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    config = tmp_path / "config.yaml"
    # PyYAML (YAML 1.1) reads 3e-4 and 1e-3 as strings; they were refused as "not a float".
    config.write_text("lr: 3e-4\nweight_decay: 1e-3\nwarmup_epochs: .5\nval_fraction: 2.5E-1\n", encoding="utf-8")
    run = tmp_path / "run"
    code, lines = _train(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--config", str(config),
                          *FAST_OPTIONS], capsys)
    assert code == 0, lines
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    read = (saved["lr"], saved["weight_decay"], saved["warmup_epochs"], saved["val_fraction"])
    assert read == (3e-4, 1e-3, 0.5, 0.25)


def test_a_wrong_key_is_named_alone_with_the_key_it_was_meant_to_be(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    config = tmp_path / "config.yaml"
    config.write_text("n_selct: 8\nlr: 3e-4\n", encoding="utf-8")
    run = tmp_path / "run"
    code, lines = _train(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), "--config", str(config),
                          *FAST_OPTIONS], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "unknown key 'n_selct'; did you mean 'n_select'?" in lines[0] and str(config) in lines[0], lines
    assert "chunk_size" not in lines[0] and "known keys" not in lines[0]  # not every setting listed
    assert not run.exists()

