"""Metrics that reproduce the official ISIC scorers exactly (verified against their source).

Definitions (``isic-challenge-scoring`` 5.6 / 5.8, ``classification.py`` and ``metrics.py``):

* Per-class decisions: ``truth.gt(0.5)`` and ``prediction.gt(0.5)`` (strictly greater), so a
  probability of exactly 0.5 is a negative decision.
* Dice (= F1): ``2TP / (2TP + FP + FN)``; when ``TP + FP + FN == 0`` (class absent and never
  predicted) the scorer returns 1.0. The MILK10k target (5.8 ``ClassificationMetric.DICE``) is
  ``macro_average['dice']``, the plain mean of the per-class Dice values. Its one
  implementation is ``lib.core.scoring`` (re-exported here), so training, tabular and evaluation
  all score the same way.
* Balanced multiclass accuracy: labels are the row argmax, but a row whose maximum is shared by
  several columns gets the label ``'undecided'`` (always wrong; excluded when it is the truth).
  Score = mean over classes of ``TP_c / n_true_c``; classes with no true rows give 0/0 = NaN,
  which the pandas mean skips.
* AUC: ``sklearn.metrics.roc_auc_score`` per class; the macro value is the skip-NaN mean. The
  package itself fails (``auc_sens_80``) when a class has no positive truth row; here the
  class's AUC is NaN and skipped.
* pAUC (Kaggle ISIC 2024, N. Kurtansky's ``score``): labels flipped (``|y - 1|``), scores negated,
  ``roc_curve``, a point at ``max_fpr = |1 - min_tpr|`` added by linear interpolation, then
  ``auc`` of the truncated curve. This equals the area under the ROC curve above TPR = min_tpr,
  i.e. the integral of ``max(TPR - min_tpr, 0) dFPR``, range ``[0, 1 - min_tpr]`` (0.2 at 0.8).
  Its commented "equivalent" (``roc_auc_score(max_fpr=...)`` McClish value mapped back by
  ``0.5*m**2 + (m - 0.5*m**2)/(1 - 0.5)*(scaled - 0.5)``) agrees to float precision (tested).
  Note: the ISIC package's ``auc_sens_80`` is a different quantity (it also counts the area below
  TPR = 0.8 to the right of the crossing point).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import auc as _curve_area
from sklearn.metrics import roc_auc_score, roc_curve

from lib.core.errors import PipelineError
from lib.core.scoring import (  # noqa: F401  the one Dice, re-exported for evaluation
    DECISION_THRESHOLD,
    argmax_onehot,
    as_2d,
    dice_per_class,
    macro_dice,
)
from lib.core.io import ID, assert_unique_ids

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "binary")


def to_onehot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer labels -> float one-hot matrix (rows with label < 0 are all zero)."""
    labels = np.asarray(labels, dtype=int)
    out = np.zeros((len(labels), n_classes))
    ok = labels >= 0
    out[np.flatnonzero(ok), labels[ok]] = 1.0
    return out


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    """Row argmax as the ISIC scorer's ``_to_labels``: -1 ('undecided') when the max is shared."""
    p = as_2d(probs)
    is_max = p == p.max(axis=1, keepdims=True)
    lab = is_max.argmax(axis=1)
    lab[is_max.sum(axis=1) != 1] = -1
    return lab


def macro_f1_argmax(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 of single-label decisions (argmax, first index on ties); ``y`` one-hot or int labels.

    Classes that are absent and never predicted score 1.0, as in the ISIC scorer.
    """
    p = as_2d(probs)
    y = np.asarray(y)
    y1 = to_onehot(y, p.shape[1]) if y.ndim == 1 else y
    return macro_dice(y1, argmax_onehot(p))


def balanced_accuracy(y_true_onehot: np.ndarray, probs: np.ndarray) -> float:
    """ISIC balanced multiclass accuracy (tied maxima are 'undecided'; classes without truth skipped)."""
    t, p = argmax_labels(y_true_onehot), argmax_labels(probs)
    recalls = [np.mean(p[t == c] == c) for c in range(as_2d(probs).shape[1]) if np.any(t == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def auc_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC (sklearn ``roc_auc_score``); NaN where a class has only one truth value."""
    t, s = as_2d(y_true) > 0.5, as_2d(scores)
    return np.array([roc_auc_score(t[:, c], s[:, c]) if 0 < t[:, c].sum() < len(t) else np.nan
                     for c in range(s.shape[1])])


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Skip-NaN mean of ``auc_per_class`` (as the scorer's pandas mean)."""
    a = auc_per_class(y_true, scores)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def partial_auc(y_true_binary: np.ndarray, scores: np.ndarray, min_tpr: float = 0.8) -> float:
    """Kaggle ISIC 2024 pAUC above ``min_tpr`` (range [0, 1 - min_tpr]); NaN if one class only."""
    v_gt = np.abs(np.asarray(y_true_binary, dtype=np.float64).ravel() - 1)
    if v_gt.min() == v_gt.max():
        return float("nan")
    v_pred = -1.0 * np.asarray(scores, dtype=np.float64).ravel()
    max_fpr = abs(1 - min_tpr)
    fpr, tpr, _ = roc_curve(v_gt, v_pred)
    if max_fpr == 1:
        return float(_curve_area(fpr, tpr))
    if not 0 < max_fpr < 1:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr!r}")
    stop = np.searchsorted(fpr, max_fpr, "right")
    tpr = np.append(tpr[:stop], np.interp(max_fpr, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1]))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(_curve_area(fpr, tpr))


