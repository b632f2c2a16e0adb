"""ROC AUC, average precision and the confusion at a threshold, against hand and brute-force computations."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from monitor.training.evaluation import average_precision, evaluate_scores, format_evaluation, roc_auc


def pairwise_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random anomaly > score of a random normal window), ties counted half."""
    wins = 0.0
    pos, neg = scores[positive], scores[~positive]
    for p, n in product(pos, neg):
        wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def threshold_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """sum_k (R_k - R_{k-1}) P_k over every distinct threshold, flagging scores >= the threshold."""
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= threshold
        tp = np.sum(flagged & positive)
        precision, recall = tp / flagged.sum(), tp / positive.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


B = np.array


@pytest.mark.parametrize(
    ("scores", "positive", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [False, False, True, True], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [False, True, False, True], 0.5),
        # pairs (pos, neg): (.9,.5)=1 (.9,.1)=1 (.5,.5)=1/2 (.5,.1)=1  -> 3.5 / 4
        ([0.9, 0.5, 0.5, 0.1], [True, False, True, False], 0.875),
        # 3 positives x 2 negatives: 0.4 beats 0.3 only; 0.7 beats both; 0.3 ties 0.3 and loses to 0.6
        # -> (1 + 2 + .5) / 6
        ([0.4, 0.7, 0.3, 0.3, 0.6], [True, True, True, False, False], 3.5 / 6),
    ],
)
def test_roc_auc_hand_computed(scores, positive, expected):
    assert roc_auc(B(scores), B(positive)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_matches_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 300
        positive = rng.random(n) < 0.3
        scores = rng.normal(size=n) + 0.8 * positive
        if trial % 2:
            scores = np.round(scores, 1)  # many ties
        assert roc_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive), abs=1e-12)


def test_roc_auc_is_nan_with_one_class_and_accepts_integer_labels():
    assert math.isnan(roc_auc(B([0.1, 0.2]), B([True, True])))
    assert math.isnan(roc_auc(B([0.1, 0.2]), B([False, False])))
    scores = B([1.0, 2.0, 3.0])
    # 0/1 integer labels mean the same as booleans (not fancy indices).
    assert roc_auc(scores, B([1, 0, 1])) == pytest.approx(0.5)
    assert roc_auc(list(scores), [False, True, True]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("scores", "positive", "expected"),
    [
        ([0.9, 0.8, 0.2, 0.1], [True, True, False, False], 1.0),
        # hits at ranks 1 and 3: (1/1 + 2/3) / 2
        ([0.9, 0.8, 0.7, 0.1], [True, False, True, False], (1.0 + 2.0 / 3.0) / 2.0),
        # ranks 2 and 4 of 4: (1/2 + 2/4) / 2
        ([0.9, 0.8, 0.7, 0.1], [False, True, False, True], 0.5),
        # a tie at 0.5 between a positive and a negative: flagged together -> R .5 at P 1, then R 1 at P 2/3
        ([0.9, 0.5, 0.5, 0.1], [True, False, True, False], 0.5 * 1.0 + 0.5 * 2.0 / 3.0),
        ([0.9, 0.5, 0.5, 0.1], [True, True, False, False], 0.5 * 1.0 + 0.5 * 2.0 / 3.0),
        # everything tied: the precision of flagging everything, the prevalence
        ([0.3, 0.3, 0.3, 0.3, 0.3], [False, True, False, False, False], 0.2),
        ([0.5, 0.5], [False, True], 0.5),
        ([0.5, 0.5], [True, False], 0.5),
    ],
)
def test_average_precision_hand_computed(scores, positive, expected):
    assert average_precision(B(scores), B(positive)) == pytest.approx(expected, abs=1e-12)


def test_average_precision_matches_brute_force_and_ignores_the_order_of_ties():
    rng = np.random.default_rng(1)
    for trial in range(6):
        n = 200
        positive = rng.random(n) < 0.25
        scores = rng.normal(size=n) + positive
        if trial % 2:
            scores = np.round(scores, 1)
        expected = threshold_average_precision(scores, positive)
        assert average_precision(scores, positive) == pytest.approx(expected, abs=1e-12)
        order = rng.permutation(n)
        assert average_precision(scores[order], positive[order]) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(average_precision(B([0.1, 0.2]), B([False, False])))
    assert average_precision(B([0.1, 0.9, 0.5]), B([0, 1, 0])) == pytest.approx(1.0)


def test_confusion_at_a_threshold_strictly_greater_flags():
    scores = B([0.1, 0.5, 0.5, 0.9, 0.3, 0.7, 0.2, 0.6])
    positive = B([False, True, False, True, True, False, False, True])
    result = evaluate_scores(scores, positive, threshold=0.5)
    # flagged (> 0.5): 0.9 (pos), 0.7 (neg), 0.6 (pos); the two 0.5s are not flagged.
    assert (result.tp, result.fp, result.fn, result.tn) == (2, 1, 2, 3)
    assert result.tp + result.fp + result.fn + result.tn == result.n_windows == 8
    assert result.n_anomalies == 4
    assert result.threshold == 0.5
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 4)
    assert result.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert result.fpr == pytest.approx(1 / 4)
    assert result.accuracy == pytest.approx(5 / 8)
    assert result.auc == pytest.approx(pairwise_auc(scores, positive))
    assert result.pr_auc == pytest.approx(threshold_average_precision(scores, positive))

    # Just below 0.5 the tied windows are flagged.
    lower = evaluate_scores(scores, positive, threshold=0.4999)
    assert (lower.tp, lower.fp, lower.fn, lower.tn) == (3, 2, 1, 2)


def test_confusion_edge_cases():
    scores = B([0.1, 0.2, 0.3])
    nothing = evaluate_scores(scores, B([True, False, False]), threshold=1.0)
    assert (nothing.tp, nothing.fp, nothing.fn, nothing.tn) == (0, 0, 1, 2)
    assert (nothing.precision, nothing.recall, nothing.f1, nothing.fpr) == (0.0, 0.0, 0.0, 0.0)
    everything = evaluate_scores(scores, B([True, False, False]), threshold=-1.0)
    assert (everything.tp, everything.fp, everything.fn, everything.tn) == (1, 2, 0, 0)
    assert (everything.recall, everything.fpr) == (1.0, 1.0)
    assert everything.precision == pytest.approx(1 / 3)
    # Integer labels work like booleans.
    as_int = evaluate_scores(scores, B([1, 0, 0]), threshold=0.15)
    assert (as_int.tp, as_int.fp, as_int.fn, as_int.tn) == (0, 2, 1, 0)


def test_to_dict_and_format():
    result = evaluate_scores(B([0.1, 0.9, 0.8, 0.2]), B([False, True, False, False]), threshold=0.5)
    record = result.to_dict()
    for key in ("auc", "pr_auc", "f1", "precision", "recall", "fpr", "accuracy", "tp", "fp", "fn", "tn", "threshold"):
        assert key in record
    assert (record["tp"], record["fp"], record["fn"], record["tn"]) == (1, 1, 0, 2)
    text = format_evaluation(result)
    assert "ROC AUC   1.0000" in text
    assert "precision 0.5000" in text and "recall   1.0000" in text
    lines = text.splitlines()
    normal_row = next(line for line in lines if line.strip().startswith("actual normal"))
    anomaly_row = next(line for line in lines if line.strip().startswith("actual anomaly"))
    assert normal_row.split()[-2:] == ["2", "1"]  # tn, fp
    assert anomaly_row.split()[-2:] == ["0", "1"]  # fn, tp
