"""Offline evaluation of scores against labels: ROC AUC, PR AUC and the confusion at a threshold."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class Evaluation:
    """Figures of a scorer on labelled windows; anomalies are the positive class."""

    n_windows: int
    n_anomalies: int
    threshold: float
    auc: float
    pr_auc: float
    precision: float
    recall: float
    f1: float
    accuracy: float
    fpr: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: sum over the distinct score
    thresholds of (recall gained) x (precision there). Windows with equal scores are flagged
    together, so the result does not depend on the order of tied windows."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    true_positives = np.cumsum(positive[order])
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked) != 0), ranked.size - 1]
    hits = true_positives[last_of_tie]
    precision = hits / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, hits]) / n_pos
    return float((recall_gain * precision).sum())


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def evaluate_scores(scores: np.ndarray, positive: np.ndarray, threshold: float) -> Evaluation:
    """Score figures for windows whose score exceeds `threshold` being flagged as anomalies."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    flagged = scores > threshold
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    fn = int((~flagged & positive).sum())
    tn = int((~flagged & ~positive).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return Evaluation(
        n_windows=int(scores.size),
        n_anomalies=int(positive.sum()),
        threshold=float(threshold),
        auc=roc_auc(scores, positive),
        pr_auc=average_precision(scores, positive),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        accuracy=_ratio(tp + tn, scores.size),
        fpr=_ratio(fp, fp + tn),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )


def format_evaluation(result: Evaluation) -> str:
    """A readable report with the confusion matrix, as `monitor evaluate` prints it."""
    return "\n".join(
        [
            f"windows: {result.n_windows} ({result.n_anomalies} anomalous)   threshold: {result.threshold:.6g}",
            f"ROC AUC   {result.auc:.4f}    PR AUC   {result.pr_auc:.4f}",
            f"precision {result.precision:.4f}    recall   {result.recall:.4f}    F1 {result.f1:.4f}",
            f"accuracy  {result.accuracy:.4f}    false-positive rate {result.fpr:.4f}",
            "",
            "confusion matrix     predicted normal  predicted anomaly",
            f"  actual normal      {result.tn:>16}  {result.fp:>17}",
            f"  actual anomaly     {result.fn:>16}  {result.tp:>17}",
        ]
    )


def format_side_by_side(results: dict[str, Evaluation]) -> str:
    """Several models' figures on the same windows, one column each (the LSTM beside its PCA yardstick)."""
    names = list(results)
    rows = [("threshold", "threshold", ".6g"), ("ROC AUC", "auc", ".4f"), ("PR AUC", "pr_auc", ".4f")]
    rows += [("precision", "precision", ".4f"), ("recall", "recall", ".4f"), ("F1", "f1", ".4f")]
    rows += [("false-positive rate", "fpr", ".4f")]
    lines = [f"{'':<20}" + "".join(f"{name:>14}" for name in names)]
    for label, key, spec in rows:
        lines.append(f"{label:<20}" + "".join(f"{getattr(results[name], key):>14{spec}}" for name in names))
    return "\n".join(lines)


def format_false_alarms(held_out: dict[str, Any]) -> str:
    """Nominal against realised false-alarm rates per model, pooled and per recording (`held_out_false_alarms`)."""
    names = list(held_out["nominal"])
    lines = [
        f"false alarms on held-out normal windows ({held_out['data']}), nominal (the share of a recording's "
        "calibration windows above the threshold; pooled: the recordings' median) -> realised:"
    ]
    lines.append(
        "  pooled: " + ", ".join(f"{n} {held_out['nominal'][n]:.2%} -> {held_out['realised'][n]:.2%}" for n in names)
    )
    for item in held_out["recordings"]:
        realised = ", ".join(f"{n} {item['nominal'][n]:.2%} -> {item['realised'][n]:.2%}" for n in names)
        lines.append(f"  {item['data']} ({item['windows']} windows): {realised}")
    return "\n".join(lines)
