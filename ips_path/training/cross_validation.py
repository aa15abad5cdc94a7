"""Patient-level stratified k-fold cross-validation of ``ipspath train`` (``--folds K``).

A cross-validated run folder holds::

    splits.csv       slide_id, case_id, the outcome columns (:meth:`~ips_path.tasks.OutcomeKind.outcome_columns`),
                     fold (0..K-1, or "test" for the fixed external test split)
    fold_0/ ...      one ordinary training run per fold: the fold validates, the other folds train
    cv_summary.json  per fold and mean +- sd (over the folds) of the outcome kind's metrics
                     (:attr:`~ips_path.tasks.OutcomeKind.cv_metrics`, e.g. the validation AUC, balanced accuracy
                     and AUPRC at each fold's best epoch)

Folds are drawn once (seeded) and kept: a patient (``case_id``) is never in two folds, and each stratum
of the outcome kind (:meth:`~ips_path.tasks.OutcomeKind.strata`; by default the label of the first
label column) is spread evenly over the folds; folds the kind cannot measure are refused before any
training (:meth:`~ips_path.tasks.OutcomeKind.check_folds`). Slides whose manifest ``split`` is
``test`` stay out of every fold.
Each fold is a resumable run of its own, so an interrupted cross-validation continues fold by fold
with ``--resume``; a finished fold is not trained again.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.config import TrainConfig, save_config
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.locks import output_lock
from ips_path.slides.manifest import TEST, ManifestRow, assign_folds
from ips_path.tasks import OutcomeKind, kind_for
from ips_path.training.checkpoint import load_checkpoint
from ips_path.training.run_folder import write_csv
from ips_path.training.train import train

log = logging.getLogger(__name__)

__all__ = ["CrossValidationResult", "assign_folds", "fold_splits", "format_cv_table", "kind_folds",
           "summarise_folds", "train_cross_validated"]



@dataclass
class CrossValidationResult:
    """What :func:`train_cross_validated` returns.

    Attributes
    ----------
    run_dir : Path
    folds : list of dict
        Per fold: ``fold``, ``best_epoch``, ``val_<metric>`` for each of the kind's ``cv_metrics``, ``status``.
    summary : dict
        ``mean`` and ``sd`` (sample standard deviation over the folds) of each metric.
    """

    run_dir: Path
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]


def kind_folds(kind: OutcomeKind, rows: Sequence[ManifestRow], k: int, manifest: str | os.PathLike, seed: int = 0
               ) -> dict[str, int | str]:
    """Patient-level folds stratified as the outcome kind says (:meth:`~ips_path.tasks.OutcomeKind.strata` of the
    slides outside the test split; by label by default), checked by the kind before any fold trains.

    Raises
    ------
    BadInputError
        As :func:`assign_folds`; folds the kind cannot measure (e.g. a fold without an event).
    """
    folds = assign_folds(rows, k, seed=seed, strata=kind.strata([r for r in rows if r.split != TEST]))
    kind.check_folds(rows, folds, k, manifest)
    return folds


def fold_splits(folds: Mapping[str, int | str], fold: int) -> dict[str, str]:
    """The train/val/test split of every slide for the run of ``fold`` (it validates, the others train)."""
    return {slide_id: TEST if f == TEST else "val" if f == fold else "train" for slide_id, f in folds.items()}


def _read_folds(path: Path) -> dict[str, int | str]:
    with path.open(newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row["fold"] if row["fold"] == TEST else int(row["fold"]) for row in csv.DictReader(f)}


def train_cross_validated(manifest: str | os.PathLike, tiles_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          config: TrainConfig, folds: int, *, resume: bool = False,
                          progress: bool = True) -> CrossValidationResult:
    """Train one model per fold of a patient-level stratified k-fold split; see the module docstring.

    Parameters
    ----------
    manifest, tiles_dir : path-like
        As for :func:`ips_path.training.train.train`.
    out_dir : path-like
        The cross-validated run folder (``fold_<i>`` runs inside).
    config : TrainConfig
        Settings of every fold's run (``val_fraction`` is not used: the fold is the validation set).
    folds : int
        K >= 2.
    resume : bool
        Continue an interrupted cross-validation: finished folds are kept, the others resumed or started.

    Raises
    ------
    BadInputError
        As :func:`~ips_path.training.train.train`; folds the kind cannot measure; a resume whose manifest no
        longer gives the saved folds; a fresh run into a folder that holds one.
    """
    out_dir = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInputError("--folds runs one process; start it without torchrun (each fold may use one GPU)")
    kind = kind_for(config)
    metrics = kind.cv_metrics
    rows = kind.read_manifest(manifest, training=True)
    assigned = kind_folds(kind, rows, folds, manifest, seed=config.seed)
    with output_lock(out_dir):
        splits_path = out_dir / "splits.csv"
        if splits_path.is_file():
            if not resume:
                raise BadInputError(f"{out_dir} already holds a cross-validation (splits.csv); continue it with "
                                    "--resume, or give another output folder")
            saved = _read_folds(splits_path)
            if saved != assigned:
                changed = sorted(set(saved) ^ set(assigned)) or sorted(s for s in saved if saved[s] != assigned.get(s))
                raise BadInputError(f"the manifest's slides, labels, outcomes or patients changed since the "
                                    f"cross-validation started ({listing(changed)}); resume with the manifest "
                                    f"it started with ({splits_path}), or start a new run in another folder")
        elif resume:
            raise BadInputError(f"{out_dir}: no splits.csv of a cross-validation to resume; start it without --resume")
        else:
            save_config(config, out_dir / "config.yaml")
            write_csv(splits_path, [{"slide_id": r.slide_id, "case_id": r.case_id, **kind.outcome_columns(r),
                                     "fold": assigned[r.slide_id]} for r in rows])
        results = []
        for fold in range(folds):
            fold_dir = out_dir / f"fold_{fold}"
            log.info("fold %d of %d (%s)", fold + 1, folds, fold_dir)
            status = _finished_fold(kind, fold_dir)
            if status is None:  # a fold whose kind finished its step after training is not measured again
                status = train(manifest, tiles_dir, fold_dir, config, resume=(fold_dir / "last.pt").is_file(),
                               progress=progress, splits=fold_splits(assigned, fold)).status
            results.append(_fold_row(kind, fold, fold_dir, status))
        summary = summarise_folds(results, metrics)
        _write_summary(out_dir / "cv_summary.json", folds, results, summary, config, metrics)
    log.info("cross-validation over %d folds:\n%s", folds, format_cv_table(results, summary, metrics))
    return CrossValidationResult(out_dir, results, summary)


def _fold_row(kind: OutcomeKind, fold: int, fold_dir: Path, status: str) -> dict[str, Any]:
    """The validation metrics of a fold with its best weights (:meth:`~ips_path.tasks.OutcomeKind.fold_metrics`)."""
    best = fold_dir / "best.pt"
    checkpoint = load_checkpoint(best) if best.is_file() else None
    return {"fold": fold, "status": status, "best_epoch": None if checkpoint is None else int(checkpoint["epoch"]),
            **kind.fold_metrics(fold_dir, checkpoint)}


def _finished_fold(kind: OutcomeKind, fold_dir: Path) -> str | None:
    """The status of a fold that finished training and its kind's step after it, else None."""
    last = fold_dir / "last.pt"
    if not kind.finishes or not last.is_file():
        return None
    checkpoint = load_checkpoint(last)
    return str(checkpoint["status"]) if kind.finished(checkpoint, fold_dir) else None


