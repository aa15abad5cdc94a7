"""Checkpoints: read without the training code, identified by their contents rather than their path."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ips_path.training.checkpoint as checkpoint_module
from ips_path.runtime.errors import BadInputError
from ips_path.training.checkpoint import checkpoint_identity, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
# Modules that train (or run a training) may import ips_path.training.train; nothing that predicts or reads results.
TRAINING_MODULES = {"ips_path/training/train.py", "ips_path/training/cross_validation.py", "ips_path/synthetic/demo.py",
                    "ips_path/training/pretrain/run.py", "cli/train_cmd.py"}


def test_prediction_side_modules_never_import_the_training_code():
    offenders = []
    for path in sorted([*REPO_ROOT.glob("ips_path/**/*.py"), *REPO_ROOT.glob("cli/*.py")]):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative in TRAINING_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{relative}:{node.lineno}" for name in names if name == "ips_path.training.train"]
    assert not offenders


def test_importing_predict_and_loading_a_model_leaves_train_unimported(trained_run):
    script = ("import sys, ips_path.inference.predict, ips_path.stores.features, ips_path.review.report\n"
              "from ips_path.training.checkpoint import checkpoint_identity, load_model\n"
              f"load_model({str(trained_run / 'last.pt')!r})\n"
              f"checkpoint_identity({str(trained_run / 'last.pt')!r})\n"
              "print(sorted(m for m in sys.modules if m == 'ips_path.training.train'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_identity_follows_the_contents_and_is_computed_once_per_file_version(trained_run, tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    shutil.copy(trained_run / "last.pt", path)
    first = checkpoint_identity(path)
    assert first.class_names == ("negative", "positive")
    assert first.tiling == {"target_mpp": 2.0, "patch_size": 32}
    assert len(first.key) == 64 and first.key != first.sha256

    parsed = []
    real_load = checkpoint_module.load_checkpoint
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda *a: parsed.append(1) or real_load(*a))
    assert checkpoint_identity(path) == first and not parsed  # unchanged file: from the cache

    # The same path rewritten with other weights (as training moves best.pt): a new identity.
    checkpoint = load_checkpoint(path)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    torch.save(checkpoint, path)
    second = checkpoint_identity(path)
    assert parsed and second.sha256 != first.sha256 and second.key != first.key

    # A copy elsewhere is the same checkpoint.
    shutil.copy(path, tmp_path / "copy.pt")
    assert checkpoint_identity(tmp_path / "copy.pt").key == second.key


def test_identity_of_a_missing_or_foreign_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(BadInputError, match="checkpoint not found"):
        checkpoint_identity(tmp_path / "nothing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(BadInputError, match="not an ipspath training checkpoint"):
        checkpoint_identity(foreign)
