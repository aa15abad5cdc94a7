"""Survival losses and batches against direct small computations."""

import math

import numpy as np
import pytest
import torch

from ips_path.runtime.errors import BadInputError
from ips_path.tasks.survival import (
    TimeBins,
    cox_partial_nll,
    discrete_risk,
    discrete_survival,
    discrete_time_nll,
    event_batches,
    survival_strata,
)


def _cox_by_hand(risk, time, event):
    """Breslow: each event at t against everyone with time >= t (tied times share one risk set)."""
    terms = []
    for i in range(len(risk)):
        if event[i]:
            denominator = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            terms.append(risk[i] - math.log(denominator))
    return -sum(terms) / len(terms)


def test_cox_loss_equals_the_breslow_partial_likelihood_with_tied_times():
    risk = [0.3, -1.2, 2.0, 0.5, 0.0, -0.4, 1.1]
    time = [5.0, 2.0, 2.0, 8.0, 2.0, 9.0, 5.0]  # ties at 2 (two events, one censored) and 5
    event = [1, 1, 1, 0, 0, 1, 1]
    loss = cox_partial_nll(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert float(loss) == pytest.approx(_cox_by_hand(risk, time, event), rel=1e-6)


def test_cox_loss_fits_the_same_coefficient_as_scikit_survival_breslow():
    sksurv_linear = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 2))
    time = np.round(rng.exponential(np.exp(-(x @ [1.0, -0.5]))) * 4) + 1  # rounded: many ties
    event = rng.random(80) < 0.7
    reference = sksurv_linear.CoxPHSurvivalAnalysis(ties="breslow").fit(x, Surv.from_arrays(event, time)).coef_
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event)

    def closure():
        optimizer.zero_grad()
        loss = cox_partial_nll((xt @ beta).double(), tt, et)
        loss.backward()
        return loss

    optimizer.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), reference, atol=1e-3)


def test_cox_loss_ignores_a_shift_of_all_risks_and_is_zero_without_events():
    risk, time = torch.tensor([0.1, 0.7, -0.3], requires_grad=True), torch.tensor([1.0, 2.0, 3.0])
    event = torch.tensor([1, 0, 1])
    shifted, plain = cox_partial_nll(risk + 5.0, time, event).detach(), cox_partial_nll(risk, time, event).detach()
    assert float(shifted) == pytest.approx(float(plain))
    none = cox_partial_nll(risk, time, torch.zeros(3))
    none.backward()
    assert float(none.detach()) == 0.0 and risk.grad is not None


def test_cox_loss_refuses_mismatched_lengths():
    with pytest.raises(BadInputError, match="one value per slide"):
        cox_partial_nll(torch.zeros(3), torch.zeros(2), torch.ones(3))


def _nll_by_hand(logits, bins, events):
    total = 0.0
    for row, y, e in zip(logits, bins, events, strict=True):
        h = [1 / (1 + math.exp(-v)) for v in row]
        survive_before = math.prod(1 - h[k] for k in range(y))
        total += -math.log(survive_before * h[y]) if e else -math.log(survive_before * (1 - h[y]))
    return total / len(bins)


def test_discrete_time_loss_equals_the_hazard_likelihood():
    logits = [[0.2, -1.0, 0.5, 1.5], [-2.0, 0.0, 0.3, -0.1], [1.0, 1.0, -3.0, 0.0], [0.0, 0.4, 0.2, 2.0]]
    bins, events = [0, 2, 3, 1], [1, 0, 1, 0]  # an event in the first bin, a censoring in the second
    loss = discrete_time_nll(torch.tensor(logits), torch.tensor(bins), torch.tensor(events))
    assert float(loss) == pytest.approx(_nll_by_hand(logits, bins, events), rel=1e-6)


def test_discrete_survival_curve_falls_and_its_risk_orders_patients():
    logits = torch.tensor([[-3.0, -3.0, -3.0], [2.0, 2.0, 2.0]])
    curves = discrete_survival(logits)
    assert (curves[:, 1:] <= curves[:, :-1]).all()
    assert float(curves[0, 0]) == pytest.approx(1 - 1 / (1 + math.exp(3)))
    risk = discrete_risk(logits)
    assert float(risk[1]) > float(risk[0])  # high hazards: higher risk


def test_discrete_time_loss_refuses_bins_outside_the_head():
    with pytest.raises(BadInputError, match="time bins must be in 0..2"):
        discrete_time_nll(torch.zeros(2, 3), torch.tensor([0, 3]), torch.tensor([1, 1]))


def test_time_bins_cut_at_event_time_quantiles_and_index_by_interval():
    time = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    event = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])  # the censored 100 does not move the cut points
    bins = TimeBins.from_quantiles(time, event, 4)
    assert bins.edges == (0.0, 2.75, 4.5, 6.25, float("inf"))
    assert bins.index(np.array([0.5, 2.75, 2.76, 6.3, 1e9])).tolist() == [0, 0, 1, 3, 3]
    curves = np.array([[0.9, 0.8, 0.5, 0.2]])
    # before the first cut: 1; from a bin's end on: the survival past that bin
    assert bins.survival_at(curves, np.array([1.0, 2.75, 5.0, 50.0])).tolist() == [[1.0, 0.9, 0.8, 0.5]]


def test_time_bins_name_the_largest_usable_count_when_event_times_tie():
    with pytest.raises(BadInputError, match="use --time-bins 2 or fewer"):
        TimeBins.from_quantiles(np.array([3.0, 3, 3, 3, 9]), np.array([1, 1, 1, 1, 1]), 4)
    with pytest.raises(BadInputError, match="no events"):
        TimeBins.from_quantiles(np.array([3.0, 4]), np.array([0, 0]), 2)


@pytest.mark.parametrize(("n", "n_events", "batch_size"), [(20, 10, 4), (23, 3, 4), (9, 9, 4), (5, 1, 2)])
def test_every_cox_batch_holds_an_event_and_every_slide_comes_once(n, n_events, batch_size):
    events = np.zeros(n, dtype=bool)
    events[np.random.default_rng(0).choice(n, n_events, replace=False)] = True
    batches = event_batches(events, batch_size, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(events[b].any() for b in batches)
    assert len(batches) == min(-(-n // batch_size), n_events)
    sizes = [len(b) for b in batches]
    assert max(sizes) - min(sizes) <= 1


def test_event_batches_repeat_with_the_seed_and_change_with_it():
    events = np.arange(30) % 3 == 0
    first = event_batches(events, 4, np.random.default_rng(7))
    assert first == event_batches(events, 4, np.random.default_rng(7))
    assert first != event_batches(events, 4, np.random.default_rng(8))


def test_survival_strata_separate_events_from_censorings_and_early_from_late():
    time = {"a": 1.0, "b": 2.0, "c": 9.0, "d": 10.0, "e": 3.0, "f": 30.0}
    event = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 0, "f": 0}
    strata = survival_strata(time, event)
    assert strata == {"a": "event:0", "b": "event:0", "c": "event:1", "d": "event:1", "e": "censored:0",
                      "f": "censored:1"}
