"""Survival metrics of risk scores: Harrell's and Uno's C-index, time-dependent AUC, integrated Brier score.

The statistics come from scikit-survival (the ``survival`` extra: ``pip install 'ipspath[survival]'``);
this module chooses their conventions once, turns what a cohort cannot define into NaN instead of an
exception (as :mod:`ips_path.evaluation.metrics` does), and adds percentile-bootstrap intervals.

Conventions: a higher risk means an earlier event. Harrell's C counts every comparable pair (the
earlier time is an event; at equal times an event is earlier than a censoring), risk ties count one
half. Uno's C weights the same pairs by the inverse squared probability of remaining uncensored,
estimated by Kaplan-Meier (events before censorings at equal times) on the ``reference`` cohort (the
training slides when known, else the cohort itself), and is truncated at the last time that cohort
follows up where that probability is still positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ips_path.runtime.errors import IpspathError

__all__ = ["bootstrap_interval", "default_times", "harrell_c_index", "integrated_brier_score",
           "survival_metrics", "time_dependent_auc", "uno_c_index"]

SurvivalData = tuple[np.ndarray, np.ndarray]  # (time, event)


def _sksurv() -> Any:
    try:
        import sksurv.metrics
    except ImportError:
        raise IpspathError("survival metrics need scikit-survival; install it with: "
                           "pip install 'ipspath[survival]'") from None
    return sksurv.metrics


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, dtype=np.float64))


def _arrays(time: Sequence[float], event: Sequence[int], risk: Sequence[float] | None = None
            ) -> tuple[np.ndarray, ...]:
    time = np.asarray(time, dtype=np.float64).ravel()
    event = np.asarray(event).astype(bool).ravel()
    if time.shape != event.shape:
        raise ValueError(f"{time.size} times but {event.size} events")
    if risk is None:
        return time, event
    risk = np.asarray(risk, dtype=np.float64).ravel()
    if risk.shape != time.shape:
        raise ValueError(f"{time.size} times but {risk.size} risk scores")
    return time, event, risk


def harrell_c_index(time: Sequence[float], event: Sequence[int], risk: Sequence[float]) -> float:
    """Harrell's concordance index: the share of comparable pairs whose earlier time has the higher risk.

    Returns
    -------
    float
        In [0, 1]; NaN without a comparable pair (no event) or with non-finite risks.
    """
    time, event, risk = _arrays(time, event, risk)
    metrics = _sksurv()
    if not event.any() or not np.isfinite(risk).all():
        return float("nan")
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 without comparable pairs: NaN
            return float(metrics.concordance_index_censored(event, time, risk)[0])
    except (ValueError, ZeroDivisionError):  # no comparable pair
        return float("nan")


def _truncation(reference: SurvivalData) -> float:
    """The last reference time at which the Kaplan-Meier probability of remaining uncensored is > 0."""
    from sksurv.nonparametric import CensoringDistributionEstimator

    time, event = reference
    estimator = CensoringDistributionEstimator().fit(_structured(time, event))
    positive = estimator.unique_time_[estimator.prob_ > 0]
    return float(positive[-1]) if positive.size else float("nan")


def uno_c_index(time: Sequence[float], event: Sequence[int], risk: Sequence[float],
                reference: SurvivalData | None = None) -> float:
    """Uno's inverse-probability-of-censoring weighted C-index, truncated at the reference follow-up.

    Parameters
    ----------
    time, event, risk : (n,) arrays
        The cohort scored.
    reference : (time, event), optional
        The cohort whose censoring distribution weights the pairs (the training slides); default:
        the scored cohort.

    Returns
    -------
    float
        NaN when undefined (no event before the truncation time).
    """
    time, event, risk = _arrays(time, event, risk)
    reference = _arrays(*reference) if reference is not None else (time, event)
    metrics = _sksurv()
    if not event.any() or not np.isfinite(risk).all():
        return float("nan")
    tau = _truncation(reference)
    # Scored times past the reference follow-up have no censoring weight: they count as censored at tau.
    clipped_event = event & (time < tau)
    if not clipped_event.any():
        return float("nan")
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(metrics.concordance_index_ipcw(_structured(*reference),
                                                        _structured(np.minimum(time, tau), clipped_event), risk,
                                                        tau=tau)[0])
    except (ValueError, ZeroDivisionError):
        return float("nan")


def default_times(time: Sequence[float], event: Sequence[int], quantiles: Sequence[float] = (0.25, 0.5, 0.75)
                  ) -> list[float]:
    """Evaluation times: quantiles of the observed event times (empty without events)."""
    time, event = _arrays(time, event)
    if not event.any():
        return []
    return [float(t) for t in np.quantile(time[event], quantiles)]


def time_dependent_auc(time: Sequence[float], event: Sequence[int], risk: Sequence[float], times: Sequence[float],
                       reference: SurvivalData | None = None) -> dict[float, float]:
    """Cumulative/dynamic AUC at each of ``times``: do patients with an event by t outrank those event-free at t?

    Cases are weighted by the inverse probability of censoring (Uno 2007, Hung & Chiang 2010), from
    ``reference`` as in :func:`uno_c_index`.

    Returns
    -------
    dict
        time -> AUC; NaN at a time outside the cohort's follow-up or without cases and controls.
    """
    time, event, risk = _arrays(time, event, risk)
    reference = _arrays(*reference) if reference is not None else (time, event)
    metrics = _sksurv()
    tau = _truncation(reference)
    out = {}
    for t in times:
        t = float(t)
        cases, controls = (time <= t) & event, time > t
        if not (cases.any() and controls.any() and t < tau and time.min() <= t < time.max()
                and np.isfinite(risk).all()):
            out[t] = float("nan")
            continue
        try:
            out[t] = float(metrics.cumulative_dynamic_auc(_structured(*reference), _structured(time, event), risk,
                                                          [t])[0][0])
        except (ValueError, ZeroDivisionError):
            out[t] = float("nan")
    return out


def integrated_brier_score(time: Sequence[float], event: Sequence[int], survival: np.ndarray,
                           times: Sequence[float], reference: SurvivalData | None = None) -> float:
    """Integrated Brier score of predicted survival curves over ``times`` (lower is better; 0.25 = guessing 0.5).

    Parameters
    ----------
    survival : (n, m) array
        Each slide's predicted ``P(T > t)`` at each of the m ``times`` (increasing, at least two,
        inside the cohort's follow-up).

    Returns
    -------
    float
        NaN when fewer than two times lie inside the follow-up.
    """
    time, event = _arrays(time, event)
    reference = _arrays(*reference) if reference is not None else (time, event)
    metrics = _sksurv()
    survival = np.asarray(survival, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    inside = (times >= time.min()) & (times < min(time.max(), _truncation(reference)))
    if inside.sum() < 2 or not np.isfinite(survival).all():
        return float("nan")
    try:
        return float(metrics.integrated_brier_score(_structured(*reference), _structured(time, event),
                                                    survival[:, inside], times[inside]))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, n_bootstrap: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over resamples of n items with replacement.

    Resamples where the statistic is NaN (no event drawn) are skipped.

    Returns
    -------
    (low, high)
        NaN, NaN when no resample defines the statistic.
    """
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_bootstrap)])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def survival_metrics(time: Sequence[float], event: Sequence[int], risk: Sequence[float], *,
                     reference: SurvivalData | None = None, auc_times: Sequence[float] | None = None,
                     survival: np.ndarray | None = None, survival_times: Sequence[float] | None = None,
                     n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Every survival metric of a scored cohort, with 95 % bootstrap intervals of the C-indices.

    Parameters
    ----------
    time, event, risk : (n,) arrays
    reference : (time, event), optional
        The training cohort, for the censoring weights (default: this cohort).
    auc_times : sequence of float, optional
        Times of the time-dependent AUC (default: quartiles of this cohort's event times).
    survival, survival_times : (n, m) array and (m,) times, optional
        Predicted survival curves (discrete-time model) for the integrated Brier score.
    n_bootstrap : int
        Resamples of the intervals; 0: no intervals.

    Returns
    -------
    dict
        ``c_index``, ``c_index_low``, ``c_index_high``, ``uno_c_index`` (with ``_low``/``_high``),
        ``auc_at_<t>`` per time (``t`` written with ``%g``), ``integrated_brier_score`` when curves are
        given, ``n``, ``n_events``.
    """
    time, event, risk = _arrays(time, event, risk)
    out: dict[str, float] = {"n": int(time.size), "n_events": int(event.sum())}
    for name, function in (("c_index", lambda i: harrell_c_index(time[i], event[i], risk[i])),
                           ("uno_c_index", lambda i: uno_c_index(time[i], event[i], risk[i], reference))):
        out[name] = function(np.arange(time.size))
        low, high = (bootstrap_interval(function, time.size, n_bootstrap=n_bootstrap, seed=seed)
                     if n_bootstrap and not math.isnan(out[name]) else (float("nan"), float("nan")))
        out[f"{name}_low"], out[f"{name}_high"] = low, high
    times = default_times(time, event) if auc_times is None else list(auc_times)
    for t, auc in time_dependent_auc(time, event, risk, times, reference).items():
        out[f"auc_at_{t:g}"] = auc
    if survival is not None and survival_times is not None:
        out["integrated_brier_score"] = integrated_brier_score(time, event, survival, survival_times, reference)
    return out
