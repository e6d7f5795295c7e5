"""The one Dice / F1: the official ISIC MILK10k scorer's per-class rule, numpy only.

``isic-challenge-scoring`` (``classification.py``, ``metrics.binary_dice``) cuts truth and
prediction at ``> 0.5`` (strictly greater: 0.5 itself is a negative decision), scores each class
``2TP / (2TP + FP + FN)`` and, when ``TP + FP + FN == 0`` (the class is absent from the truth and
never predicted), scores it 1.0 ("a perfect answer"); the MILK10k target is the plain mean of the
per-class values. sklearn's ``f1_score(zero_division=0)`` scores that case 0 instead, so it is not
used anywhere. This module sits in ``core`` so that every layer (training, tabular, evaluation)
scores the same way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

DECISION_THRESHOLD = 0.5


def as_2d(a: Any) -> np.ndarray:
    """As a float64 2-D array (a 1-D input becomes one column)."""
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def argmax_onehot(scores: Any) -> np.ndarray:
    """One-hot (float) decisions at the row argmax (first index on ties)."""
    s = as_2d(scores)
    out = np.zeros_like(s)
    out[np.arange(len(s)), s.argmax(axis=1)] = 1.0
    return out


def dice_per_class(y_true: Any, scores: Any, threshold: float | np.ndarray = DECISION_THRESHOLD) -> np.ndarray:
    """Per-class Dice (= F1) of ``scores > threshold`` (scalar or per class) against ``y_true > 0.5``;
    1.0 for a class with ``TP + FP + FN == 0``, as the official scorer."""
    t = as_2d(y_true) > 0.5
    p = as_2d(scores) > np.asarray(threshold, dtype=np.float64)
    tp = (t & p).sum(axis=0)
    den = t.sum(axis=0) + p.sum(axis=0)  # = 2TP + FP + FN
    return np.where(den == 0, 1.0, 2.0 * tp / np.maximum(den, 1))


def macro_dice(y_true: Any, scores: Any, threshold: float | np.ndarray = DECISION_THRESHOLD) -> float:
    """Mean per-class Dice: the MILK10k official score when ``threshold`` is 0.5."""
    return float(dice_per_class(y_true, scores, threshold).mean())
