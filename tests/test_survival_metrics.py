"""Survival metrics against brute-force pair counts and hand-worked cases; Kaplan-Meier risk groups."""

import math

import numpy as np
import pytest

pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")

from ips_path.evaluation.metrics import roc_auc  # noqa: E402
from ips_path.tasks.survival import (  # noqa: E402
    assign_groups,
    bootstrap_interval,
    harrell_c_index,
    integrated_brier_score,
    kaplan_meier,
    logrank_p_value,
    plot_kaplan_meier,
    risk_cutoffs,
    survival_metrics,
    time_dependent_auc,
    uno_c_index,
)


def _harrell_by_pairs(time, event, risk):
    """Every ordered pair (i, j) where i is known to fail first: i had an event and t_i < t_j, or the
    times tie and only i had an event. Concordant when i has the higher risk; risk ties count 1/2."""
    concordant = comparable = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if i == j or not event[i]:
                continue
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def _censoring_km(time, event):
    """Kaplan-Meier of the censoring times: G(t) = P(C > t); at a tied time events come first, so a
    patient whose event is at t is no longer at risk of censoring at t."""
    def survival(t):
        g = 1.0
        for u in np.unique(time[time <= t]):
            at_risk = np.sum(time >= u) - np.sum((time == u) & event)
            censored = np.sum((time == u) & ~event)
            g *= 1 - censored / at_risk
        return g
    return survival


def _uno_by_pairs(time, event, risk, tau):
    g = _censoring_km(time, event)
    numerator = denominator = 0.0
    for i in range(len(time)):
        if not event[i] or time[i] >= tau:
            continue
        weight = g(time[i]) ** -2
        for j in range(len(time)):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):  # comparable as in Harrell's
                denominator += weight
                numerator += weight * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
    return numerator / denominator


@pytest.fixture
def cohort():
    rng = np.random.default_rng(11)
    n = 60
    hazard = rng.normal(size=n)
    time = np.ceil(rng.exponential(np.exp(-hazard)) * 5)  # whole numbers: tied times
    censor = np.ceil(rng.exponential(1.5, size=n) * 5)
    event = time <= censor
    risk = np.round((hazard + rng.normal(scale=0.8, size=n)) * 2) / 2  # halves (exact in binary): tied risks
    return np.minimum(time, censor), event, risk


def test_harrell_c_index_equals_a_brute_force_pair_count_with_ties_and_censoring(cohort):
    time, event, risk = cohort
    assert harrell_c_index(time, event, risk) == pytest.approx(_harrell_by_pairs(time, event, risk))
    assert harrell_c_index(time, event, -risk) == pytest.approx(_harrell_by_pairs(time, event, -risk))


def test_harrell_c_index_on_a_hand_worked_cohort():
    # a (event at 1) against b, c, d: higher risk than b (1), tied with c (1/2), lower than d (0);
    # c (event at 3) against d: lower (0); b is censored, so b-c and b-d are not comparable.
    time, event, risk = [1, 2, 3, 4], [1, 0, 1, 0], [0.9, 0.5, 0.9, 1.0]
    assert harrell_c_index(time, event, risk) == pytest.approx((1 + 0.5 + 0 + 0) / 4)


