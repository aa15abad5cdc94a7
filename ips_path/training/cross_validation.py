"""Patient-level stratified k-fold cross-validation of ``ipspath train`` (``--folds K``).

A cross-validated run folder holds::

    splits.csv       slide_id, case_id, label (each label column; survival: time, event), fold
                     (0..K-1, or "test" for the fixed external test split)
    fold_0/ ...      one ordinary training run per fold: the fold validates, the other folds train
    cv_summary.json  per fold and mean +- sd (over the folds) of the validation AUC, balanced accuracy
                     and AUPRC at each fold's best epoch (several label columns: their mean over the
                     tasks, then each task's as <task>_auc ...); for survival, Harrell's and Uno's
                     C-index of the fold's best weights (its ``survival_metrics.json``)

Folds are drawn once (seeded) and kept: a patient (``case_id``) is never in two folds, and each label
(several label columns: each class of the first column) is spread evenly over the folds; a survival
cohort is stratified instead by event status and early/late follow-up
(:func:`~ips_path.survival.survival_strata`), and a fold whose patients hold no event (as
validation, or as the rest for training) is refused before any training. Slides whose manifest
``split`` is ``test`` stay out of every fold.
Each fold is a resumable run of its own, so an interrupted cross-validation continues fold by fold
with ``--resume``; a finished fold is not trained again.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.locks import output_lock
from ips_path.slides.manifest import ManifestRow, read_manifest
from ips_path.survival.sampling import survival_strata
from ips_path.training.checkpoint import load_checkpoint
from ips_path.training.config import TrainConfig, save_config
from ips_path.training.run_folder import write_csv
from ips_path.training.train import train

log = logging.getLogger(__name__)

__all__ = ["CV_METRICS", "CrossValidationResult", "SURVIVAL_CV_METRICS", "assign_folds", "fold_splits",
           "format_cv_table", "summarise_folds", "survival_folds", "train_cross_validated"]

CV_METRICS = ("auc", "balanced_accuracy", "auprc")
SURVIVAL_CV_METRICS = ("c_index", "uno_c_index")
TEST = "test"


@dataclass
class CrossValidationResult:
    """What :func:`train_cross_validated` returns.

    Attributes
    ----------
    run_dir : Path
    folds : list of dict
        Per fold: ``fold``, ``best_epoch``, ``val_<metric>`` for each of :data:`CV_METRICS` (several label
        columns: also ``val_<task>_<metric>``; survival: :data:`SURVIVAL_CV_METRICS`), ``status``.
    summary : dict
        ``mean`` and ``sd`` (sample standard deviation over the folds) of each metric.
    """

    run_dir: Path
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]


def assign_folds(rows: Sequence[ManifestRow], k: int, seed: int = 0,
                 strata: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """Patient-level folds stratified by label: slide_id -> fold index, or ``"test"``.

    Patients (``case_id``) are grouped by the label of their first slide, shuffled with ``seed`` within
    each label, and dealt out round-robin; the deal continues from label to label, so fold sizes differ
    by at most one patient. Slides with manifest split ``test`` get ``"test"``. ``strata`` (case_id ->
    stratum, e.g. :func:`~ips_path.survival.survival_strata`) replaces the label as what each fold
    keeps in proportion.

    Raises
    ------
    BadInputError
        Fewer than ``k`` patients outside the test split, or ``k < 2``.
    """
    if k < 2:
        raise BadInputError(f"--folds must be at least 2, got {k}")
    cases: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        if r.split != TEST:
            cases[r.case_id].append(r)
    if len(cases) < k:
        raise BadInputError(f"--folds {k} needs at least {k} patients outside the test split, found {len(cases)}")
    by_label: dict[str, list[str]] = defaultdict(list)
    for case_id, case_rows in cases.items():
        by_label[strata[case_id] if strata is not None else str(case_rows[0].label)].append(case_id)
    rng = random.Random(seed)
    fold_of_case: dict[str, int] = {}
    dealt = 0
    for label in sorted(by_label):
        case_ids = sorted(by_label[label])
        rng.shuffle(case_ids)
        for case_id in case_ids:
            fold_of_case[case_id] = dealt % k
            dealt += 1
    return {r.slide_id: TEST if r.split == TEST else fold_of_case[r.case_id] for r in rows}


def survival_folds(rows: Sequence[ManifestRow], k: int, manifest: str | os.PathLike, seed: int = 0
                   ) -> dict[str, int | str]:
    """Patient-level folds of a survival cohort, stratified by event status and early/late follow-up.

    Parameters
    ----------
    rows : sequence of ManifestRow
        With ``time`` and ``event`` (``read_manifest(..., require_survival=True)``).
    k : int
        Number of folds.
    manifest : path-like
        Named in messages.

    Raises
    ------
    BadInputError
        As :func:`assign_folds`; a fold without a patient with an event, naming the fold and the fix.
    """
    time = {r.case_id: float(r.time) for r in rows if r.split != TEST and r.time is not None}
    event = {r.case_id: int(r.event) for r in rows if r.split != TEST and r.event is not None}
    folds = assign_folds(rows, k, seed=seed, strata=survival_strata(time, event))
    events_per_fold = np.bincount([folds[r.slide_id] for r in rows if r.split != TEST and r.event], minlength=k)
    empty = [str(fold) for fold in range(k) if events_per_fold[fold] == 0]
    if empty:  # a fold with an event validates; with every fold holding one, every fold's training set does too
        raise BadInputError(f"{manifest}: --folds {k} leaves fold(s) {', '.join(empty)} without any patient with an "
                            f"event (event = 1): their C-index is undefined; use at most {sum(event.values())} "
                            "folds (the patients with events outside the test split)")
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
        As :func:`~ips_path.training.train.train`; a survival fold without events; a resume whose manifest no
        longer gives the saved folds; a fresh run into a folder that holds one.
    """
    out_dir = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInputError("--folds runs one process; start it without torchrun (each fold may use one GPU)")
    survival = config.task == "survival"
    columns = ("label",) if survival else config.label_column_names
    metrics = SURVIVAL_CV_METRICS if survival else CV_METRICS
    if len(columns) > 1:  # several label columns: the mean over the tasks, then each task's
        metrics += tuple(f"{column}_{m}" for column in columns for m in CV_METRICS)
    rows = read_manifest(manifest, require_label=not survival, check_files=False, require_survival=survival,
                         label_columns=columns, label_case=config.label_case)
    assigned = (survival_folds(rows, folds, manifest, seed=config.seed) if survival
                else assign_folds(rows, folds, seed=config.seed))
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
            outcome = ((lambda r: {"time": r.time, "event": r.event}) if survival else
                       (lambda r: dict(zip(columns, r.labels, strict=True))))
            write_csv(splits_path, [{"slide_id": r.slide_id, "case_id": r.case_id, **outcome(r),
                                     "fold": assigned[r.slide_id]} for r in rows])
        results = []
        for fold in range(folds):
            fold_dir = out_dir / f"fold_{fold}"
            log.info("fold %d of %d (%s)", fold + 1, folds, fold_dir)
            status = _measured_survival_fold(fold_dir) if survival else None
            if status is None:  # a finished survival fold is not measured again (a finished run would be)
                status = train(manifest, tiles_dir, fold_dir, config, resume=(fold_dir / "last.pt").is_file(),
                               progress=progress, splits=fold_splits(assigned, fold)).status
            results.append(_survival_fold_row(fold, fold_dir, status) if survival
                           else _fold_row(fold, fold_dir, status, metrics))
        summary = summarise_folds(results, metrics)
        _write_summary(out_dir / "cv_summary.json", folds, results, summary, config, metrics)
    log.info("cross-validation over %d folds:\n%s", folds, format_cv_table(results, summary, metrics))
    return CrossValidationResult(out_dir, results, summary)