def topk_accuracy(y_multi: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows where any of the k top-scored classes (stable order on ties) is a positive label.

    Rows without any positive label count as misses.
    """
    s = as_2d(scores)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(as_2d(y_multi) > 0.5, top, axis=1).any(axis=1).mean())


def truth_matrix(truth_df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Truth columns ``y_<C>`` (lesion tables) or ``<C>`` (truth/prediction-style tables) as floats."""
    cols = [f"y_{c}" if f"y_{c}" in truth_df.columns else c for c in classes]
    missing = [c for c in cols if c not in truth_df.columns]
    if missing:
        raise PipelineError(f"truth table: missing label columns {missing}")
    return truth_df[cols].to_numpy(dtype=np.float64)


def align_to_truth(truth_df: pd.DataFrame, pred_df: pd.DataFrame,
                   classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, Y, P) in truth row order; raises ``PipelineError`` naming missing/extra ids or columns."""
    assert_unique_ids(truth_df, "truth table")
    assert_unique_ids(pred_df, "prediction table")
    tid, pid = truth_df[ID].astype(str), pred_df[ID].astype(str)
    missing, extra = sorted(set(tid) - set(pid)), sorted(set(pid) - set(tid))
    if missing or extra:
        raise PipelineError(
            f"prediction table: lesion_id mismatch with truth: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})")
    absent = [c for c in classes if c not in pred_df.columns]
    if absent:
        raise PipelineError(f"prediction table: missing class columns {absent}")
    pos = pd.Index(pid).get_indexer(tid)
    P = pred_df[list(classes)].to_numpy(dtype=np.float64)[pos]
    if not np.isfinite(P).all():
        bad = tid[~np.isfinite(P).all(axis=1)].tolist()
        raise PipelineError(f"prediction table: non-finite values for lesion_id {bad[:5]}")
    return tid.to_numpy(), truth_matrix(truth_df, classes), P


def score_table(truth_df: pd.DataFrame, pred_df: pd.DataFrame, classes: Sequence[str],
                task: str = "multiclass") -> dict[str, float]:
    """The metrics relevant to ``task`` (multiclass | multilabel | binary) as a flat float dict.

    multiclass: macro_dice (official MILK10k), balanced_accuracy, macro_auc, macro_f1_argmax,
    dice_<C>, auc_<C>; multilabel: macro_f1 (= macro Dice at 0.5), macro_auc, top1/top3
    accuracy, dice_<C>, auc_<C>; binary (one class): auc, pauc (above 80% TPR), dice.
    """
    if task not in TASKS:
        raise PipelineError(f"score_table: unknown task '{task}' (one of {TASKS})")
    _, Y, P = align_to_truth(truth_df, pred_df, classes)
    out: dict[str, float] = {"n": float(len(Y))}
    if task == "binary":
        out.update(auc=macro_auc(Y, P), pauc=partial_auc(Y[:, 0], P[:, 0]), dice=macro_dice(Y, P))
        return out
    dice, aucs = dice_per_class(Y, P), auc_per_class(Y, P)
    if task == "multiclass":
        out.update(macro_dice=float(dice.mean()), balanced_accuracy=balanced_accuracy(Y, P),
                   macro_auc=macro_auc(Y, P), macro_f1_argmax=macro_f1_argmax(Y, P))
    else:
        out.update(macro_f1=float(dice.mean()), macro_auc=macro_auc(Y, P),
                   top1_accuracy=topk_accuracy(Y, P, 1), top3_accuracy=topk_accuracy(Y, P, 3))
    out.update({f"dice_{c}": float(d) for c, d in zip(classes, dice)})
    out.update({f"auc_{c}": float(a) for c, a in zip(classes, aucs)})
    return out


def official_score(truth_df: pd.DataFrame, pred_df: pd.DataFrame,
                   classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Score with the installed ``isic_challenge_scoring.ClassificationScore`` (for reports/benchmarks).

    Returns macro_dice, balanced_accuracy, macro_auc, macro_auc_sens_80 (floats), ``per_category``
    (the package's DataFrame) and ``score`` (the ClassificationScore object).
    """
    try:
        from isic_challenge_scoring.classification import (
            ClassificationMetric,
            ClassificationScore,
        )
    except ImportError as e:
        raise ImportError("official_score needs the 'isic-challenge-scoring' package "
                          "(pip install isic-challenge-scoring)") from e
    classes = list(classes) if classes is not None else [c for c in pred_df.columns if c != ID]
    ids, Y, P = align_to_truth(truth_df, pred_df, classes)
    no_pos = [c for c, k in zip(classes, (Y > 0.5).sum(axis=0)) if k == 0]
    if no_pos:
        raise PipelineError(f"official_score: classes {no_pos} have no positive truth rows; "
                            "the official scorer cannot compute their AUC")
    idx = pd.Index(ids, name="image")
    truth = pd.DataFrame(Y, index=idx, columns=classes).sort_index()
    pred = pd.DataFrame(P, index=idx, columns=classes).sort_index()
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    metric = getattr(ClassificationMetric, "DICE", ClassificationMetric.BALANCED_ACCURACY)
    with warnings.catch_warnings():  # the package's own pandas deprecations
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        s = ClassificationScore(truth, pred, weights, metric)
    return {"macro_dice": float(s.macro_average["dice"]),
            "balanced_accuracy": float(s.aggregate["balanced_accuracy"]),
            "macro_auc": float(s.macro_average["auc"]),
            "macro_auc_sens_80": float(s.macro_average["auc_sens_80"]),
            "per_category": s.per_category, "score": s}
