"""A survival cohort's splits and their checks: patients split by event and follow-up, events in every split."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import ManifestRow, assign_splits
from ips_path.survival.sampling import survival_strata

__all__ = ["check_events_in_splits", "survival_splits"]


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
