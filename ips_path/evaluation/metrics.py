"""Slide-level classification metrics over class probabilities: ROC AUC, balanced accuracy, recall.

Plain functions over numpy arrays. Labels are class indices ``0..K-1``; probabilities are
``(n, K)`` rows (binary tasks too: column 1 is the score of class 1). Metrics that a set of slides
cannot define (AUC without both classes, recall of an absent class) are NaN, never an exception,
so a small validation set still gives the metrics it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["average_precision", "balanced_accuracy", "bootstrap_intervals", "calibration", "rank_values",
           "classification_metrics", "confusion_matrix", "macro_auc", "macro_auprc", "patient_level",
           "per_class_recall", "prediction_metrics", "roc_auc", "roc_curve"]


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
    ranks = rank_values(scores)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def rank_values(values: np.ndarray) -> np.ndarray:
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
        ``auc`` (see :func:`macro_auc`), ``auprc`` (see :func:`macro_auprc`), ``balanced_accuracy``,
        ``accuracy`` and ``recall_<class name>`` for every class.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, len(class_names))
    predictions = probabilities.argmax(axis=1)
    recall = per_class_recall(labels, predictions, len(class_names))
    out = {
        "auc": macro_auc(labels, probabilities),
        "auprc": macro_auprc(labels, probabilities),
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


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels).ravel(), np.asarray(predictions).ravel()), 1)
    return matrix


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: ``sum_n (R_n - R_{n-1}) P_n``.

    The same step-wise definition as scikit-learn's ``average_precision_score`` (no interpolation),
    with thresholds at every distinct score.

    Returns
    -------
    float
        In [0, 1]; NaN without a positive.
    """
    is_positive = np.asarray(is_positive).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(is_positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_truth = scores[order], is_positive[order]
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(sorted_truth)[last_of_run]
    predicted_pos = np.flatnonzero(last_of_run) + 1
    precision = true_pos / predicted_pos
    recall_steps = np.diff(np.r_[0, true_pos]) / n_pos
    return float(np.sum(recall_steps * precision))


def macro_auprc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """AUPRC (average precision) over K classes: of class 1 for two, else the one-vs-rest macro mean."""
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, -1)
    if probabilities.shape[1] == 2:
        return average_precision(labels == 1, probabilities[:, 1])
    values = [average_precision(labels == k, probabilities[:, k]) for k in range(probabilities.shape[1])]
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def calibration(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram of the top-class confidence.

    Slides are binned by the probability of their predicted class into ``n_bins`` equal-width bins
    of [0, 1]; ECE is the slide-weighted mean of ``|accuracy - mean confidence|`` over the bins.

    Returns
    -------
    dict
        ``ece`` (NaN without slides) and ``bins``: per non-empty bin ``lower``, ``upper``,
        ``confidence`` (mean), ``accuracy`` and ``count``.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, -1)
    if not labels.size:
        return {"ece": float("nan"), "bins": []}
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = index == b
        if not members.any():
            continue
        acc, conf, count = float(correct[members].mean()), float(confidence[members].mean()), int(members.sum())
        ece += count / labels.size * abs(acc - conf)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "confidence": conf, "accuracy": acc,
                     "count": count})
    return {"ece": float(ece), "bins": bins}


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, *, n_bootstrap: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of AUC, AUPRC and balanced accuracy, resampling slides (or patients).

    Resamples on which a metric is undefined (a class missing) are left out of that metric's interval.

    Returns
    -------
    dict
        ``auc``, ``auprc``, ``balanced_accuracy`` -> (low, high); (NaN, NaN) when undefined.
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, -1)
    n_classes = probabilities.shape[1]
    metrics = {"auc": macro_auc, "auprc": macro_auprc,
               "balanced_accuracy": lambda y, p: balanced_accuracy(y, p.argmax(axis=1), n_classes)}
    out = {name: (float("nan"), float("nan")) for name in metrics}
    if not labels.size:
        return out
    draws = np.random.default_rng(seed).integers(0, labels.size, size=(n_bootstrap, labels.size))
    tail = (1 - level) / 2 * 100
    for name, metric in metrics.items():
        if np.isnan(metric(labels, probabilities)):
            continue
        values = np.array([metric(labels[d], probabilities[d]) for d in draws])
        values = values[~np.isnan(values)]
        if values.size:
            out[name] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return out


def patient_level(case_ids: Sequence[str], labels: np.ndarray,
                  probabilities: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slide predictions pooled per patient: the mean of each patient's slide probabilities.

    Returns
    -------
    case_ids : list of str
        Sorted.
    labels : (n_patients,) int array
        The label of each patient's first slide (slides of one patient share it in a manifest).
    probabilities : (n_patients, K) float array
    """
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, -1)
    members: dict[str, list[int]] = {}
    for i, case_id in enumerate(case_ids):
        members.setdefault(case_id, []).append(i)
    patients = sorted(members)
    pooled = np.array([probabilities[members[p]].mean(axis=0) for p in patients]).reshape(len(patients), -1)
    return patients, np.array([labels[members[p][0]] for p in patients], dtype=labels.dtype), pooled


def prediction_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                       case_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """What ``metrics.json`` of ``ipspath predict`` holds (JSON-safe: undefined values are None).

    Parameters
    ----------
    labels : (n,) class indices
    probabilities : (n, K) class probabilities
    class_names : K names
    case_ids : n patient ids, optional
        Also the same metrics over patients (:func:`patient_level`: the mean of a patient's slides),
        under ``patients``.

    Returns
    -------
    dict
        ``n_slides``, ``classes``, ``auc``, ``auprc``, ``balanced_accuracy`` each with its bootstrap
        95 % interval (``<name>_ci95``: low, high), ``accuracy``, ``ece`` (expected calibration error,
        10 bins) with ``calibration_bins`` (the reliability diagram), ``confusion_matrix`` (rows:
        true class); with ``case_ids`` also ``patients`` (the same, ``n_patients`` for ``n_slides``).
    """
    out = _scored(labels, probabilities, class_names)
    if case_ids is not None:
        _, patient_labels, pooled = patient_level(case_ids, labels, probabilities)
        patients = _scored(patient_labels, pooled, class_names)
        patients["n_patients"] = patients.pop("n_slides")
        del patients["classes"]
        out["patients"] = patients
    return out


def _scored(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    labels = np.asarray(labels).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(labels.size, len(class_names))
    found = classification_metrics(labels, probabilities, class_names)
    intervals = bootstrap_intervals(labels, probabilities)
    reliability = calibration(labels, probabilities)
    out: dict[str, Any] = {"n_slides": int(labels.size), "classes": list(class_names)}
    for name in ("auc", "auprc", "balanced_accuracy"):
        out[name] = _finite(found[name])
        out[f"{name}_ci95"] = [_finite(v) for v in intervals[name]]
    out.update(accuracy=_finite(found["accuracy"]), ece=_finite(reliability["ece"]),
               calibration_bins=[{k: _finite(v) if isinstance(v, float) else v for k, v in b.items()}
                                 for b in reliability["bins"]],
               confusion_matrix=confusion_matrix(labels, probabilities.argmax(axis=1), len(class_names)).tolist())
    return out


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)
