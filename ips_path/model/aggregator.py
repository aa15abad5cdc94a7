"""The IPS cross-attention aggregator: learned query tokens (one per task) attend over patch embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..runtime.errors import BadInputError
from .positional import grid_encoding, sinusoidal_encoding
from .tasks import Task

__all__ = ["CrossAttentionAggregator", "Task"]

POS_ENCODINGS = (None, "1d", "2d")


def _pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension by halving it with elementwise adds: the same order for every row."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat((x, x.new_zeros((*x.shape[:-1], 1))), dim=-1)
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


class Mlp(nn.Module):
    """Linear -> ReLU -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class CrossAttentionAggregator(nn.Module):
    """One cross-attention transformer block, as in the IPS paper (Bergner et al., ICLR 2023).

    A learned query token per task attends over the N patch embeddings with ``n_heads`` heads
    (bias-free q/k/v projections, scaled dot product, attention dropout, output projection, dropout,
    residual + LayerNorm), followed by an MLP with residual + LayerNorm. Token t feeds the linear head
    of task t.

    Parameters
    ----------
    dim : int
        Embedding dimension D, divisible by ``n_heads`` (by 4 with ``pos_encoding="2d"``).
    tasks : sequence of Task
        One query token and one head per task.
    n_heads : int
        Attention heads H.
    dropout, attn_dropout : float
        Dropout after the attention output projection and the MLP / on the attention weights.
    mlp_ratio : float
        Hidden size of the MLP relative to D.
    pos_encoding : {None, "1d", "2d"}
        Added to the embeddings before attention: ``"1d"`` sinusoidal over the patch's index in the
        stream (the paper's choice), ``"2d"`` sinusoidal over its (row, col) grid position on the slide.

    Notes
    -----
    ``positions`` arguments are ``(B, N)`` stream indices for ``"1d"`` (default ``0..N-1``) and
    ``(B, N, 2)`` grid positions for ``"2d"`` (required); they are ignored without positional encoding.
    ``mask`` is ``(B, N)`` bool, True for real patches, False for padding.
    """

    def __init__(self, dim: int, tasks: Sequence[Task], n_heads: int = 8, dropout: float = 0.1,
                 attn_dropout: float = 0.1, mlp_ratio: float = 4.0, pos_encoding: str | None = None):
        super().__init__()
        self.tasks = tuple(tasks)
        names = [t.name for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise BadInputError(f"the model needs at least one task and unique task names, got {names}")
        if dim % n_heads:
            raise BadInputError(f"embedding dim {dim} must be divisible by the number of heads {n_heads}")
        if pos_encoding not in POS_ENCODINGS:
            raise BadInputError(f"pos_encoding must be None, '1d' or '2d', got {pos_encoding!r}")
        if pos_encoding == "2d" and dim % 4:
            raise BadInputError(f"the 2-D positional encoding needs dim divisible by 4, got {dim}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.pos_encoding = pos_encoding
        self.scale = self.head_dim**-0.5
        self.queries = nn.Parameter(torch.empty(len(self.tasks), dim))
        bound = math.sqrt(1 / self.head_dim)  # the paper's initialisation of the query tokens
        nn.init.uniform_(self.queries, -bound, bound)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj_drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.ModuleDict({t.name: nn.Linear(dim, t.n_outputs) for t in self.tasks})

    def add_positions(self, emb: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``(..., N, D)`` plus the positional encoding (unchanged without one)."""
        if self.pos_encoding is None:
            return emb
        if self.pos_encoding == "1d":
            if positions is None:
                positions = torch.arange(emb.shape[-2], device=emb.device)
            return emb + sinusoidal_encoding(positions, self.dim).to(emb.dtype)
        if positions is None:
            raise BadInputError("the 2-D positional encoding needs the grid positions of the patches; "
                                "the chunks carry none (use pos_encoding None or '1d', or a loader with positions)")
        return emb + grid_encoding(positions, self.dim).to(emb.dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Positioned embeddings ``(B, N, D)`` -> attention logits ``(B, T, H, N)``."""
        q = self.q_proj(self.queries).view(-1, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*x.shape[:2], self.n_heads, self.head_dim)
        return torch.einsum("thd,bnhd->bthn", q, k) * self.scale

    def attention_logits(self, emb: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax attention of every query token and head over the patches.

        Parameters
        ----------
        emb : Tensor
            ``(B, N, D)`` patch embeddings.

        Returns
        -------
        Tensor
            ``(B, T, H, N)``, T = number of tasks.
        """
        return self._logits(self.add_positions(emb, positions))

    def mean_attention_logits(self, emb: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The attention logit of each patch, averaged over heads and query tokens: the selection score.

        Equals ``attention_logits(emb, positions).mean((1, 2))`` up to rounding, but is computed as
        ``sum(x * w)`` over each patch's own row with a vector ``w`` folded from the weights, in float32,
        outside autocast, with elementwise operations only (a fixed pairwise summation instead of a
        matmul or reduction kernel, whose order may change with the batch shape). A patch's score
        therefore has the same bits whatever other patches share its batch, on CPU and GPU, which makes
        iterative selection exactly the top-M of the whole slide.

        Parameters
        ----------
        emb : Tensor
            ``(..., N, D)`` patch embeddings.

        Returns
        -------
        Tensor
            ``(..., N)`` float32.
        """
        with torch.autocast(emb.device.type, enabled=False):
            x = self.add_positions(emb.float(), positions)
            q_sum = self.q_proj(self.queries.float()).sum(0)
            w = (self.k_proj.weight.float().t() @ q_sum) * (self.scale / (len(self.tasks) * self.n_heads))
            return _pairwise_sum(x * w)

    def task_attention_logits(self, emb: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The attention logit of each patch for each task's query token, averaged over heads.

        Folded like :meth:`mean_attention_logits` (float32, elementwise, independent of the batch);
        the mean over tasks is that method's score.

        Parameters
        ----------
        emb : Tensor
            ``(N, D)`` patch embeddings.

        Returns
        -------
        Tensor
            ``(T, N)`` float32, T = number of tasks.
        """
        with torch.autocast(emb.device.type, enabled=False):
            x = self.add_positions(emb.float(), positions)
            w = (self.q_proj(self.queries.float()) @ self.k_proj.weight.float()) * (self.scale / self.n_heads)
            return _pairwise_sum(x[None] * w[:, None, :])

    def forward_features(self, emb: torch.Tensor, positions: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings ``(B, N, D)`` -> task tokens ``(B, T, D)`` and attention ``(B, T, H, N)``.

        The returned attention is the softmax over the patches (before attention dropout): it sums to
        one over N for every slide, token and head; padded patches (``mask`` False) get zero.
        """
        x = self.add_positions(emb, positions)
        logits = self._logits(x)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :].to(logits.device), float("-inf"))
        attn = logits.float().softmax(-1).to(x.dtype)
        v = self.v_proj(x).view(*x.shape[:2], self.n_heads, self.head_dim)
        out = torch.einsum("bthn,bnhd->bthd", self.attn_drop(attn), v).flatten(2)
        tokens = self.norm1(self.proj_drop(self.out_proj(out)) + self.queries)
        tokens = self.norm2(tokens + self.mlp(tokens))
        return tokens, attn

    def forward_head(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Task tokens ``(B, T, D)`` -> logits per task: ``(B, n_classes)``, binary ``(B,)``."""
        logits = {}
        for i, task in enumerate(self.tasks):
            out = self.heads[task.name](tokens[:, i])
            logits[task.name] = out.squeeze(-1) if task.kind == "binary" else out
        return logits

    def forward(self, emb: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Patch embeddings ``(B, N, D)`` -> (logits per task, attention ``(B, T, H, N)``)."""
        tokens, attn = self.forward_features(emb, positions, mask)
        return self.forward_head(tokens), attn
