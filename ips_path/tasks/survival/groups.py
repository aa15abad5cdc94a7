"""Risk groups and their Kaplan-Meier curves: cut points from the training risks, log-rank test, PNG.

A model's risk scores are turned into groups (low/high at the median of the training risks, or
low/intermediate/high at its tertiles); the Kaplan-Meier survival curve of each group and the
log-rank p-value of their difference show whether the ranking separates outcomes.
Statistics from scikit-survival (the ``survival`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError
from ips_path.tasks.survival.metrics import _arrays, _sksurv, _structured

__all__ = ["GROUP_NAMES", "KaplanMeier", "assign_groups", "kaplan_meier", "logrank_p_value", "plot_kaplan_meier",
           "risk_cutoffs"]

GROUP_NAMES = {2: ("low risk", "high risk"), 3: ("low risk", "intermediate risk", "high risk")}


def risk_cutoffs(reference_risk: Sequence[float], n_groups: int = 2) -> list[float]:
    """Cut points between risk groups: the median (2 groups) or tertiles (3) of the reference (training) risks."""
    if n_groups not in GROUP_NAMES:
        raise BadInputError(f"risk groups: 2 (median split) or 3 (tertiles), got {n_groups}")
    risk = np.asarray(reference_risk, dtype=np.float64)
    risk = risk[np.isfinite(risk)]
    if risk.size == 0:
        raise BadInputError("risk groups need finite reference risk scores")
    return [float(q) for q in np.quantile(risk, np.arange(1, n_groups) / n_groups)]


def assign_groups(risk: Sequence[float], cutoffs: Sequence[float]) -> np.ndarray:
    """Group index of each risk: 0 = lowest; a risk equal to a cut point goes to the lower group."""
    return np.searchsorted(np.asarray(cutoffs, dtype=np.float64), np.asarray(risk, dtype=np.float64), side="left")


@dataclass(frozen=True)
class KaplanMeier:
    """A Kaplan-Meier curve: survival just after each distinct time, with its 95 % log-log band."""

    time: np.ndarray
    survival: np.ndarray
    low: np.ndarray
    high: np.ndarray


def kaplan_meier(time: Sequence[float], event: Sequence[int]) -> KaplanMeier:
    """The Kaplan-Meier estimate of ``P(T > t)`` of a group."""
    from sksurv.nonparametric import kaplan_meier_estimator

    _sksurv()
    time, event = _arrays(time, event)
    times, survival, (low, high) = kaplan_meier_estimator(event, time, conf_type="log-log")
    return KaplanMeier(times, survival, low, high)


def logrank_p_value(time: Sequence[float], event: Sequence[int], groups: Sequence[int]) -> float:
    """p-value of the log-rank test that the groups share one survival curve (NaN with < 2 groups or no event)."""
    from sksurv.compare import compare_survival

    _sksurv()
    time, event = _arrays(time, event)
    groups = np.asarray(groups)
    if np.unique(groups).size < 2 or not event.any():
        return float("nan")
    try:
        return float(compare_survival(_structured(time, event), groups)[1])
    except ValueError:
        return float("nan")


def plot_kaplan_meier(time: Sequence[float], event: Sequence[int], groups: Sequence[int], path: str | os.PathLike,
                      *, n_groups: int = 2, time_unit: str = "", title: str = "",
                      c_index: float | None = None) -> float:
    """Draw the Kaplan-Meier curve of each risk group to a PNG, atomically, and return the log-rank p-value.

    Parameters
    ----------
    time, event : (n,) arrays
    groups : (n,) int array
        Group of each patient, ``0..n_groups-1`` (:func:`assign_groups`).
    path : path-like
        Output PNG.
    n_groups : {2, 3}
    time_unit : str
        Shown on the time axis (``--time-unit``).
    title : str
        First line of the title (the cohort); the log-rank p-value and ``c_index`` follow.
    """
    from matplotlib.figure import Figure

    time, event = _arrays(time, event)
    groups = np.asarray(groups)
    p_value = logrank_p_value(time, event, groups)
    fig = Figure(figsize=(6, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    colours = ("tab:blue", "tab:orange", "tab:red") if n_groups == 3 else ("tab:blue", "tab:red")
    for g, (name, colour) in enumerate(zip(GROUP_NAMES[n_groups], colours, strict=True)):
        member = groups == g
        if not member.any():
            continue
        curve = kaplan_meier(time[member], event[member])
        ax.step(np.r_[0.0, curve.time], np.r_[1.0, curve.survival], where="post", color=colour,
                label=f"{name} (n = {int(member.sum())}, {int(event[member].sum())} events)")
        ax.fill_between(np.r_[0.0, curve.time], np.r_[1.0, curve.low], np.r_[1.0, curve.high], step="post",
                        color=colour, alpha=0.15, linewidth=0)
        censored = member & ~event
        if censored.any():  # tick marks at censoring times, on the group's curve
            at = np.searchsorted(curve.time, time[censored], side="right") - 1
            ax.plot(time[censored], np.where(at >= 0, curve.survival[np.maximum(at, 0)], 1.0), "|", color=colour,
                    markersize=8)
    subtitle = f"log-rank p = {p_value:.2g}" if np.isfinite(p_value) else "log-rank p undefined"
    if c_index is not None and np.isfinite(c_index):
        subtitle += f", C-index {c_index:.3f}"
    ax.set(xlabel=f"time ({time_unit})" if time_unit else "time", ylabel="survival probability",
           ylim=(-0.02, 1.02), xlim=(0, None), title=f"{title}\n{subtitle}" if title else subtitle)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small", loc="lower left")
    write_atomically(Path(path), lambda partial: fig.savefig(partial, format="png"))
    return p_value
