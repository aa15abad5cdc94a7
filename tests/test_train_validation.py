"""Bad training options and runs that go wrong are refused in one line, before any work or any bad write."""

from __future__ import annotations

import pytest

import ips_path.training.train as train_module
from ips_path.cli.main import main
from ips_path.config import TrainConfig
from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.training.checkpoint import load_checkpoint
from ips_path.training.train import train

FAST = dict(n_select=8, chunk_size=16, dim=32, heads=4, batch_size=2, epochs=2, threads=2, warmup_epochs=1.0,
            device="cpu", augment=False)
FAST_OPTIONS = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
                "--threads", "2", "--device", "cpu", "--epochs", "1"]


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as done:
        main(["-q", "train", *args])
    return done.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--warmup-epochs", "nan", "--warmup-epochs must be a finite number, got nan"),  # trained with lr 0, exit 0
    ("--lr", "inf", "--lr must be a finite number, got inf"),  # left a last.pt that blocked reruns
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "0", "--lr must be > 0, got 0.0"),
    ("--weight-decay", "-inf", "--weight-decay must be a finite number, got -inf"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number, got inf"),
    ("--val-fraction", "nan", "--val-fraction must be a finite number, got nan"),
    ("--mpp", "inf", "--mpp must be a finite number, got inf"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0, got -1.0"),
    ("--seed", "-1", "--seed must be in [0, 2**63), got -1"),  # crashed in the first epoch's shuffle
    ("--heads", "3", "--heads (3) must divide --dim (32)"),
    ("--device", "gpu", "--device 'gpu' is not a device"),
    ("--device", "cuda:0", "--device cuda:0: no CUDA GPU is visible"),
])
def test_a_bad_option_is_refused_in_one_line_before_any_work(option, value, message, cohort, tmp_path, capsys):
    if option == "--device" and value.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    manifest, tiles = cohort
    run = tmp_path / "run"
    code, lines = _cli(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run), *FAST_OPTIONS,
                        option, value], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not run.exists()  # nothing written, not even the folder


def test_an_output_folder_that_cannot_be_made_is_found_before_training(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, lines = _cli(["--manifest", str(manifest), "--tiles", str(tiles), "-o", str(blocker / "run"),
                        *FAST_OPTIONS], capsys)
    assert code == 2 and len(lines) == 1 and str(blocker) in lines[0], lines


def _failing_step(at_call: int, loss: float):
    real_step, calls = train_module.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        out = real_step(*args, **kwargs)
        return {**out, "loss": loss} if len(calls) == at_call else out

    return step


def test_a_loss_that_becomes_infinite_stops_the_run_and_keeps_the_good_checkpoints(cohort, tmp_path, monkeypatch):
    manifest, tiles = cohort
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "train_step", _failing_step(at_call=5, loss=float("inf")))  # epoch 2, step 2
    with pytest.raises(IpspathError, match=r"training loss is inf at epoch 2, step 2: training diverged; last.pt "
                                           r"keeps the good state of epoch 1"):
        train(manifest, tiles, run, TrainConfig(**FAST), progress=False)
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == 1 and len(last["history"]) == 1


def test_a_non_finite_validation_loss_is_never_written_to_a_checkpoint(cohort, tmp_path, monkeypatch):
    manifest, tiles = cohort
    run = tmp_path / "run"
    real_validate = train_module._validate
    monkeypatch.setattr(train_module, "_validate",
                        lambda *a, **k: {**real_validate(*a, **k), "val_loss": float("nan")})
    with pytest.raises(IpspathError, match="the validation loss became NaN or infinite in epoch 1"):
        train(manifest, tiles, run, TrainConfig(**FAST), progress=False)
    assert load_checkpoint(run / "last.pt")["epoch"] == 0 and not (run / "best.pt").exists()


def test_a_run_that_diverged_in_its_first_epoch_can_be_rerun_in_its_folder(cohort, tmp_path, monkeypatch):
    manifest, tiles = cohort
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_step", _failing_step(at_call=1, loss=float("nan")))
        with pytest.raises(IpspathError, match="nothing was trained, so the run folder may be reused"):
            train(manifest, tiles, run, TrainConfig(**{**FAST, "lr": 10.0}), progress=False)
    result = train(manifest, tiles, run, TrainConfig(**{**FAST, "epochs": 1}), progress=False)  # a fixed lr
    assert result.status == "completed"
    # A run with a finished epoch is never replaced by a fresh one.
    with pytest.raises(BadInputError, match="already holds a run"):
        train(manifest, tiles, run, TrainConfig(**FAST), progress=False)
