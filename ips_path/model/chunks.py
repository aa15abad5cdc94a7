"""The unit the loader hands to the model: a chunk of patches of one slide, in stream order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..runtime.errors import BadInputError

__all__ = ["PatchChunk", "rechunk"]


@dataclass
class PatchChunk:
    """Consecutive patches of one slide.

    Attributes
    ----------
    patches : Tensor
        ``(n, C, H, W)`` uint8 pixels, or ``(n, D)`` float16/float32 cached features.
    positions : Tensor or None
        ``(n, 2)`` int64 grid position (row, col) of each patch on the slide, in patch units;
        needed only by the 2-D positional encoding.
    """

    patches: torch.Tensor
    positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.patches.shape[0]


def rechunk(chunks: Iterable[PatchChunk], size: int) -> Iterator[PatchChunk]:
    """Regroup a stream of chunks into chunks of exactly ``size`` patches (the last may be smaller).

    Chunks that already have ``size`` patches pass through without a copy; empty chunks are dropped.
    All chunks must either carry positions or not. Patches held back until the next chunk arrives are
    copied, so a loader may reuse a chunk's buffer once the consumer asks for the next chunk.
    """
    if size < 1:
        raise BadInputError(f"chunk size must be >= 1, got {size}")
    pending: list[PatchChunk] = []
    n_pending = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if n_pending == 0 and len(chunk) == size:
            yield chunk
            continue
        pending.append(chunk)
        n_pending += len(chunk)
        if n_pending < size:
            continue
        merged = _concat(pending)
        start = 0
        while n_pending - start >= size:
            yield _slice(merged, start, start + size)
            start += size
        # The rest outlives this chunk, whose buffer the loader may reuse for the next one: copy it.
        pending = [_slice(merged, start, n_pending, copy=True)] if start < n_pending else []
        n_pending -= start
    if n_pending:
        yield _concat(pending)


def _slice(chunk: PatchChunk, start: int, stop: int, copy: bool = False) -> PatchChunk:
    """Patches ``start:stop`` of a chunk, as views unless ``copy``."""
    patches = chunk.patches[start:stop]
    positions = None if chunk.positions is None else chunk.positions[start:stop]
    if copy:
        patches = patches.clone()
        positions = None if positions is None else positions.clone()
    return PatchChunk(patches, positions)


def _concat(chunks: list[PatchChunk]) -> PatchChunk:
    if len(chunks) == 1:
        return chunks[0]
    with_positions = [c.positions is not None for c in chunks]
    if any(with_positions) and not all(with_positions):
        raise BadInputError("some chunks of the slide carry patch positions and some do not")
    positions = torch.cat([c.positions for c in chunks]) if all(with_positions) else None
    return PatchChunk(torch.cat([c.patches for c in chunks]), positions)
