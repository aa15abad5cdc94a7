"""Survival losses over a batch of slides: Cox partial likelihood and discrete-time hazards.

Two ways to learn from (time, event) pairs, ``event`` = 1 when the event was observed at ``time``
and 0 when the patient was censored then (still event-free at their last follow-up):

* Cox: the model gives one risk score ``eta`` per slide; the loss is the negative log partial
  likelihood over the batch, with Breslow's handling of tied times (every patient still at risk at a
  tied time is in the risk set of each event at that time). It ranks patients only within the batch,
  so a batch needs at least one event (:func:`~ips_path.tasks.survival.sampling.event_batches`).
* Discrete time (Zadeh & Schmid 2021, the loss of Patch-GCN and MCAT): follow-up is cut into K
  bins at quantiles of the training event times (:class:`TimeBins`); the model gives K logits,
  one hazard ``h_k = sigmoid(logit_k)`` per bin (the probability of the event in bin k given
  survival to its start), so the survival past bin k is ``S_k = prod_{j<=k} (1 - h_j)``. An event in
  bin y contributes ``-log S_{y-1} - log h_y``; a patient censored in bin y contributes
  ``-log S_y``. Its risk score is ``-sum_k S_k`` (a shorter expected survival is a higher risk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ips_path.model.tasks import HeadKind, Task, register_head_kind
from ips_path.runtime.errors import BadInputError

__all__ = ["SURVIVAL_HEAD", "SURVIVAL_TARGET_COLUMNS", "TimeBins", "cox_partial_nll", "discrete_risk",
           "discrete_survival", "discrete_time_nll"]


def cox_partial_nll(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox log partial likelihood of a batch, Breslow ties, averaged over its events.

    ``-(1/n_events) * sum_{i: event} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]``

    Parameters
    ----------
    risk : (B,) tensor
        Risk scores ``eta`` (log hazard ratios; higher = earlier event).
    time : (B,) tensor
        Follow-up times, any unit (only their order matters).
    event : (B,) tensor of 0/1
        1 = event observed at ``time``, 0 = censored.

    Returns
    -------
    Tensor
        Scalar float32. A batch without events carries no information: its loss is 0 (still
        connected to ``risk``, so a backward pass works).
    """
    risk = risk.float().reshape(-1)
    time = time.to(risk.device, torch.float64).reshape(-1)
    observed = event.to(risk.device).reshape(-1) > 0
    if not (risk.shape == time.shape == observed.shape):
        raise BadInputError(f"risk {tuple(risk.shape)}, time {tuple(time.shape)} and event "
                            f"{tuple(observed.shape)} must have one value per slide")
    if not observed.any():
        return risk.sum() * 0.0
    # B is a batch of slides (tens), so the (B, B) risk-set mask is cheap and states Breslow plainly.
    at_risk = time[None, :] >= time[:, None]  # row i: who is still at risk at t_i
    log_denominator = torch.where(at_risk, risk[None, :], -torch.inf).logsumexp(dim=1)
    return -(risk - log_denominator)[observed].mean()


