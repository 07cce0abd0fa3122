"""Metrics computed on the host from a finished evaluation (a few lines of numpy rather than scikit-learn, whose
definitions they follow): precision, recall, F1 and ROC AUC for ``--positive-class``; average precision, mAP and
F1 at tuned thresholds for multi-label data."""

from __future__ import annotations

import numpy as np


def one_vs_rest(confusion: np.ndarray, positive: int) -> dict[str, float]:
    """Precision, recall and F1 of class ``positive`` against all the others, from a ``[true, predicted]``
    confusion matrix (the predicted class being the top-1). An undefined ratio (no positive prediction, no
    positive image) is 0, as scikit-learn's ``zero_division=0``."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = confusion[positive, positive]
    predicted, actual = confusion[:, positive].sum(), confusion[positive, :].sum()
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count one half), by the Mann-Whitney rank statistic. NaN when either class is absent."""
    scores, is_positive = np.asarray(scores, dtype=np.float64), np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Ranks from 1, tied scores sharing the mean of their ranks.
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = mean_rank[inverse]
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# Multi-label metrics: one column of scores and 0/1 targets per class.


def _ranked(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one class: the distinct scores from the highest down, and the true and false positives when every
    image scoring at least that much is called positive (ties fall on the same side of a threshold)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(t)[ends]
    return s[ends], tp, (ends + 1) - tp


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score`` computes it,
    sum over thresholds of (recall step) x precision, without interpolation. NaN when no image is positive."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    _, tp, fp = _ranked(scores, targets)
    recall_steps = np.diff(np.r_[0.0, tp / positives])
    return float((recall_steps * tp / (tp + fp)).sum())


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(F1, threshold): the highest F1 over every threshold, and a threshold that reaches it (halfway between the
    lowest score called positive and the next score below, so a copy of the data set lands on the same side).
    An image is called positive when its score is at least the threshold. (NaN, 0.5) when no image is positive."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
    positives = int(targets.sum())
    if positives == 0:
        return float("nan"), 0.5
    distinct, tp, fp = _ranked(scores, targets)
    f1 = 2 * tp / (tp + fp + positives)
    best = int(np.argmax(f1))
    below = distinct[best + 1] if best + 1 < len(distinct) else distinct[best] - 1e-6
    return float(f1[best]), float((distinct[best] + below) / 2)


def multilabel_report(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
    """mAP, per-class AP and F1, and the set-level F1s of multi-label predictions.

    Thresholds are tuned per class on these images for the best F1 (``tuned``), which flatters the F1 of the
    images they were tuned on; pass the thresholds tuned on a validation set to score a test set honestly.
    Classes without a positive image have no AP or F1 and are left out of the means.
    """
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
    n_classes = scores.shape[1]
    ap = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(n_classes)])
    tuned = [best_f1_threshold(scores[:, c], targets[:, c]) for c in range(n_classes)]
    chosen = np.array([t for _, t in tuned]) if thresholds is None else np.asarray(thresholds, np.float64)
    predicted = scores >= chosen
    tp = (predicted & targets).sum(0)
    fp, fn = (predicted & ~targets).sum(0), (~predicted & targets).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(targets.any(0), 2 * tp / (2 * tp + fp + fn), np.nan)
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "f1_macro": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        "f1_micro": float(micro),
        "exact_match": float((predicted == targets).all(1).mean()) if len(scores) else float("nan"),
        "ap": ap.tolist(),
        "f1": f1.tolist(),
        "thresholds": chosen.tolist(),
        "positives": targets.sum(0).tolist(),
    }
