"""The streaming buffer of iterative patch selection: keeps the M best patches seen so far."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["EXPLORE_MODES", "SCORES", "AtypicalDraw", "Candidates", "RandomDraw", "Selection", "finish",
           "join_drawn", "scores_of", "top_positions"]

SCORES = ("logit", "paper")
EXPLORE_MODES = ("uniform", "atypical")


@dataclass
class Selection:
    """The M patches of one slide chosen by :meth:`IPSModel.select_top_patches`.

    Attributes
    ----------
    indices : Tensor
        ``(M,)`` int64 positions of the selected patches in the slide's stream, by score, best first
        (equal scores: lower index first).
    scores : Tensor
        ``(M,)`` float32 selection scores (see :class:`IPSModel`, ``score``).
    patches : Tensor
        ``(M, ...)`` the selected inputs, pixels (uint8) or cached features, on the model's device.
    positions : Tensor or None
        ``(M, 2)`` int64 grid positions of the selected patches, if the chunks carried them.
    all_logits : Tensor
        ``(N,)`` float32 on the CPU: the attention logit of every patch of the slide, averaged over
        heads and query tokens, before softmax; what attention heatmaps show.
    embeddings : Tensor
        ``(M, D)`` float32 eval-mode embeddings of the selected patches (without positional encoding).
    task_logits : Tensor or None
        ``(T, N)`` float32 on the CPU: each task's attention logit of every patch, averaged over heads;
        only for models with more than one task (with one, it is ``all_logits``).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    patches: torch.Tensor
    positions: torch.Tensor | None
    all_logits: torch.Tensor
    embeddings: torch.Tensor
    task_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]


@dataclass
class Candidates:
    """Patches competing for the buffer, in stream order. ``logits`` (T, H, n) only for the paper score."""

    indices: torch.Tensor
    logit_scores: torch.Tensor
    patches: torch.Tensor
    positions: torch.Tensor | None
    embeddings: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]

    def cat(self, other: Candidates) -> Candidates:
        """This buffer followed by ``other`` (later in the stream)."""
        return Candidates(**{f.name: _cat(getattr(self, f.name), getattr(other, f.name), f.name == "logits")
                             for f in fields(self)})

    def take(self, keep: torch.Tensor) -> Candidates:
        """The candidates at positions ``keep`` (copies, so the loader's buffers are not held)."""
        return Candidates(**{f.name: _take(getattr(self, f.name), keep, f.name == "logits")
                             for f in fields(self)})


def _cat(a: torch.Tensor | None, b: torch.Tensor | None, last_dim: bool) -> torch.Tensor | None:
    if a is None or b is None:
        return None
    return torch.cat((a, b), dim=-1 if last_dim else 0)


def _take(x: torch.Tensor | None, keep: torch.Tensor, last_dim: bool) -> torch.Tensor | None:
    if x is None:
        return None
    return x.index_select(-1 if last_dim else 0, keep)


def scores_of(candidates: Candidates, score: str) -> torch.Tensor:
    """Selection score of each candidate, float32.

    ``"logit"``: the patch's own mean attention logit. ``"paper"``: the attention softmax over all
    candidates, averaged over heads and query tokens, so it depends on which patches compete.
    """
    if score == "logit":
        return candidates.logit_scores
    return candidates.logits.float().softmax(-1).mean((0, 1))


