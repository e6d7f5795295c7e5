"""The decision rule, in one place: how blended probabilities become the submitted numbers.

The official MILK10k scorer cuts every submitted probability at ``> 0.5`` and averages per-class
Dice (``lib.core.scoring``), so the rule chosen on OOF must be baked into the submitted values:

* ``thresholds``: per-class thresholds t_c (``tune_thresholds``), then ``remap_to_threshold``, a
  monotone map sending t_c to 0.5 (AUC unchanged, ``p > t_c`` iff ``p' > 0.5``);
* ``argmax``: single label, ``argmax_remap`` leaves only the argmax class above 0.5;
* ``raw``: the probabilities as they are (binary tasks: the metric ranks them);
* ``auto``: binary -> raw, multilabel -> thresholds, multiclass -> the better of argmax and
  thresholds (``choose_decision``), judged on rows the choice is scored on.

Optionally a logit adjustment ``p_c / prior_c**tau`` (renormalized) comes first; its priors are
class frequencies of the rows it is fitted on (``class_priors``).

Macro Dice is a mean of per-class terms, each depending only on its own class's threshold, so
maximizing each class independently maximizes the macro score exactly (tested against a joint
grid search).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from lib.config.schema import DECISIONS
from lib.core.errors import PipelineError
from lib.core.scoring import argmax_onehot, as_2d, macro_dice

log = logging.getLogger(__name__)

_HALF_UP = np.nextafter(0.5, 1.0)  # smallest float64 > 0.5
RULES = ("thresholds", "argmax", "raw")
NOTES = {"thresholds": "submitted probabilities are remapped per class so that the tuned threshold lands at 0.5",
         "argmax": "submitted probabilities are remapped so that only the argmax class is above 0.5",
         "raw": "blended probabilities submitted as they are; thresholds are for reference only"}


# ----------------------------------------------------------------------------- thresholds


def threshold_grid(lo: float = 0.02, hi: float = 0.98, step: float = 0.01) -> np.ndarray:
    """Candidate thresholds ``lo, lo+step, ..., hi`` (rounded to avoid float drift)."""
    return np.round(np.arange(lo, hi + step / 2, step), 10)


def dice_curve(y_c: np.ndarray, p_c: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Dice of ``p_c > t`` for every t in ``grid`` (one class; scorer's 1.0 rule when empty)."""
    pos = np.sort(p_c[np.asarray(y_c) > 0.5])
    allp = np.sort(p_c)
    n_pred = len(allp) - np.searchsorted(allp, grid, side="right")
    tp = len(pos) - np.searchsorted(pos, grid, side="right")
    den = n_pred + len(pos)  # = 2TP + FP + FN
    return np.where(den == 0, 1.0, 2.0 * tp / np.maximum(den, 1))


