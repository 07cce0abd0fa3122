"""Binary and one-vs-rest metrics for ``--positive-class``: precision, recall and F1 from the confusion matrix,
ROC AUC from the scores. Computed here (a few lines of numpy) rather than pulling in scikit-learn."""

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
