"""Training curves as a PNG (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Draw losses (left) and validation metrics (right) per epoch and write them to ``path``, atomically.

    Parameters
    ----------
    history : sequence of dict
        One row per epoch, as in ``metrics.csv``: ``epoch``, ``train_loss`` and, when there is a
        validation set, ``val_loss``, ``val_auc``, ``val_balanced_accuracy``, ``val_recall_<class>``.
        Missing or NaN values leave gaps.
    path : path-like
        Output PNG.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and never touches pyplot's state

    path = Path(path)
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        _plot(loss_ax, epochs, history, key, label)
    loss_ax.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="Loss")
    metric_keys = ["val_auc", "val_balanced_accuracy"] + sorted(
        {k for row in history for k in row if k.startswith("val_recall_")})
    for key in metric_keys:
        _plot(metric_ax, epochs, history, key, key.removeprefix("val_").replace("_", " "),
              linestyle="-" if key in ("val_auc", "val_balanced_accuracy") else ":")
    metric_ax.set(xlabel="epoch", ylabel="validation metric", title="Validation", ylim=(-0.02, 1.02))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png")
    os.replace(partial, path)


def _plot(ax, epochs: list, history: Sequence[Mapping[str, float]], key: str, label: str, **style) -> None:
    values = [row.get(key, math.nan) for row in history]
    if any(v is not None and not math.isnan(v) for v in values):
        ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", markersize=3, label=label,
                **style)
