"""Generated regression cohorts: each slide's target is its lesion area.

The target is the share of the tissue that is lesion, in percent
(:meth:`~ips_path.synthetic.synth.SlideSpec.lesion_area_fraction`): 0 on slides without lesions, a few to
about 15 % with one to three lesions of 150-400 µm on a 4 x 3 mm slide. A model that finds the
lesions and measures them predicts it; one that cannot is left with the cohort's mean.
"""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np

from ips_path.runtime.atomic import write_csv
from ips_path.synthetic.synth import SlideSpec, write_synthetic_cohort

__all__ = ["write_regression_cohort"]


def write_regression_cohort(out_dir: str | os.PathLike, n_slides: int, *, column: str = "lesion_area",
                            seed: int = 0, **cohort_options: object) -> tuple[list[SlideSpec], np.ndarray]:
    """Write a generated cohort (:func:`~ips_path.synthetic.synth.write_synthetic_cohort`) whose ``manifest.csv`` also
    has ``column``: each slide's lesion area, percent of its tissue (3 decimals).

    Returns
    -------
    specs, area
        The slides and their targets (percent), in manifest order.
    """
    out_dir = pathlib.Path(out_dir)
    specs = write_synthetic_cohort(out_dir, n_slides, seed=seed, **cohort_options)
    area = np.round([100 * spec.lesion_area_fraction() for spec in specs], 3)
    manifest = out_dir / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row, value in zip(rows, area, strict=True):
        row[column] = f"{value:g}"
    write_csv(manifest, rows)
    return specs, area
