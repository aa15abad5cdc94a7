"""A survival cohort's splits and their checks: patients split by event and follow-up, events in every split."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import TEST, ManifestRow, assign_folds, assign_splits
from ips_path.tasks.survival.sampling import survival_strata

__all__ = ["check_events_in_folds", "check_events_in_splits", "survival_folds", "survival_splits"]


def survival_splits(rows: Sequence[ManifestRow], *, val_fraction: float = 0.2, test_fraction: float = 0.0,
                    seed: int = 0) -> dict[str, str]:
    """Patient-level train/val/test split stratified by event status and early/late follow-up.

    Rows with a ``split`` keep it (see :func:`ips_path.slides.manifest.assign_splits`); every row needs
    ``time`` and ``event`` (``read_manifest(..., require_survival=True)``).

    Returns
    -------
    dict
        slide_id -> split.
    """
    time = {r.case_id: float(r.time) for r in rows if r.time is not None}
    event = {r.case_id: int(r.event) for r in rows if r.event is not None}
    return assign_splits(rows, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         strata=survival_strata(time, event))


def check_events_in_splits(rows: Sequence[ManifestRow], splits: Mapping[str, str], manifest: str | os.PathLike,
                           needed: Sequence[str] = ("train", "val")) -> None:
    """Refuse a split (of those ``needed`` that hold slides) whose patients are all censored.

    Without an event a split cannot train a Cox model nor define a C-index.

    Raises
    ------
    BadInputError
        Naming every such split, its slide count, and the fix.
    """
    counts: dict[str, list[int]] = {}
    for row in rows:
        split = splits.get(row.slide_id)
        if split in needed:
            counts.setdefault(split, [0, 0])
            counts[split][0] += 1
            counts[split][1] += int(row.event or 0)
    empty = [f"{split} ({n} slide(s), all censored)" for split, (n, events) in sorted(counts.items()) if events == 0]
    if empty:
        raise BadInputError(f"{manifest}: no event (event = 1) in split(s) {', '.join(empty)}; a survival model "
                            "needs events to learn and to be measured: move patients with events there, or let "
                            "ipspath split the cohort (leave the split column empty)")


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
        As :func:`~ips_path.slides.manifest.assign_folds`; a fold without a patient with an event, naming the fold
        and the fix.
    """
    time = {r.case_id: float(r.time) for r in rows if r.split != TEST and r.time is not None}
    event = {r.case_id: int(r.event) for r in rows if r.split != TEST and r.event is not None}
    folds = assign_folds(rows, k, seed=seed, strata=survival_strata(time, event))
    check_events_in_folds(rows, folds, k, manifest)
    return folds


def check_events_in_folds(rows: Sequence[ManifestRow], folds: Mapping[str, int | str], k: int,
                          manifest: str | os.PathLike) -> None:
    """Refuse folds of which one holds no patient with an event (its C-index would be undefined).

    Raises
    ------
    BadInputError
        Naming the folds and the most folds the cohort allows.
    """
    counted = [r for r in rows if folds[r.slide_id] != TEST]
    events_per_fold = np.bincount([folds[r.slide_id] for r in counted if r.event], minlength=k)
    empty = [str(fold) for fold in range(k) if events_per_fold[fold] == 0]
    if empty:  # a fold with an event validates; with every fold holding one, every fold's training set does too
        n_events = sum({r.case_id: int(r.event) for r in counted if r.event is not None}.values())
        raise BadInputError(f"{manifest}: --folds {k} leaves fold(s) {', '.join(empty)} without any patient with an "
                            f"event (event = 1): their C-index is undefined; use at most {n_events} folds (the "
                            "patients with events outside the test split)")
