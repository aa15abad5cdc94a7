"""A manifest of a cohort's first slides, for tests that need a few of them."""

from __future__ import annotations

import csv
from pathlib import Path


def first_slides(manifest: Path, n: int, out: Path) -> list[dict[str, str]]:
    """Write the first ``n`` rows of ``manifest`` to ``out`` with absolute slide paths; returns the rows."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    for row in rows:
        row["slide_path"] = str(manifest.parent / row["slide_path"])
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    return rows
