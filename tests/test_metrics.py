"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ips_path.evaluation.metrics import (
    balanced_accuracy,
    bootstrap_intervals,
    classification_metrics,
    confusion_matrix,
    macro_auc,
    per_class_recall,
    roc_auc,
    roc_curve,
)
from ips_path.evaluation.probe import linear_probe_auc


def test_roc_auc_counts_ordered_pairs_and_half_ties():
    # positives 0.9, 0.4, 0.35; negatives 0.8, 0.4, 0.1 -> 9 pairs:
    # 0.9 beats all 3; 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.8; 0.35 beats 0.1 only.
    truth = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.35, 0.1])
    assert roc_auc(truth, scores) == pytest.approx((3 + 1.5 + 1) / 9)


def test_roc_auc_perfect_reversed_and_undefined():
    truth = np.array([0, 0, 1, 1])
    assert roc_auc(truth, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(truth, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(truth, np.full(4, 0.5)) == 0.5
    assert math.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30))
def test_roc_auc_equals_pair_count(pairs):
    truth = np.array([p for p, _ in pairs])
    scores = np.array([s for _, s in pairs], dtype=float)
    pos, neg = scores[truth], scores[~truth]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(roc_auc(truth, scores))
        return
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(truth, scores) == pytest.approx(expected)


def test_binary_auc_uses_class_one_column():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    # class-1 scores: negatives 0.2, 0.5; positives 0.7, 0.4 -> pairs won: 0.7>both, 0.4>0.2 -> 3/4
    assert macro_auc(labels, probabilities) == pytest.approx(0.75)


def test_three_class_one_vs_rest_macro_auc():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.array([
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.5, 0.4],
        [0.3, 0.3, 0.4],
        [0.2, 0.6, 0.2],
        [0.2, 0.5, 0.3],
    ])
    # class 0: positives 0.7, 0.3 vs negatives 0.5, 0.1, 0.2, 0.2 -> 4 + 3 = 7 of 8 pairs
    # class 1: positives 0.4, 0.6 vs negatives 0.2, 0.5, 0.3, 0.5 -> 2 + 4 = 6 of 8
    # class 2: positives 0.4, 0.3 vs negatives 0.1, 0.1, 0.4, 0.2 -> (3 + a tie) + 3 = 6.5 of 8
    assert macro_auc(labels, probabilities) == pytest.approx((7 / 8 + 6 / 8 + 6.5 / 8) / 3)


def test_macro_auc_skips_classes_without_a_defined_auc():
    labels = np.array([0, 0, 1, 1])  # class 2 absent
    probabilities = np.array([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    assert macro_auc(labels, probabilities) == pytest.approx(1.0)


def test_recall_and_balanced_accuracy():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 2])
    np.testing.assert_allclose(per_class_recall(labels, predictions, 4), [0.75, 0.5, 1.0, np.nan])
    assert balanced_accuracy(labels, predictions, 4) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert math.isnan(balanced_accuracy(np.array([], dtype=int), np.array([], dtype=int), 2))


def test_classification_metrics_names_each_class():
    labels = np.array([0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    metrics = classification_metrics(labels, probabilities, ["negative", "positive"])
    assert metrics["recall_negative"] == 1.0
    assert metrics["recall_positive"] == 0.5
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["auc"] == 1.0


def test_roc_curve_points_and_area():
    truth = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    fpr, tpr = roc_curve(truth, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(truth, scores))
    assert roc_curve([1, 1], [0.2, 0.3])[0].size == 0


def test_auc_interval_contains_the_auc_and_narrows_with_more_slides():
    rng = np.random.default_rng(0)

    def cohort(n):
        labels = rng.integers(0, 2, n)
        p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
        return labels, np.stack([1 - p1, p1], 1)

    small, large = cohort(30), cohort(600)
    lo_s, hi_s = bootstrap_intervals(*small)["auc"]
    lo_l, hi_l = bootstrap_intervals(*large)["auc"]
    assert lo_s <= macro_auc(*small) <= hi_s and lo_l <= macro_auc(*large) <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert np.isnan(bootstrap_intervals(np.array([1, 1]), np.array([[0.2, 0.8], [0.1, 0.9]]))["auc"][0])


def test_confusion_matrix_rows_are_truth():
    m = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_a_linear_probe_scores_separable_features_high_and_noise_at_chance():
    rng = np.random.default_rng(0)
    kind = rng.random(400) < 0.2
    noise = rng.normal(size=(400, 16)).astype(np.float16)
    separable = noise.astype(np.float32) + 3.0 * kind[:, None] * (np.arange(16) == 5)
    assert linear_probe_auc(separable[:200], kind[:200], separable[200:], kind[200:]) > 0.95
    assert abs(linear_probe_auc(noise[:200], kind[:200], noise[200:], kind[200:]) - 0.5) < 0.15
    with pytest.raises(ValueError, match="both kinds"):
        linear_probe_auc(noise[:10], np.zeros(10, bool), noise, kind)
