"""Whether a training run is far enough to predict with.

A run writes ``last.pt`` before its first epoch (so that an interrupted first epoch can resume):
that checkpoint holds the untrained model. A cross-validation (``train --folds K``) is one run per
fold; its ensemble is the K fold models, so it predicts only once every fold has finished training
and its outcome kind's step after training (survival's risk groups). Prediction asks here first and
refuses, naming what is missing and ``--resume``, instead of predicting with random weights or part
of an ensemble.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ips_path.runtime.errors import BadInputError
from ips_path.tasks import kind_of_checkpoint
from ips_path.training.checkpoint import load_checkpoint

__all__ = ["finished_folds", "is_cross_validation", "require_trained"]


def is_cross_validation(run: Path) -> bool:
    """Whether ``run`` is the folder of a cross-validation: its ``splits.csv`` deals slides into folds."""
    try:
        with (run / "splits.csv").open(newline="", encoding="utf-8") as f:
            return "fold" in (next(csv.reader(f), None) or [])
    except OSError:
        return False


def require_trained(checkpoint: Path) -> None:
    """BadInputError unless ``checkpoint`` holds a model after at least one finished epoch."""
    epoch = int(load_checkpoint(checkpoint).get("epoch", 0))
    if epoch < 1:
        run = checkpoint.parent
        raise BadInputError(
            f"{checkpoint}: no epoch of this training run has finished yet (it holds the untrained model); "
            f"wait for its first epoch, or continue a stopped run with `ipspath train ... -o {run} --resume`")


def finished_folds(run: Path) -> list[Path]:
    """The K fold folders of the cross-validation in ``run``, in order, each finished training.

    K is what ``splits.csv`` deals the slides into; a fold is finished when its ``last.pt`` says so
    (completed or stopped early) and its kind's step after training is done; a fold with ``best.pt``
    alone (its ``last.pt`` pruned) counts as finished.

    Raises
    ------
    BadInputError
        A fold not started or not finished (naming each, and ``--resume``).
    """
    with (run / "splits.csv").open(newline="", encoding="utf-8") as f:
        folds = {int(row["fold"]) for row in csv.DictReader(f) if str(row.get("fold", "")).isdigit()}
    k = max(folds, default=-1) + 1
    unfinished = []
    for fold in range(k):
        fold_dir = run / f"fold_{fold}"
        last = fold_dir / "last.pt"
        if not last.is_file():
            if not (fold_dir / "best.pt").is_file():  # best.pt alone: a fold whose last.pt was pruned to save space
                unfinished.append(f"fold_{fold} (not started)")
            continue
        checkpoint = load_checkpoint(last)
        kind = kind_of_checkpoint(checkpoint, str(last))
        if checkpoint.get("status") == "running":
            epochs = (checkpoint.get("config") or {}).get("epochs", "?")
            unfinished.append(f"fold_{fold} (stopped after epoch {checkpoint.get('epoch', 0)} of {epochs})")
        elif kind.finishes and not kind.finished(checkpoint, fold_dir):
            unfinished.append(f"fold_{fold} (trained, its final measurement missing)")
    if unfinished:
        raise BadInputError(
            f"{run}: the cross-validation has not finished ({len(unfinished)} of its {k} folds, which its "
            f"ensemble needs: {', '.join(unfinished)}); finish it with `ipspath train ... -o {run} --folds {k} "
            "--resume`, or predict with one finished fold's folder")
    return [run / f"fold_{fold}" for fold in range(k)]
