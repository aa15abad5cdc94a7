"""How spread out a slide's attention is, and the colour scales of the overlays.

Ranks (the default scale) use the whole colour range on every slide, so a slide whose attention
is nearly flat looks as decided as one whose model points at one lesion. Two things guard the
reader against that:

- the spread of the slide's attention, shown next to every colour bar: the range of its
  attention logits, and the effective number of patches ``exp(H)`` of the attention weights
  (softmax of the logits over the slide's patches; ``H`` their entropy), as a share of all
  patches: 100 % is perfectly flat attention, a few % is attention on a few patches;
- the ``weight`` scale: each patch's attention weight times the number of patches (1 = what every
  patch gets under flat attention), coloured on a fixed log scale from 1/8 to 8 times that, the
  same on every slide. A flat slide is then one even colour, and colours compare across slides.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.review.heatmap.grid import percentile_ranks
from ips_path.runtime.atomic import write_atomically

__all__ = ["FLAT_SHARE", "SCALES", "SPREAD_FILE", "WEIGHT_LOG2_RANGE", "AttentionSpread", "attention_spread",
           "read_spread", "scale_legend", "scale_values", "write_spread"]

#: Colour scales of the overlays: ``rank`` (percentile rank within the slide) or ``weight``.
SCALES = ("rank", "weight")
#: The ``weight`` scale spans 2**-R .. 2**R times the flat attention weight.
WEIGHT_LOG2_RANGE = 3.0
#: Attention whose effective number of patches is at least this share of all patches is called flat.
FLAT_SHARE = 0.9
#: File beside the overlay in heatmaps/<slide_id>/ with the spread and the scale shown.
SPREAD_FILE = "attention.json"


@dataclass(frozen=True)
class AttentionSpread:
    """The spread of one slide's attention.

    Attributes
    ----------
    n_patches : int
    low, high : float
        Smallest and largest attention logit.
    effective_patches : float
        ``exp(H)`` of the attention weights (1 .. ``n_patches``).
    effective_share : float
        ``effective_patches / n_patches`` (0-1]: 1 is flat attention.
    top_weight_ratio : float
        The largest attention weight times ``n_patches``: how many times the flat weight the most
        attended patch gets.
    """

    n_patches: int
    low: float
    high: float
    effective_patches: float
    effective_share: float
    top_weight_ratio: float

    @property
    def flat(self) -> bool:
        """Attention so even that rank colours exaggerate it."""
        return self.effective_share >= FLAT_SHARE

    def lines(self) -> list[str]:
        """Two short lines for a legend: the logit range, and the effective share (with "nearly flat")."""
        return [f"logits {self.low:.3g} to {self.high:.3g}; top patch {self.top_weight_ratio:.3g}x flat",
                f"effective patches {100 * self.effective_share:.0f} % of {self.n_patches:,}"
                + (": nearly flat" if self.flat else "")]

    def describe(self) -> str:
        """One line, e.g. ``logits -0.1 to 0.01; top patch 1.1x flat; effective patches 98 % of 1,234: nearly flat``."""
        return "; ".join(self.lines())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flat": self.flat, "text": self.describe()}


def attention_weights(scores: np.ndarray) -> np.ndarray:
    """Softmax of the attention logits over the slide's patches (float64, sums to 1)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def attention_spread(scores: np.ndarray) -> AttentionSpread:
    """The spread of a slide's attention logits (see the module docstring); ``scores`` non-empty."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return AttentionSpread(0, 0.0, 0.0, 0.0, 1.0, 1.0)
    weights = attention_weights(scores)
    entropy = float(-np.sum(weights * np.log(np.where(weights > 0, weights, 1.0))))
    effective = math.exp(entropy)
    return AttentionSpread(int(scores.size), float(scores.min()), float(scores.max()), effective,
                           min(1.0, effective / scores.size), float(weights.max() * scores.size))


def scale_values(scores: np.ndarray, scale: str = "rank") -> np.ndarray:
    """Colour values in [0, 1] of each patch on a scale of :data:`SCALES`.

    ``rank``: percentile rank within the slide. ``weight``: ``log2(N * w)`` mapped from
    ``[-R, R]`` (:data:`WEIGHT_LOG2_RANGE`) to [0, 1], clipped; 0.5 is the flat weight ``1 / N``.
    """
    if scale == "rank":
        return percentile_ranks(scores)
    if scale != "weight":
        raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return np.zeros(0, np.float32)
    # log2(N * w) from the log-softmax: a weight that underflows to 0 stays at the scale's low end
    top = scores.max()
    log_weights = scores - top - np.log(np.exp(scores - top).sum())
    ratio_log2 = log_weights / np.log(2) + np.log2(scores.size)
    return np.clip((ratio_log2 + WEIGHT_LOG2_RANGE) / (2 * WEIGHT_LOG2_RANGE), 0, 1).astype(np.float32)


def scale_legend(scale: str) -> dict[str, str]:
    """Title and end labels of the colour bar of a scale: ``title``, ``low``, ``mid``, ``high``."""
    if scale == "rank":
        return {"title": "attention: rank in slide", "low": "lowest", "mid": "", "high": "highest"}
    ends = f"{2 ** WEIGHT_LOG2_RANGE:g}"
    return {"title": "attention vs. flat (all slides)", "low": f"1/{ends}x", "mid": "1x", "high": f"{ends}x"}


def write_spread(folder: str | os.PathLike, spread: AttentionSpread, scale: str) -> Path:
    """Write :data:`SPREAD_FILE` (the spread and the scale of the overlay) into ``folder``, atomically."""
    path = Path(folder) / SPREAD_FILE
    data = {"scale": scale, **scale_legend(scale), "spread": spread.as_dict()}
    text = json.dumps(data, indent=1)
    return write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def read_spread(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What :func:`write_spread` wrote in ``folder``; None when absent or unreadable (older heatmaps)."""
    try:
        return json.loads((Path(folder) / SPREAD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
