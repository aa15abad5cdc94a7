"""Slide-level classification metrics over class probabilities: ROC AUC, balanced accuracy, recall.

Plain functions over numpy arrays. Labels are class indices ``0..K-1``; probabilities are
``(n, K)`` rows (binary tasks too: column 1 is the score of class 1). Metrics that a set of slides
cannot define (AUC without both classes, recall of an absent class) are NaN, never an exception,
so a small validation set still gives the metrics it can.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["auc_confidence_interval", "balanced_accuracy", "classification_metrics", "confusion_matrix", "macro_auc",
           "per_class_recall", "roc_auc", "roc_curve"]


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary truth ``is_positive``.

    Computed as the Mann-Whitney U statistic: the probability that a random positive scores higher
    than a random negative, ties counting one half.

    Parameters
    ----------
    is_positive : (n,) array of bool or 0/1
        Ground truth.
    scores : (n,) array of float
        Higher means more likely positive.

    Returns
    -------
    float
        In [0, 1]; NaN when only one class is present.
    """
    is_positive = np.asarray(is_positive).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if is_positive.shape != scores.shape:
        raise ValueError(f"{is_positive.shape[0]} labels but {scores.shape[0]} scores")
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC of a classifier over K classes.

    Two classes: the AUC of the class-1 probability. More: the one-vs-rest macro average, the mean
    over classes of the AUC of ``probabilities[:, k]`` for "class k vs the others", over the classes
    for which it is defined (present, and not the only class present).

    Parameters
    ----------
    labels : (n,) int array
        Class indices.
    probabilities : (n, K) float array
        Class probabilities (or any scores, one column per class).

    Returns
    -------
    float
        NaN when no class has a defined AUC.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.size:
        raise ValueError(f"probabilities must be (n, K) with n = {labels.size}, got {probabilities.shape}")
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        return roc_auc(labels == 1, probabilities[:, 1])
    aucs = [roc_auc(labels == k, probabilities[:, k]) for k in range(n_classes)]
    defined = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def per_class_recall(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall (sensitivity) of every class: the share of its slides predicted as it.

    Returns
    -------
    (n_classes,) float array
        NaN for a class with no slide.
    """
    labels = np.asarray(labels).ravel()
    predictions = np.asarray(predictions).ravel()
    recall = np.full(n_classes, np.nan)
    for k in range(n_classes):
        of_class = labels == k
        if of_class.any():
            recall[k] = float((predictions[of_class] == k).mean())
    return recall


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present; NaN without slides."""
    recall = per_class_recall(labels, predictions, n_classes)
    return float(np.nanmean(recall)) if not np.isnan(recall).all() else float("nan")


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, float]:
    """The metrics ``ipspath train`` logs for a set of slides; the prediction is the most probable class.

    Returns
    -------
    dict
        ``auc`` (see :func:`macro_auc`), ``balanced_accuracy``, ``accuracy`` and ``recall_<class name>``
        for every class.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, len(class_names))
    predictions = probabilities.argmax(axis=1)
    recall = per_class_recall(labels, predictions, len(class_names))
    out = {
        "auc": macro_auc(labels, probabilities),
        "balanced_accuracy": balanced_accuracy(labels, predictions, len(class_names)),
        "accuracy": float((predictions == labels).mean()) if labels.size else float("nan"),
    }
    out.update({f"recall_{name}": float(r) for name, r in zip(class_names, recall, strict=True)})
    return out


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the ROC curve: false- and true-positive rates at every distinct threshold.

    Returns
    -------
    fpr, tpr : (m,) arrays
        From (0, 0) to (1, 1); tied scores make one diagonal step. Empty when only one class is present.
    """
    is_positive = np.asarray(is_positive).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_truth = scores[order], is_positive[order]
    # one point after each run of equal scores
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(sorted_truth)[last_of_run]
    false_pos = np.cumsum(~sorted_truth)[last_of_run]
    return np.r_[0.0, false_pos / n_neg], np.r_[0.0, true_pos / n_pos]


def auc_confidence_interval(labels: np.ndarray, probabilities: np.ndarray, *, n_bootstrap: int = 2000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`macro_auc`, resampling slides with replacement.

    Resamples that lack a class the AUC needs are drawn again (they are NaN and skipped).

    Returns
    -------
    (low, high) : floats
        NaN, NaN when the AUC itself is undefined.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, -1)
    if np.isnan(macro_auc(labels, probabilities)):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels.size, size=(n_bootstrap, labels.size))
    aucs = np.array([macro_auc(labels[d], probabilities[d]) for d in draws])
    aucs = aucs[~np.isnan(aucs)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels).ravel(), np.asarray(predictions).ravel()), 1)
    return matrix