def tune_thresholds(y_onehot: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None,
                    min_positives: int = 10, shrink: float = 0.0) -> np.ndarray:
    """Per-class thresholds maximizing per-class Dice (decision ``p > t``) on the given rows.

    Guards: a class with fewer than ``min_positives`` positives keeps 0.5; when several grid
    points tie for the best Dice the median one is taken (a plateau's middle, not its edge);
    ``shrink`` > 0 pulls the choice toward 0.5 as ``0.5 + (t - 0.5) * n_pos / (n_pos + shrink)``.
    """
    y, p = as_2d(y_onehot), as_2d(probs)
    grid = threshold_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    out = np.full(p.shape[1], 0.5)
    for c in range(p.shape[1]):
        n_pos = int((y[:, c] > 0.5).sum())
        if n_pos < max(min_positives, 1):
            continue
        curve = dice_curve(y[:, c], p[:, c], grid)
        best = grid[curve >= curve.max() - 1e-12]
        t = best[(len(best) - 1) // 2]
        out[c] = 0.5 + (t - 0.5) * n_pos / (n_pos + shrink)
    return out


def cv_threshold_decisions(y_onehot: np.ndarray, probs: np.ndarray, folds: np.ndarray,
                           **tune_kw: float) -> tuple[np.ndarray, dict]:
    """Each fold's rows decided by thresholds tuned on the other folds' rows: (0/1 decisions,
    {fold: thresholds})."""
    y, p, folds = as_2d(y_onehot), as_2d(probs), np.asarray(folds)
    decided = np.zeros_like(p)
    used = {}
    for f in np.unique(folds):
        m = folds == f
        used[f] = tune_thresholds(y[~m], p[~m], **tune_kw)
        decided[m] = p[m] > used[f]
    return decided, used


def foldwise_threshold_spread(y_onehot: np.ndarray, probs: np.ndarray, folds: np.ndarray,
                              classes: Sequence[str] | None = None, grid: np.ndarray | None = None,
                              **tune_kw: float) -> dict:
    """How stable tuned thresholds are across folds, and a nested CV estimate of their gain.

    Per fold: macro Dice at 0.5, at thresholds tuned on that fold (in-fold, optimistic) and at
    thresholds tuned on the other folds (nested). Returns ``per_fold`` (DataFrame),
    ``thresholds_infold`` / ``thresholds_cv`` (fold x class DataFrames), ``threshold_std`` (per
    class, in-fold), the pooled values ``pooled_thresholds``, ``pooled_dice_05``,
    ``pooled_dice_tuned`` (tuned and scored on all OOF: optimistic) and ``cv_dice_pooled`` (all
    OOF rows decided by thresholds from the other folds), plus means/stds of the per-fold columns.
    """
    y, p, folds = as_2d(y_onehot), as_2d(probs), np.asarray(folds)
    classes = list(classes) if classes is not None else [str(c) for c in range(p.shape[1])]
    decided, t_cv = cv_threshold_decisions(y, p, folds, grid=grid, **tune_kw)
    rows, t_in = [], {}
    for f in np.unique(folds):
        m = folds == f
        t_in[f] = tune_thresholds(y[m], p[m], grid, **tune_kw)
        rows.append({"fold": f, "n": int(m.sum()), "dice_05": macro_dice(y[m], p[m]),
                     "dice_infold": macro_dice(y[m], p[m], t_in[f]),
                     "dice_cv": macro_dice(y[m], p[m], t_cv[f])})
    per_fold = pd.DataFrame(rows)
    t_all = tune_thresholds(y, p, grid, **tune_kw)
    out = {"per_fold": per_fold,
           "thresholds_infold": pd.DataFrame(t_in, index=classes).T.rename_axis("fold"),
           "thresholds_cv": pd.DataFrame(t_cv, index=classes).T.rename_axis("fold"),
           "pooled_thresholds": t_all,
           "pooled_dice_05": macro_dice(y, p),
           "pooled_dice_tuned": macro_dice(y, p, t_all),
           "cv_dice_pooled": macro_dice(y, decided)}
    out["threshold_std"] = out["thresholds_infold"].std(ddof=0).to_numpy()
    for col in ("dice_05", "dice_infold", "dice_cv"):
        out[f"{col}_mean"] = float(per_fold[col].mean())
        out[f"{col}_std"] = float(per_fold[col].std(ddof=0))
    return out


# ----------------------------------------------------------------------------- remaps and labels


def remap_to_threshold(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per-class piecewise-linear map: [0, t] -> [0, 0.5], (t, 1] -> (0.5, 1].

    Guarantees ``(p > t) == (p' > 0.5)`` bit-exactly (values just above t are lifted to the
    smallest float above 0.5) and is non-decreasing, strictly increasing up to float64
    resolution, so per-class rankings (AUC) are unchanged; inputs within ~1e-16 of each other may
    merge, unavoidably, as [t, 1] can hold more floats than [0.5, 1]. Write the result at full precision
    (no CSV ``float_format``), or 0.5000000000000001 may round to 0.5.
    """
    p = np.clip(as_2d(probs), 0.0, 1.0)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), p.shape[1:])
    if not ((t > 0) & (t < 1)).all():
        raise PipelineError(f"remap_to_threshold: thresholds must lie in (0, 1), got {t.tolist()}")
    low = 0.5 * (p / t)  # p <= t -> p/t <= 1 exactly (correctly rounded division)
    high = np.maximum(0.5 + 0.5 * ((p - t) / (1 - t)), _HALF_UP)
    return np.clip(np.where(p > t, high, low), 0.0, 1.0)


def argmax_decisions(probs: np.ndarray) -> np.ndarray:
    """One-hot decisions at the row argmax (first index on ties)."""
    return argmax_onehot(probs)


def argmax_remap(probs: np.ndarray) -> np.ndarray:
    """Single-label submission values: argmax class -> (0.5, 1], every other class -> [0, 0.5].

    ``p' = 0.5 * p`` for non-argmax classes and ``0.5 + 0.5 * p`` (at least just above 0.5) for
    the argmax, so the scorer's ``> 0.5`` cut gives exactly the argmax decision and the order
    within each of the two groups of a class column is kept.
    """
    p = np.clip(as_2d(probs), 0.0, 1.0)
    hot = argmax_decisions(p) > 0
    return np.where(hot, np.maximum(0.5 + 0.5 * p, _HALF_UP), 0.5 * p)


def decide_labels(probs: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """One class index per row: the argmax of ``p``, or with ``thresholds`` the argmax of ``p / t``
    among the classes with ``p > t`` (the plain argmax when no class clears its threshold)."""
    p = as_2d(probs)
    if thresholds is None:
        return p.argmax(axis=1)
    t = np.maximum(np.asarray(thresholds, dtype=np.float64), 1e-12)
    ratio = np.where(p > t, p / t, -np.inf)
    return np.where(np.isfinite(ratio).any(axis=1), ratio.argmax(axis=1), p.argmax(axis=1))


# ----------------------------------------------------------------------------- logit adjustment


def logit_adjust(probs: np.ndarray, priors: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Multiclass logit adjustment: ``p_c / prior_c**tau`` renormalized per row.

    Equal to subtracting ``tau * log(prior_c)`` from the logits before the softmax.
    """
    pri = np.asarray(priors, dtype=np.float64)
    if (pri <= 0).any():
        raise PipelineError(f"logit_adjust: priors must be > 0, got {pri.tolist()}")
    q = as_2d(probs) * pri ** (-tau)
    return q / q.sum(axis=1, keepdims=True)


def class_priors(y_onehot: np.ndarray) -> np.ndarray:
    """Class frequencies of these rows' labels, floored at 1e-4 (a class absent here stays finite)."""
    return np.clip(as_2d(y_onehot).mean(0), 1e-4, None)


def adjust_tau(tau: float, task: str) -> float:
    """The logit adjustment's tau for this task: multiclass only (0 otherwise, with a warning)."""
    if tau and task != "multiclass":
        log.warning("submit.logit_adjust_tau is for multiclass tasks; ignored for this %s task", task)
        return 0.0
    return float(tau)


def logit_adjuster(tau: float, y_onehot: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``probs -> logit_adjust(probs, priors, tau)`` with the priors of ``y_onehot`` (the rows the
    rule is fitted on: all training rows for the submission, the other folds inside the nested CV);
    the identity when tau is 0."""
    if not tau:
        return lambda probs: probs
    priors = class_priors(y_onehot)
    return lambda probs: logit_adjust(probs, priors, tau)


# ----------------------------------------------------------------------------- the rule


def choose_decision(asked: str, task: str, scores: dict[str, float] | None = None) -> str:
    """The rule. `auto`: binary -> raw (the ISIC 2024 metric ranks probabilities); multilabel ->
    thresholds; multiclass -> the better of `scores["thresholds"]` and `scores["argmax"]` (ties:
    thresholds), both measured on the rows this choice may see. `argmax` is a single-label rule:
    refused for multilabel and binary tasks."""
    if asked not in DECISIONS:
        raise PipelineError(f"config: submit.decision '{asked}' unknown (one of {DECISIONS})")
    if asked == "argmax" and task != "multiclass":
        raise PipelineError(f"config: submit.decision 'argmax' needs a multiclass task; this one is {task}")
    if asked != "auto":
        return asked
    if task == "binary":
        return "raw"
    if task == "multilabel":
        return "thresholds"
    scores = scores or {}
    return "thresholds" if scores["thresholds"] >= scores.get("argmax", -1.0) else "argmax"


def rule_is_chosen(asked: str, task: str) -> bool:
    """True when the rule is chosen from data (auto on a multiclass task), not fixed by the recipe."""
    return asked == "auto" and task == "multiclass"


def rule_scores(y_onehot: np.ndarray, probs: np.ndarray, folds: np.ndarray, **tune_kw: float) -> dict[str, float]:
    """The two single-label rules scored on these rows: argmax macro Dice, and tuned thresholds
    with each fold decided by thresholds tuned on the other folds."""
    decided, _ = cv_threshold_decisions(y_onehot, probs, folds, **tune_kw)
    return {"thresholds": macro_dice(y_onehot, decided), "argmax": macro_dice(y_onehot, argmax_decisions(probs))}


def fold_rule(asked: str, task: str, y_other: np.ndarray, p_other: np.ndarray, folds_other: np.ndarray,
              **tune_kw: float) -> str:
    """The rule for a held-out fold, chosen on the other folds' rows only (auto multiclass: argmax
    vs thresholds nested within those rows); a rule fixed by the recipe or the task is returned as is."""
    scores = rule_scores(y_other, p_other, folds_other, **tune_kw) if rule_is_chosen(asked, task) else None
    return choose_decision(asked, task, scores)


def apply_rule(probs: np.ndarray, rule: str, thresholds: np.ndarray) -> np.ndarray:
    """0/1 decisions of a rule as the scorer sees them after baking (``bake``)."""
    if rule == "thresholds":
        return (as_2d(probs) > np.asarray(thresholds, dtype=np.float64)).astype(np.float64)
    if rule == "argmax":
        return argmax_decisions(probs)
    if rule == "raw":
        return (as_2d(probs) > 0.5).astype(np.float64)
    raise PipelineError(f"decision rule must be one of {RULES}, got '{rule}'")


def bake(probs: np.ndarray, rule: str, thresholds: np.ndarray) -> np.ndarray:
    """The submitted values of a rule: cut by the scorer at > 0.5, they give ``apply_rule``'s decisions."""
    if rule == "thresholds":
        return remap_to_threshold(probs, thresholds)
    if rule == "argmax":
        return argmax_remap(probs)
    if rule == "raw":
        return as_2d(probs)
    raise PipelineError(f"decision rule must be one of {RULES}, got '{rule}'")


def deployment_rule(asked: str, task: str, nested: dict) -> str:
    """The submission's rule, chosen on all OOF rows (the deployment choice): auto multiclass
    compares the nested per-rule estimates (`macro_dice_tuned_nested` vs `macro_f1_argmax_nested`)."""
    scores = {"thresholds": nested["macro_dice_tuned_nested"], "argmax": nested.get("macro_f1_argmax_nested", -1.0)}
    return choose_decision(asked, task, scores)


def expected_score(rule: str, task: str, nested: dict) -> float:
    """The fully nested figure for the submission's rule: pAUC of the nested probabilities for a raw
    binary submission, else the macro Dice of the decisions whose rule, thresholds, blend weights
    and priors were all chosen without the fold they decide."""
    if task == "binary" and rule == "raw":
        return float(nested["pauc_80_nested"])
    return float(nested["macro_dice_nested"])