@dataclass(frozen=True)
class TimeBins:
    """Follow-up cut into K bins: bin k holds the times in ``(edges[k], edges[k+1]]``.

    Attributes
    ----------
    edges : tuple of float
        K + 1 increasing values in the manifest's time unit: 0, the K - 1 inner cut points, inf.
    """

    edges: tuple[float, ...]

    @classmethod
    def from_quantiles(cls, time: np.ndarray, event: np.ndarray, n_bins: int) -> TimeBins:
        """Cut points at the ``k / K`` quantiles of the event times (censored times are not used).

        Raises
        ------
        BadInputError
            Fewer distinct cut points than ``n_bins - 1`` (too few or too many tied event times).
        """
        time, event = np.asarray(time, dtype=np.float64), np.asarray(event).astype(bool)
        if n_bins < 2:
            raise BadInputError(f"--time-bins must be >= 2, got {n_bins}")
        event_times = time[event]
        if event_times.size == 0:
            raise BadInputError("no events among the training slides: discrete-time bins need event times")
        inner = np.unique(np.quantile(event_times, np.arange(1, n_bins) / n_bins))
        if inner.size != n_bins - 1:
            raise BadInputError(f"the {event_times.size} training event times ({np.unique(event_times).size} "
                                f"distinct) give only {inner.size + 1} distinct quantile bins; use "
                                f"--time-bins {inner.size + 1} or fewer")
        return cls((0.0, *map(float, inner), float("inf")))

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def index(self, time: np.ndarray | torch.Tensor) -> np.ndarray:
        """Bin of each time, ``(n,)`` int64 in ``0..K-1``."""
        return np.searchsorted(np.asarray(self.edges[1:-1]), np.asarray(time, dtype=np.float64),
                               side="left").astype(np.int64)

    def survival_at(self, curves: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Step-function survival ``P(T > t)`` of each slide at ``times``, from its per-bin curve.

        The curve's value ``S_k`` holds from the end of bin k (``edges[k+1]``) until the next end;
        before the first end it is 1.

        Parameters
        ----------
        curves : (n, K) array
            ``S_k``, survival past the end of each bin (:func:`discrete_survival`).
        times : (m,) array
            In the manifest's time unit.

        Returns
        -------
        (n, m) array
        """
        curves = np.asarray(curves, dtype=np.float64)
        padded = np.concatenate([np.ones((curves.shape[0], 1)), curves], axis=1)
        passed = np.searchsorted(np.asarray(self.edges[1:-1]), np.asarray(times, dtype=np.float64), side="right")
        return padded[:, passed]


def discrete_time_nll(logits: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood, averaged over the batch.

    Parameters
    ----------
    logits : (B, K) tensor
        Hazard logits per time bin.
    bin_index : (B,) tensor of int
        Bin of each slide's time (:meth:`TimeBins.index`).
    event : (B,) tensor of 0/1
        1 = event in that bin, 0 = censored in it.

    Returns
    -------
    Tensor
        Scalar float32.
    """
    logits = logits.float()
    if logits.ndim != 2:
        raise BadInputError(f"discrete-time logits must be (B, K), got {tuple(logits.shape)}")
    y = bin_index.to(logits.device).long().reshape(-1, 1)
    observed = event.to(logits.device).float().reshape(-1)
    if y.shape[0] != logits.shape[0] or observed.shape[0] != logits.shape[0]:
        raise BadInputError(f"{logits.shape[0]} slides but {y.shape[0]} bins and {observed.shape[0]} events")
    if ((y < 0) | (y >= logits.shape[1])).any():
        raise BadInputError(f"time bins must be in 0..{logits.shape[1] - 1}")
    log_hazard = F.logsigmoid(logits)
    log_survive_bin = F.logsigmoid(-logits)  # log(1 - h_k)
    log_survival = log_survive_bin.cumsum(dim=1)  # log S_k
    padded = F.pad(log_survival, (1, 0))  # column 0: log S_{-1} = 0
    log_survival_before = padded.gather(1, y).squeeze(1)  # log S_{y-1}
    log_survival_through = padded.gather(1, y + 1).squeeze(1)  # log S_y
    event_ll = log_survival_before + log_hazard.gather(1, y).squeeze(1)
    return -(observed * event_ll + (1 - observed) * log_survival_through).mean()


def discrete_survival(logits: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` hazard logits -> ``(..., K)`` survival past the end of each bin, ``prod (1 - h)``."""
    return F.logsigmoid(-logits.float()).cumsum(dim=-1).exp()


def discrete_risk(logits: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` hazard logits -> ``(...)`` risk score ``-sum_k S_k`` (higher = earlier event)."""
    return -discrete_survival(logits).sum(dim=-1)


#: The columns of a survival target ``(B, 3)``.
SURVIVAL_TARGET_COLUMNS = ("time", "event", "bin")


def _survival_loss(task: Task, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None
                   ) -> torch.Tensor:
    """The Cox partial likelihood of the batch (one output, Breslow ties), or the discrete-time hazard
    likelihood (K outputs); ``target`` ``(B, 3)``: time, event 0/1, time bin (unused by Cox)."""
    if class_weight is not None:
        raise BadInputError(f"task {task.name!r}: survival tasks take no class weights")
    if tuple(target.shape) != (logits.shape[0], len(SURVIVAL_TARGET_COLUMNS)):
        raise BadInputError(f"task {task.name!r}: survival targets have shape {tuple(target.shape)}, expected "
                            f"({logits.shape[0]}, 3): {', '.join(SURVIVAL_TARGET_COLUMNS)}")
    time, event, bin_index = target.unbind(dim=1)
    if task.n_classes == 1:
        return cox_partial_nll(logits.reshape(-1), time, event)
    return discrete_time_nll(logits, bin_index.round().long(), event)


#: The model's survival head: a Cox risk (1 output) or discrete-time hazards (K outputs); its
#: "probabilities" are the survival past each bin's end (the Cox risk itself).
SURVIVAL_HEAD = HeadKind(
    min_classes=1, loss=_survival_loss,
    probabilities=lambda task, logits: logits if task.n_classes == 1 else discrete_survival(logits),
    risk=lambda task, logits: logits[..., 0] if task.n_classes == 1 else discrete_risk(logits))
register_head_kind("survival", SURVIVAL_HEAD)