def summarise_folds(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation over the folds of each of ``metrics`` (NaN folds left out)."""
    summary = {}
    for metric in metrics:
        values = np.array([r[f"val_{metric}"] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        summary[metric] = {"mean": float(values.mean()) if values.size else float("nan"),
                           "sd": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                           "n_folds": int(values.size)}
    return summary


def format_cv_table(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, float]],
                    metrics: Sequence[str]) -> str:
    """The per-fold table and the mean +- sd line, as the log shows them."""
    header = f"{'fold':>6}  {'best epoch':>10}  " + "  ".join(f"{m:>17}" for m in metrics)
    lines = [header]
    for r in rows:
        epoch = "-" if r["best_epoch"] is None else str(r["best_epoch"])
        lines.append(f"{r['fold']:>6}  {epoch:>10}  " + "  ".join(f"{r[f'val_{m}']:>17.3f}" for m in metrics))
    lines.append(f"{'mean':>6}  {'':>10}  " + "  ".join(
        f"{summary[m]['mean']:>8.3f} +- {summary[m]['sd']:<5.3f}" for m in metrics))
    return "\n".join(lines)


def _write_summary(path: Path, k: int, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                   config: TrainConfig, metrics: Sequence[str]) -> None:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    document = {"folds": k, "metrics": list(metrics),
                "per_fold": [{key: clean(v) for key, v in r.items()} for r in rows],
                "summary": {m: {key: clean(v) for key, v in s.items()} for m, s in summary.items()},
                "config": config.as_dict()}
    text = json.dumps(document, indent=2)
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
