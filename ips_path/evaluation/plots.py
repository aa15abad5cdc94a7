"""Training curves and ROC curves as PNGs (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ips_path.runtime.atomic import write_atomically

__all__ = ["plot_reliability", "plot_roc", "plot_scatter", "plot_training_curves"]


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Draw losses (left) and validation metrics (right) per epoch and write them to ``path``, atomically.

    Parameters
    ----------
    history : sequence of dict
        One row per epoch, as in ``metrics.csv``: ``epoch``, ``train_loss`` and, when there is a
        validation set, ``val_loss``, ``val_auc``, ``val_balanced_accuracy``, ``val_recall_<class>``
        (several label columns: also ``val_<task>_auc``).
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
    survival = any("val_c_index" in row for row in history)
    loss_ax.set(xlabel="epoch", ylabel="loss (survival likelihood)" if survival else "loss (cross-entropy)",
                title="Loss")
    metric_keys = ["val_auc", "val_balanced_accuracy", "val_c_index"] + sorted(
        {k for row in history for k in row if k.startswith("val_recall_")
         or (k.startswith("val_") and k.endswith("_auc") and k != "val_auc")})  # several tasks: each one's AUC
    for key in metric_keys:
        _plot(metric_ax, epochs, history, key, key.removeprefix("val_").replace("_", " "),
              linestyle="-" if key in ("val_auc", "val_balanced_accuracy", "val_c_index") else ":")
    metric_ax.set(xlabel="epoch", ylabel="validation metric", title="Validation", ylim=(-0.02, 1.02))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    _save(fig, path)


def plot_roc(labels: Sequence[int], probabilities: Sequence[Sequence[float]], class_names: Sequence[str],
             path: str | os.PathLike, auc: float | None = None, ci: Sequence[float | None] | None = None) -> None:
    """Draw the ROC curve (two classes) or one-vs-rest curves (more) and write them to ``path``, atomically.

    Parameters
    ----------
    labels : (n,) class indices
    probabilities : (n, K) class probabilities
    class_names : K names
    path : path-like
        Output PNG.
    auc, ci : float, (low, high), optional
        Shown in the title.
    """
    import numpy as np
    from matplotlib.figure import Figure

    from ips_path.evaluation.metrics import roc_auc, roc_curve

    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    shown = [1] if len(class_names) == 2 else range(len(class_names))
    for k in shown:
        truth, scores = labels == k, probabilities[:, k]
        fpr, tpr = roc_curve(truth, scores)
        if fpr.size:
            ax.plot(fpr, tpr, linewidth=2, label=f"{class_names[k]} (AUC {roc_auc(truth, scores):.3f})")
    title = "ROC"
    if auc is not None:
        title += f": AUC {auc:.3f}"
        if ci is not None and None not in ci:
            title += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01),
           aspect="equal")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    _save(fig, Path(path))


def plot_reliability(bins: Sequence[Mapping[str, float]], path: str | os.PathLike, ece: float | None = None) -> None:
    """Draw the reliability diagram (accuracy against mean confidence of each non-empty bin) to ``path``.

    Parameters
    ----------
    bins : bins of :func:`~ips_path.evaluation.metrics.calibration` (``lower``, ``upper``, ``confidence``,
        ``accuracy``, ``count``)
    path : path-like
        Output PNG (written atomically).
    ece : float, optional
        Expected calibration error, shown in the title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    if bins:
        ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=[b["upper"] - b["lower"] for b in bins],
               align="edge", alpha=0.6, edgecolor="black", label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color="C3",
                label="mean confidence")
        for b in bins:
            ax.annotate(str(b["count"]), ((b["lower"] + b["upper"]) / 2, b["accuracy"]), ha="center", va="bottom",
                        fontsize="x-small")
    title = "Reliability" + (f": ECE {ece:.3f}" if ece is not None else "")
    ax.set(xlabel="confidence (probability of the predicted class)", ylabel="accuracy", title=title,
           xlim=(0, 1), ylim=(0, 1.05), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    _save(fig, Path(path))


def plot_scatter(truth: Sequence[float], predicted: Sequence[float], path: str | os.PathLike, *, name: str,
                 title: str) -> None:
    """Draw predicted against true values of a continuous outcome, with the identity line, to ``path``.

    Parameters
    ----------
    truth, predicted : sequence of float
        One pair per slide, in the outcome's unit.
    path : path-like
        Output PNG (written atomically).
    name : str
        The outcome (the manifest column), for the axes.
    title : str
        Shown above the plot (e.g. the correlation).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    values = [*truth, *predicted]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    ax.plot([low, high], [low, high], color="0.7", linestyle="--", linewidth=1, label="predicted = true")
    ax.scatter(truth, predicted, s=14, alpha=0.7, color="C0", label="slides")
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    _save(fig, Path(path))


def _save(fig, path: Path) -> None:
    write_atomically(path, lambda partial: fig.savefig(partial, format="png"))


def _plot(ax, epochs: list, history: Sequence[Mapping[str, float]], key: str, label: str, **style) -> None:
    values = [row.get(key, math.nan) for row in history]
    if any(v is not None and not math.isnan(v) for v in values):
        ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", markersize=3, label=label,
                **style)