def _fold_row(fold: int, fold_dir: Path, status: str, metrics: Sequence[str] = CV_METRICS) -> dict[str, Any]:
    """The validation ``metrics`` of a fold at its best epoch (from best.pt's history)."""
    best = fold_dir / "best.pt"
    row: dict[str, Any] = {"fold": fold, "status": status, "best_epoch": None}
    row.update({f"val_{m}": float("nan") for m in metrics})
    if best.is_file():
        checkpoint = load_checkpoint(best)
        epoch = int(checkpoint["epoch"])
        history = {int(h["epoch"]): h for h in checkpoint["history"]}
        row["best_epoch"] = epoch
        row.update({f"val_{m}": float(history[epoch].get(f"val_{m}", float("nan"))) for m in metrics})
    return row


def _measured_survival_fold(fold_dir: Path) -> str | None:
    """The status of a survival fold that finished training and its final measurement, else None.

    The measurement writes ``survival_metrics.json``, then the risk cut points into ``best.pt`` and last
    into ``last.pt``: cut points in ``last.pt`` mean all of it is there.
    """
    last = fold_dir / "last.pt"
    if not last.is_file() or not (fold_dir / "survival_metrics.json").is_file():
        return None
    checkpoint = load_checkpoint(last)
    measured = (checkpoint.get("survival") or {}).get("risk_cutoffs") is not None
    return str(checkpoint["status"]) if measured and checkpoint["status"] != "running" else None


def _survival_fold_row(fold: int, fold_dir: Path, status: str) -> dict[str, Any]:
    """Harrell's and Uno's C-index of a fold's validation patients with its best weights."""
    row: dict[str, Any] = {"fold": fold, "status": status, "best_epoch": None}
    best, measured = fold_dir / "best.pt", fold_dir / "survival_metrics.json"
    if best.is_file():
        row["best_epoch"] = int(load_checkpoint(best)["epoch"])
    validation = json.loads(measured.read_text(encoding="utf-8")).get("validation", {}) if measured.is_file() else {}
    row.update({f"val_{m}": float("nan") if validation.get(m) is None else float(validation[m])
                for m in SURVIVAL_CV_METRICS})
    return row


def summarise_folds(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = CV_METRICS
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
                    metrics: Sequence[str] = CV_METRICS) -> str:
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