def top_positions(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Positions of the ``m`` highest scores, in increasing position order.

    Equal scores are ranked by position (lower first), so the result is deterministic; with the
    candidates in stream order this breaks ties by patch index.
    """
    if scores.shape[0] <= m:
        return torch.arange(scores.shape[0], device=scores.device)
    best = torch.sort(scores, descending=True, stable=True).indices[:m]
    return best.sort().values


def finish(buffer: Candidates, scores: torch.Tensor, all_logits: list[torch.Tensor]) -> Selection:
    """The buffer, with the scores it was selected by, as a :class:`Selection`, best first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    positions = None if buffer.positions is None else buffer.positions[order]
    return Selection(indices=buffer.indices[order], scores=scores[order].float(), patches=buffer.patches[order],
                     positions=positions, all_logits=torch.cat(all_logits).float().cpu(),
                     embeddings=buffer.embeddings[order])


class RandomDraw:
    """Patches drawn uniformly at random from a stream: the ``size`` with the smallest random keys."""

    def __init__(self, size: int):
        self.size = size
        self.pool: Candidates | None = None
        self._keys = torch.empty(0)

    def offer(self, incoming: Candidates) -> None:
        keys = torch.rand(len(incoming)).to(incoming.logit_scores.device)
        pool = incoming if self.pool is None else self.pool.cat(incoming)
        keys = keys if self.pool is None else torch.cat((self._keys, keys))
        keep = top_positions(-keys, self.size)
        self.pool, self._keys = pool.take(keep), keys[keep]

    def keys(self) -> torch.Tensor:
        """Draw order of the pool: lower first."""
        return self._keys


class AtypicalDraw:
    """The ``size`` patches of a stream farthest from the slide's mean embedding: what is rare on the slide.

    A micro-lesion covers one patch in a thousand, and at initialisation its attention score is as likely
    to rank last as first, so a greedy top-M (or a uniform draw of a few patches) almost never trains on
    it. What sets it apart before any training is that it is unlike the rest of its slide. The distance
    of a patch is its Mahalanobis distance from the slide's mean embedding under the covariance of the
    slide's embeddings (regularised by ``1e-3`` of their mean variance), so a patch that is unusual in a
    direction along which the slide hardly varies counts, however small its embedding's norm. Mean and
    covariance are running statistics over the patches seen so far; the pool's distances are recomputed
    as they settle, so only patches dropped on the first chunk's estimate are lost.
    """

    def __init__(self, size: int):
        self.size = size
        self.pool: Candidates | None = None
        self.count = 0
        self.sum = self.sum_outer = torch.zeros(0)

    def offer(self, incoming: Candidates) -> None:
        emb = incoming.embeddings.double()
        first = self.pool is None
        self.count += emb.shape[0]
        self.sum = emb.sum(0) if first else self.sum + emb.sum(0)
        self.sum_outer = emb.T @ emb if first else self.sum_outer + emb.T @ emb
        pool = incoming if first else self.pool.cat(incoming)
        self.pool = pool.take(top_positions(self.distances(pool.embeddings), self.size))

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each ``(n, D)`` embedding from the slide's running mean, float32."""
        mean = self.sum / self.count
        cov = self.sum_outer / self.count - torch.outer(mean, mean)
        ridge = 1e-3 * cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        centred = embeddings.double() - mean
        return (centred * torch.linalg.solve(cov, centred.T).T).sum(1).float()

    def keys(self) -> torch.Tensor:
        """Draw order of the pool: lower first (the most atypical)."""
        assert self.pool is not None
        return -self.distances(self.pool.embeddings)


def join_drawn(pool: Candidates, keys: torch.Tensor, greedy: Candidates, greedy_scores: torch.Tensor, n: int,
               score: str) -> tuple[Candidates, torch.Tensor]:
    """``greedy`` plus up to ``n`` patches of ``pool`` that are not in it, lowest ``keys`` first.

    Drawn patches carry their own logit score (the paper score ranks within its competition: 0 for them).
    """
    fresh = ~torch.isin(pool.indices, greedy.indices)
    order = torch.argsort(torch.where(fresh, keys, torch.full_like(keys, float("inf"))), stable=True)
    chosen = order[:min(n, int(fresh.sum()))].sort().values
    extra = pool.take(chosen)
    extra_scores = extra.logit_scores if score == "logit" else torch.zeros(len(extra), device=greedy_scores.device)
    return greedy.cat(extra), torch.cat((greedy_scores, extra_scores.to(greedy_scores.dtype)))
