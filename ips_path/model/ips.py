"""Iterative Patch Selection (Bergner et al., ICLR 2023): stream a slide's patches under no_grad, keep
the M best, and train encoder + aggregator on those M only, so memory depends on M and I, never on N.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..runtime.errors import BadInputError, IpspathError
from .aggregator import CrossAttentionAggregator
from .chunks import PatchChunk, rechunk
from .selection import (
    EXPLORE_MODES,
    SCORES,
    AtypicalDraw,
    Candidates,
    RandomDraw,
    Selection,
    finish,
    join_drawn,
    scores_of,
    top_positions,
)
from .tasks import Task, compute_loss, task_losses

__all__ = ["IPSModel", "Selection", "SlidePrediction", "compute_loss", "train_step"]


@dataclass
class SlidePrediction:
    """What :meth:`IPSModel.predict_slide` returns for one slide.

    Attributes
    ----------
    probabilities : dict
        Task name -> ``(n_classes,)`` float32 probabilities (binary tasks: ``[1 - p, p]``).
    logits : dict
        Task name -> head logits (binary: a scalar).
    attention : Tensor
        ``(T, H, M)`` attention of each task token and head over the selected patches (sums to one over M),
        in the order of ``selection.indices``.
    selection : Selection
        The selected patches; ``selection.all_logits`` holds the attention logit of every patch.
    """

    probabilities: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    attention: torch.Tensor
    selection: Selection


class IPSModel(nn.Module):
    """Patch encoder + cross-attention aggregator, trained with iterative patch selection.

    Parameters
    ----------
    encoder : nn.Module
        Patch encoder with an ``out_dim`` attribute (see :func:`build_encoder`). A linear projection to
        ``dim`` is added when ``out_dim != dim``. In eval mode it must treat every patch on its own
        (BatchNorm in eval mode does).
    tasks : sequence of Task
        One query token and classification head per task.
    dim : int
        Embedding dimension D of the aggregator.
    n_heads : int
        Attention heads H.
    n_select : int
        M, patches kept per slide for the gradient phase.
    chunk_size : int
        I, patches encoded at a time during selection; incoming chunks are regrouped to this size.
    score : {"logit", "paper"}
        How selection ranks patches.

        ``"logit"`` (default): the patch's attention logit averaged over heads and query tokens, before
        softmax. It is a function of the patch alone, so the M patches kept are exactly the top-M of the
        whole slide whatever I and the order of the chunks (equal scores: lower stream index first).

        ``"paper"``: as in the paper's code, the attention softmax averaged over heads and tokens,
        computed over the buffer plus the current chunk. With more than one head a patch's rank then
        depends on the patches it shares the softmax with, so the result depends on the chunking and
        the chunk order and can differ from the whole-slide top-M.

        Exactness holds for the scores as computed: BLAS/cuDNN kernels may give a patch's embedding
        different last bits in batches of different size (about 1e-7 relative on CPU, more under bf16).
        The short last chunk of a slide is therefore encoded zero-padded to I, so every batch of a slide
        has one shape and the result does not depend on how the loader cut the stream; another I can
        still swap patches whose scores are within that rounding.
    pos_encoding : {None, "1d", "2d"}
        Positional encoding added to the embeddings: by stream index (the paper) or by (row, col) grid
        position (needs chunks with positions).
    grad_chunk_size : int, optional
        Re-encode the selected ``B * M`` patches of the gradient phase in pieces of at most this many
        patches. In train mode BatchNorm then normalises each piece with its own statistics.
    checkpoint : bool
        Encode each piece under activation checkpointing (needs ``grad_chunk_size``): activation memory
        of the gradient phase is then that of one piece, flat in M. BatchNorm running statistics are not
        updated again when the backward pass recomputes a piece.
    dropout, attn_dropout, mlp_ratio
        See :class:`CrossAttentionAggregator`.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, dim: int = 128, n_heads: int = 8,
                 n_select: int = 100, chunk_size: int = 100, score: str = "logit", pos_encoding: str | None = None,
                 grad_chunk_size: int | None = None, checkpoint: bool = False, dropout: float = 0.1,
                 attn_dropout: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__()
        if not isinstance(getattr(encoder, "out_dim", None), int):
            raise BadInputError(f"the encoder {type(encoder).__name__} must state its output size in `out_dim`")
        if score not in SCORES:
            raise BadInputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        for name, value in (("n_select", n_select), ("chunk_size", chunk_size), ("grad_chunk_size", grad_chunk_size)):
            if value is not None and value < 1:
                raise BadInputError(f"{name} must be >= 1, got {value}")
        if checkpoint and grad_chunk_size is None:
            raise BadInputError("checkpoint=True needs grad_chunk_size, the patches encoded per checkpointed piece")
        self.encoder = encoder
        self.projector = nn.Identity() if encoder.out_dim == dim else nn.Linear(encoder.out_dim, dim)
        self.aggregator = CrossAttentionAggregator(dim, tasks, n_heads=n_heads, dropout=dropout,
                                                   attn_dropout=attn_dropout, mlp_ratio=mlp_ratio,
                                                   pos_encoding=pos_encoding)
        self.tasks = self.aggregator.tasks
        self.n_select, self.chunk_size, self.score = n_select, chunk_size, score
        self.grad_chunk_size, self.checkpoint = grad_chunk_size, checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches ``(n, ...)`` -> embeddings ``(n, D)``."""
        return self.projector(self.encoder(patches))

    def encoding_positions(self, indices: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor | None:
        """What the positional encoding takes: stream ``indices`` for "1d", ``grid`` positions for "2d"."""
        return {"1d": indices, "2d": grid}.get(self.aggregator.pos_encoding)

    def select_top_patches(self, chunks: Iterable[PatchChunk], *, explore: float = 0.0,
                           explore_mode: str = "uniform") -> Selection:
        """Stream the chunks of one slide and keep the M best patches (see ``score``).

        With ``explore`` > 0 (training), only the best ``M - k`` are kept by score and ``k = round(explore * M)``
        more are drawn uniformly at random from the rest of the slide (keys from torch's default generator,
        so seeded runs repeat), so that patches the current model overlooks still reach the gradient phase.
        Up to M more patches are then held during the stream. ``explore_mode="atypical"`` draws the ``k``
        instead as the patches farthest from the slide's mean embedding (see :class:`AtypicalDraw`): rare
        patches such as micro-lesions, which a uniform draw of a few patches almost never reaches.

        Runs in eval mode under ``torch.no_grad()``, restoring the caller's mode. The buffer fills with the
        first patches; every later chunk of I competes with it, so only M + I patches are held at a time.
        M >= N keeps every patch. Kept patches are copied, so a loader may refill a chunk's buffer once
        the next chunk is asked for; chunks are moved to the model's device with ``non_blocking=True``,
        so a loader that refills pinned host buffers must first wait for their copies (a CUDA event).

        Raises
        ------
        BadInputError
            The stream holds no patch.
        IpspathError
            A score is NaN or infinite (diverged weights or NaN inputs).
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._select(chunks, explore, explore_mode)
        finally:
            self.train(was_training)

    def _select(self, chunks: Iterable[PatchChunk], explore: float = 0.0, explore_mode: str = "uniform") -> Selection:
        if not 0 <= explore <= 1:
            raise BadInputError(f"explore must be a share of M in [0, 1], got {explore}")
        if explore_mode not in EXPLORE_MODES:
            raise BadInputError(f"explore_mode must be one of {', '.join(EXPLORE_MODES)}, got {explore_mode!r}")
        device = self.device
        n_random = round(explore * self.n_select)
        n_greedy = self.n_select - n_random
        buffer: Candidates | None = None
        buffer_scores = torch.empty(0)
        draw = RandomDraw if explore_mode == "uniform" else AtypicalDraw
        drawn = draw(self.n_select) if n_random else None
        all_logits: list[torch.Tensor] = []
        task_logits: list[torch.Tensor] = []  # per task, for the viewer: only with several tasks
        n_seen = 0
        for chunk in rechunk(chunks, self.chunk_size):
            # The short last chunk of a slide is padded to I (see _candidates), so every batch of the slide
            # has one shape; a slide of one chunk has only that one shape anyway.
            incoming = self._candidates(chunk, n_seen, device, pad_to=self.chunk_size if n_seen else None)
            n_seen += len(chunk)
            all_logits.append(incoming.logit_scores)
            if len(self.tasks) > 1:
                task_logits.append(self.aggregator.task_attention_logits(
                    incoming.embeddings, self.encoding_positions(incoming.indices, incoming.positions)).cpu())
            if drawn is not None:
                drawn.offer(incoming)
            if n_greedy == 0:  # everything drawn: the greedy buffer stays empty
                nothing = torch.zeros(0, dtype=torch.long, device=device)
                buffer, buffer_scores = incoming.take(nothing), incoming.logit_scores[:0]
                continue
            candidates = incoming if buffer is None else buffer.cat(incoming)
            scores = scores_of(candidates, self.score)
            keep = top_positions(scores, n_greedy)
            buffer, buffer_scores = candidates.take(keep), scores[keep]
        if buffer is None:
            raise BadInputError("the slide has no patches to select from (empty tile store or no tissue found)")
        if drawn is not None:
            buffer, buffer_scores = join_drawn(drawn.pool, drawn.keys(), buffer, buffer_scores, n_random, self.score)
        selection = finish(buffer, buffer_scores, all_logits)
        if task_logits:
            selection.task_logits = torch.cat(task_logits, dim=1)
        if not torch.isfinite(selection.all_logits).all():
            raise IpspathError("attention scores are NaN or infinite: the model has diverged or the patches hold "
                               "NaN; lower the learning rate or check the inputs")
        return selection

    def _candidates(self, chunk: PatchChunk, start: int, device: torch.device,
                    pad_to: int | None = None) -> Candidates:
        """Encode and score one chunk; with ``pad_to``, encode it zero-padded to that many patches.

        cuDNN and BLAS choose kernels by batch shape, so a patch encoded in a short batch can get other
        embedding bits (under bf16, other enough to swap near-tied patches) than in a full one. Padding
        keeps one batch shape for the whole slide; the padding's embeddings are dropped before scoring,
        so padding can never be selected.
        """
        patches = chunk.patches.to(device, non_blocking=True)
        grid = None if chunk.positions is None else chunk.positions.to(device, non_blocking=True)
        n = len(chunk)
        indices = torch.arange(start, start + n, device=device)
        encoded = patches if pad_to is None or n >= pad_to else _pad(patches, pad_to)
        emb = self.embed(encoded)[:n].float()
        positions = self.encoding_positions(indices, grid)
        logits = None
        if self.score == "paper":
            # float32 outside autocast, like the default score: bf16 logits tie often at 10^4-10^5 patches,
            # and the stable sort would then favour the first patches of the stream (the slide's top left).
            with torch.autocast(device.type, enabled=False):
                logits = self.aggregator.attention_logits(
                    emb[None], None if positions is None else positions[None])[0].float()
        return Candidates(indices, self.aggregator.mean_attention_logits(emb, positions), patches, grid, emb, logits)

    def stack_selections(self, selections: Sequence[Selection]
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Batch the selections of B slides for :meth:`forward_selected`.

        Returns
        -------
        patches : Tensor
            ``(B, M, ...)``; slides with fewer than M patches are zero-padded.
        positions : Tensor or None
            What the positional encoding takes (see :meth:`encoding_positions`), padded likewise.
        mask : Tensor or None
            ``(B, M)`` bool, False at padding; None when no slide needed padding.
        """
        sizes = [len(s) for s in selections]
        m = max(sizes)
        positions = [self.encoding_positions(s.indices, s.positions) for s in selections]
        patches = torch.stack([_pad(s.patches, m) for s in selections])
        stacked_positions = None if positions[0] is None else torch.stack([_pad(p, m) for p in positions])
        if min(sizes) == m:
            return patches, stacked_positions, None
        mask = torch.arange(m, device=patches.device)[None] < torch.tensor(sizes, device=patches.device)[:, None]
        return patches, stacked_positions, mask

    def forward(self, patches: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, *, with_scores: bool = False
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                           torch.Tensor]:
        """The gradient phase, see :meth:`forward_selected`."""
        device = self.device
        b, m = patches.shape[:2]
        flat = patches.to(device, non_blocking=True).flatten(0, 1)
        if mask is None:
            emb = self._embed_with_grad(flat)
        else:
            mask = mask.to(device)
            valid = mask.flatten().nonzero().squeeze(1)
            # Padding never reaches the encoder, so it cannot shift BatchNorm statistics.
            real = self._embed_with_grad(flat.index_select(0, valid))
            emb = real.new_zeros(b * m, real.shape[1]).index_put((valid,), real)
        if positions is not None:
            positions = positions.to(device, non_blocking=True)
        emb = emb.view(b, m, -1)
        logits, attention = self.aggregator(emb, positions, mask)
        if not with_scores:
            return logits, attention
        return logits, attention, self.aggregator.mean_attention_logits(emb, positions)

    def forward_selected(self, patches: torch.Tensor, positions: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, *, with_scores: bool = False
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor, torch.Tensor]:
        """Encode the selected patches of B slides (with gradients unless under no_grad) and aggregate.

        Parameters
        ----------
        patches : Tensor
            ``(B, M, ...)`` selected inputs, e.g. from :meth:`stack_selections`.
        positions : Tensor, optional
            ``(B, M)`` stream indices ("1d") or ``(B, M, 2)`` grid positions ("2d").
        mask : Tensor, optional
            ``(B, M)`` bool, False at padding.

        Returns
        -------
        logits : dict
            Task name -> ``(B, n_classes)`` (binary: ``(B,)``).
        attention : Tensor
            ``(B, T, H, M)`` attention weights.
        scores : Tensor
            Only ``with_scores``: ``(B, M)`` float32 selection scores (mean attention logits, as
            :meth:`select_top_patches` ranks by with ``score="logit"``), with gradients.
        """
        return self(patches, positions, mask, with_scores=with_scores)

    def _embed_with_grad(self, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        if self.grad_chunk_size is None or n <= self.grad_chunk_size:
            pieces = [patches]
        else:  # near-equal pieces, so no piece of one patch trips BatchNorm in train mode
            pieces = list(patches.tensor_split(math.ceil(n / self.grad_chunk_size)))
        if not (self.checkpoint and torch.is_grad_enabled()):
            return torch.cat([self.embed(p) for p in pieces])
        return torch.cat([activation_checkpoint(self.embed, p, use_reentrant=False,
                                                context_fn=self._checkpoint_contexts) for p in pieces])

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _batchnorm_stats_frozen(self)

    def predict_slide(self, chunks: Iterable[PatchChunk]) -> SlidePrediction:
        """Eval path for one slide: selection, then aggregation of the selected patches' embeddings.

        Runs in eval mode without gradients and restores the caller's mode.
        """
        selection = self.select_top_patches(chunks)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                positions = self.encoding_positions(selection.indices, selection.positions)
                logits, attention = self.aggregator(selection.embeddings[None],
                                                    None if positions is None else positions[None])
        finally:
            self.train(was_training)
        logits = {name: value[0].float() for name, value in logits.items()}
        probabilities = {t.name: t.probabilities(logits[t.name]) for t in self.tasks}
        return SlidePrediction(probabilities, logits, attention[0].float(), selection)


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode still normalise with batch statistics but keep their running stats.

    Used while checkpointing recomputes a forward pass that already updated the running stats once.
    Momentum 0 keeps the same kernels (so the recomputation saves the same tensors) while the update
    ``(1 - 0) * running + 0 * batch`` leaves the stats as they are; the batch counter is restored.
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _pad(x: torch.Tensor, m: int) -> torch.Tensor:
    """Zero-pad dim 0 to ``m``."""
    if x.shape[0] == m:
        return x
    return torch.cat((x, x.new_zeros((m - x.shape[0], *x.shape[1:]))))


def train_step(model: IPSModel, slides: Sequence[Iterable[PatchChunk]], targets: Mapping[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, *, autocast_dtype: torch.dtype | None = None,
               grad_clip: float | None = None, class_weights: Mapping[str, torch.Tensor] | None = None,
               explore: float = 0.0, explore_mode: str = "uniform", instance_loss: float = 0.0,
               instance_k: int = 2) -> dict[str, Any]:
    """One IPS training step on a batch of B slides.

    Selection of each slide (eval, no_grad), then one gradient phase on the ``(B, M, ...)`` batch in train
    mode, loss (:func:`compute_loss`), backward, optional gradient clipping, ``optimizer.step()``.

    Parameters
    ----------
    model : IPSModel
    slides : sequence of iterables of PatchChunk
        The chunk streams of the B slides.
    targets : dict
        Task name -> ``(B, ...)`` targets, see :meth:`Task.loss`.
    optimizer : torch.optim.Optimizer
    autocast_dtype : torch.dtype, optional
        Run selection and the forward pass under ``torch.autocast`` with this dtype (``torch.bfloat16``
        on CUDA); losses are computed in float32. float16 is not loss-scaled here.
    grad_clip : float, optional
        Clip the gradient norm of all parameters to this value.
    class_weights : dict, optional
        Task name -> class weights, see :meth:`Task.loss`.
    explore : float
        Share of M drawn at random from the rest of each slide instead of by score (see
        :meth:`IPSModel.select_top_patches`); 0: the paper's greedy top-M.
    explore_mode : {"uniform", "atypical"}
        How the explored share is drawn: uniformly, or the patches least like the rest of their slide.
    instance_loss : float
        Weight of an instance-level loss on the selection scores (see :func:`instance_loss`); 0: off.
        Needs one task with two classes (the second is the positive one).
    instance_k : int
        Patches per slide that the instance loss labels at each end of the ranking.

    Returns
    -------
    dict
        ``loss`` (float), ``losses`` (task name -> float, with ``"instance"`` when on), ``grad_norm`` (float
        before clipping, or None without ``grad_clip``), ``n_selected`` (list of patches kept per slide),
        ``selected`` (list of ``(M,)`` CPU int64 stream indices of the patches each slide trained on).
    """
    device = model.device
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        selections = [model.select_top_patches(chunks, explore=explore, explore_mode=explore_mode) for chunks in slides]
    patches, positions, mask = model.stack_selections(selections)
    n_selected = [len(s) for s in selections]
    selected = [s.indices.cpu() for s in selections]
    del selections  # their patches are copied into the batch and their embeddings are not needed: free both
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with amp:
        out = model.forward_selected(patches, positions, mask, with_scores=instance_loss > 0)
    logits = out[0]
    losses = task_losses(logits, targets, model.tasks, class_weights)
    if instance_loss > 0:
        tasks = model.tasks
        if len(tasks) != 1 or tasks[0].n_outputs not in (1, 2):
            raise BadInputError("the instance loss needs one task with two classes")
        is_positive = targets[tasks[0].name].reshape(-1).to(out[2].device) == 1
        losses["instance"] = instance_loss * _instance_loss(out[2].float(), is_positive, mask, instance_k)
    loss = torch.stack(list(losses.values())).sum()
    loss.backward()
    grad_norm = None
    if grad_clip is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return {"loss": float(loss.detach()), "losses": {k: float(v.detach()) for k, v in losses.items()},
            "grad_norm": grad_norm, "n_selected": n_selected, "selected": selected}


def _instance_loss(scores: torch.Tensor, is_positive: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """CLAM-style instance loss on the selection scores of the M trained patches of B slides.

    The scores are read as patch logits: on a positive slide the ``k`` best-scored patches are pushed
    towards "positive" and the ``k`` worst towards "negative"; on a negative slide the ``k`` best are
    pushed towards "negative" (nothing on a negative slide is a lesion, so whatever ranks highest there,
    look-alikes included, is taught to rank low). Mean binary cross-entropy over the labelled patches.
    """
    if mask is not None:
        scores_hi = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        scores_lo = scores.masked_fill(~mask.to(scores.device), float("inf"))
    else:
        scores_hi = scores_lo = scores
    k = max(1, min(k, scores.shape[1] // 2 if scores.shape[1] > 1 else 1))
    top = scores.gather(1, scores_hi.topk(k, dim=1).indices)
    bottom = scores.gather(1, scores_lo.topk(k, dim=1, largest=False).indices)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    top_target = is_positive[:, None].float().expand_as(top)
    terms = [bce(top, top_target, reduction="none").flatten()]
    if is_positive.any():
        low = bottom[is_positive]
        terms.append(bce(low, torch.zeros_like(low), reduction="none").flatten())
    return torch.cat(terms).mean()
