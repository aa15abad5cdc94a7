"""Generated survival cohorts: follow-up times that depend on the lesion burden of each slide.

Each patient's event time is drawn from an exponential distribution whose rate grows with the
share of the tissue that is lesion (:meth:`~ips_path.synthetic.synth.SlideSpec.lesion_area_fraction`):
``rate = base_rate * exp(log_hazard_per_percent * lesion percent)``; an independent exponential
censoring time and the end of follow-up censor it. So a model that finds and measures the lesions
can rank the patients, and one that cannot stays at a C-index of 0.5.
"""

from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ips_path.runtime.atomic import write_atomically
from ips_path.synthetic.synth import SlideSpec, write_synthetic_cohort

__all__ = ["SurvivalOutcomes", "draw_survival", "write_survival_cohort"]


@dataclass(frozen=True)
class SurvivalOutcomes:
    """How outcomes are drawn, in months.

    Attributes
    ----------
    base_rate : float
        Event rate per month of a patient without lesions (1/60: a mean of five years).
    log_hazard_per_percent : float
        Increase of the log event rate per percent of the tissue that is lesion (0.2: a slide
        with 5 % lesion has a 2.7 times higher rate, one with 15 % a 20 times higher; lesions of
        200-400 µm on 4 x 3 mm slides cover 3-15 % of the tissue).
    censoring_rate : float
        Rate per month of the random (independent) censoring.
    follow_up : float
        End of the study, months: later times are censored there.
    """

    base_rate: float = 1 / 60
    log_hazard_per_percent: float = 0.2
    censoring_rate: float = 1 / 120
    follow_up: float = 120.0


def draw_survival(specs: Sequence[SlideSpec], outcomes: SurvivalOutcomes, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Draw a (time, event) for each slide from its lesion area.

    Returns
    -------
    time : (n,) float array
        Months, rounded to 0.1 (> 0).
    event : (n,) int array
        1 = the event was observed, 0 = censored.
    """
    percent = np.array([100 * spec.lesion_area_fraction() for spec in specs])
    rate = outcomes.base_rate * np.exp(outcomes.log_hazard_per_percent * percent)
    event_time = rng.exponential(1 / rate)
    censor_time = np.minimum(rng.exponential(1 / outcomes.censoring_rate, size=len(specs)), outcomes.follow_up)
    event = (event_time <= censor_time).astype(int)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 1), 0.1)
    return time, event


def write_survival_cohort(out_dir: str | os.PathLike, n_slides: int, *,
                          outcomes: SurvivalOutcomes = SurvivalOutcomes(), seed: int = 0, **cohort_options: object
                          ) -> tuple[list[SlideSpec], np.ndarray, np.ndarray]:
    """Write a generated cohort (:func:`~ips_path.synthetic.synth.write_synthetic_cohort`) whose ``manifest.csv``
    also has ``time`` (months) and ``event`` columns drawn by :func:`draw_survival`.

    Returns
    -------
    specs, time, event
    """
    out_dir = pathlib.Path(out_dir)
    specs = write_synthetic_cohort(out_dir, n_slides, seed=seed, **cohort_options)
    time, event = draw_survival(specs, outcomes, np.random.default_rng([seed, 11]))
    manifest = out_dir / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row, t, e in zip(rows, time, event, strict=True):
        row.update(time=f"{t:g}", event=str(int(e)))

    def write(partial: pathlib.Path) -> None:
        with partial.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(manifest, write)
    return specs, time, event