def test_c_index_is_nan_when_the_cohort_cannot_define_it():
    assert math.isnan(harrell_c_index([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(harrell_c_index([1, 2], [1, 1], [0.1, float("nan")]))
    assert math.isnan(uno_c_index([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3]))


def test_uno_c_index_equals_an_inverse_censoring_weighted_pair_count(cohort):
    time, event, risk = cohort
    tau = time[_positive_censoring_support(time, event)].max()
    assert uno_c_index(time, event, risk) == pytest.approx(_uno_by_pairs(time, event, risk, tau), rel=1e-6)


def _positive_censoring_support(time, event):
    g = _censoring_km(time, event)
    return np.array([g(t) > 0 for t in time])


def test_uno_c_index_of_a_cohort_followed_longer_than_its_reference_is_still_defined(cohort):
    time, event, risk = cohort
    reference = (time / 3, event)  # the training cohort stopped following patients much earlier
    value = uno_c_index(time, event, risk, reference=reference)
    assert 0 <= value <= 1


def test_time_dependent_auc_without_censoring_is_the_auc_of_failing_by_t():
    rng = np.random.default_rng(5)
    risk = rng.normal(size=50)
    time = rng.exponential(np.exp(-risk)) + rng.random(50) * 0.01
    event = np.ones(50, dtype=bool)
    t = float(np.median(time))
    auc = time_dependent_auc(time, event, risk, [t, 1e9])
    assert auc[t] == pytest.approx(roc_auc(time <= t, risk))
    assert math.isnan(auc[1e9])  # after the last follow-up: no controls


def test_integrated_brier_score_of_a_coin_flip_is_a_quarter_and_of_the_truth_near_zero():
    time = np.arange(1.0, 41.0)
    event = np.ones(40, dtype=bool)
    times = np.linspace(2, 38, 19)
    coin = np.full((40, times.size), 0.5)
    assert integrated_brier_score(time, event, coin, times) == pytest.approx(0.25)
    truth = (time[:, None] > times[None, :]).astype(float)
    assert integrated_brier_score(time, event, truth, times) == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_patients():
    rng = np.random.default_rng(2)

    def width(n):
        risk = rng.normal(size=n)
        time, event = rng.exponential(np.exp(-risk)), rng.random(n) < 0.8
        low, high = bootstrap_interval(lambda i: harrell_c_index(time[i], event[i], risk[i]), n, n_bootstrap=200)
        assert low <= harrell_c_index(time, event, risk) <= high
        return high - low

    assert width(400) < width(40)


def test_survival_metrics_report_both_c_indices_with_intervals_and_auc_at_times(cohort):
    time, event, risk = cohort
    out = survival_metrics(time, event, risk, auc_times=[3.0], n_bootstrap=50)
    assert out["c_index_low"] <= out["c_index"] <= out["c_index_high"]
    assert out["uno_c_index_low"] <= out["uno_c_index"] <= out["uno_c_index_high"]
    assert set(out) >= {"auc_at_3", "n", "n_events"} and out["n_events"] == event.sum()


def test_kaplan_meier_matches_the_product_limit_by_hand():
    curve = kaplan_meier([1, 2, 2, 3, 4, 5], [1, 1, 0, 1, 0, 1])
    # 6 at risk at 1 (1 dies): 5/6; at 2: 5 at risk, 1 dies: *4/5; at 3: 3 at risk: *2/3; at 5: 1 at risk: 0
    expected = np.array([5 / 6, 5 / 6 * 4 / 5, 5 / 6 * 4 / 5 * 2 / 3, 5 / 6 * 4 / 5 * 2 / 3, 0.0])
    np.testing.assert_allclose(curve.survival, expected)
    assert (curve.low <= curve.survival + 1e-12).all() and (curve.survival <= curve.high + 1e-12).all()


def test_risk_groups_split_at_training_quantiles_and_log_rank_tells_separated_groups(tmp_path, cohort):
    time, event, risk = cohort
    assert risk_cutoffs([1, 2, 3, 4], 2) == [2.5]
    assert assign_groups([2.5, 2.6, 0.0], [2.5]).tolist() == [0, 1, 0]
    assert len(risk_cutoffs(risk, 3)) == 2
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 40)
    separated_time = np.r_[rng.exponential(10, 40), rng.exponential(1, 40)]
    assert logrank_p_value(separated_time, np.ones(80), groups) < 1e-4
    assert logrank_p_value(np.r_[separated_time[:40], separated_time[:40]], np.ones(80), groups) > 0.9
    assert math.isnan(logrank_p_value(time, event, np.zeros(time.size)))
    png = tmp_path / "km.png"
    p = plot_kaplan_meier(time, event, assign_groups(risk, risk_cutoffs(risk, 3)), png, n_groups=3,
                          time_unit="months", title="validation", c_index=0.7)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 0 <= p <= 1
    assert not list(tmp_path.glob(".*partial*"))
