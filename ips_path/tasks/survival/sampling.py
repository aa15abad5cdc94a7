"""Batches and splits for survival data: every Cox batch holds an event; splits keep the event mix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["event_batches", "survival_strata"]


def event_batches(events: Sequence[bool | int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle slides into batches of about ``batch_size`` that each hold at least one event.

    The Cox partial likelihood ranks the slides of a batch against its events, so a batch of only
    censored slides would teach nothing. Events are dealt one to each batch first, then the
    remaining slides fill the batches in random order.

    Parameters
    ----------
    events : sequence of bool or 0/1
        Whether each slide's event was observed.
    batch_size : int
        Slides per batch; with fewer events than ``ceil(n / batch_size)`` there are as many batches
        as events, each then larger than ``batch_size``.
    rng : numpy Generator
        Source of the shuffling (seed it for reproducible epochs).

    Returns
    -------
    list of list of int
        Indices into ``events``; every index appears exactly once. Without any event: plain shuffled
        batches (the loss is then 0 and the caller should have refused the data).
    """
    observed = np.asarray(events).astype(bool)
    n = observed.size
    order = rng.permutation(n)
    if n == 0:
        return []
    n_batches = -(-n // batch_size)
    with_event, without_event = order[observed[order]], order[~observed[order]]
    if with_event.size == 0:
        return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    n_batches = min(n_batches, with_event.size)
    rest = rng.permutation(np.concatenate([with_event[n_batches:], without_event]))
    sizes = np.full(n_batches, n // n_batches) + (np.arange(n_batches) < n % n_batches)
    batches, start = [], 0
    for b in range(n_batches):
        take = sizes[b] - 1
        batch = [int(with_event[b]), *rest[start:start + take].tolist()]
        start += take
        batches.append([batch[i] for i in rng.permutation(len(batch))])
    return batches


def survival_strata(time: Mapping[str, float], event: Mapping[str, int], n_time_groups: int = 2) -> dict[str, str]:
    """A stratum per key (patient or slide) for splitting: its event status and its time group.

    Events and censored patients are each cut at their own time quantiles into ``n_time_groups``
    groups, so a split stratified by these keeps both the event rate and the spread of follow-up.

    Returns
    -------
    dict
        key -> ``"event:<g>"`` or ``"censored:<g>"``, ``g`` in ``0..n_time_groups-1``.
    """
    strata = {}
    for status, name in ((1, "event"), (0, "censored")):
        keys = sorted(k for k in time if int(event[k]) == status)
        if not keys:
            continue
        times = np.array([time[k] for k in keys], dtype=np.float64)
        cuts = np.quantile(times, np.arange(1, n_time_groups) / n_time_groups)
        groups = np.searchsorted(cuts, times, side="right")
        strata.update({k: f"{name}:{int(g)}" for k, g in zip(keys, groups, strict=True)})
    return strata
