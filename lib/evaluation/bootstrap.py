"""How much a held-out macro Dice can be trusted: a class-stratified bootstrap of the lesions.

Each replicate redraws, with replacement, as many lesions of each true class as the held-out set
has (so a class with 1 or 8 positives keeps them: the plain bootstrap would sometimes drop a rare
class, and its Dice would jump to 1.0 by the scorer's "absent and never predicted" rule). The
point score is `lib.evaluation.metrics.macro_dice` (the official one); a replicate's is the same
macro Dice (decisions `p > 0.5`, per-class Dice, plain mean) with the draw counts as row weights.
With a second submission the difference is paired: both are scored on the same draws, so the
standard error of the difference is that of the change, not of either score.

What it does not cover: the class counts are held fixed, so a class with one held-out lesion keeps
that lesion in every draw; a fresh test set would also redraw how many rare lesions it holds. The
standard error is therefore a lower bound on the noise of the score on another test set of the
same size, and the paired difference (both on the same lesions) is what tells two variants apart.
"""
from __future__ import annotations

import numpy as np

from lib.core.errors import PipelineError
from sklearn.metrics import roc_auc_score

from lib.evaluation.metrics import DECISION_THRESHOLD, macro_dice, partial_auc


def stratified_weights(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """`[n_boot, N]` draw counts: per replicate, each label value keeps its number of rows."""
    if n_boot < 2:
        raise PipelineError(f"bootstrap: n_boot must be >= 2 (a standard error needs two draws), got {n_boot}")
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(labels)))
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        np.add.at(w, (np.arange(n_boot)[:, None], idx[draws]), 1.0)
    return w


def weighted_macro_dice(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Macro Dice per weight row (`w`: `[B, N]`) with the official edge rule (1.0 if TP+FP+FN == 0)."""
    t = (np.asarray(y, np.float64) > 0.5).astype(np.float64)
    p = (np.asarray(probs, np.float64) > DECISION_THRESHOLD).astype(np.float64)
    tp, den = w @ (t * p), w @ t + w @ p
    return np.where(den == 0, 1.0, 2.0 * tp / np.maximum(den, 1e-12)).mean(axis=1)


def bootstrap_macro_dice(y: np.ndarray, probs: np.ndarray, against: np.ndarray | None = None,
                         n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Point macro Dice, bootstrap standard error and 95% percentile interval; with `against` (another
    submission's probabilities for the same rows) also the paired difference `probs - against`."""
    y, probs = np.asarray(y, np.float64), np.asarray(probs, np.float64)
    against = None if against is None else np.asarray(against, np.float64)
    for name, a in (("predictions", probs), ("the --against predictions", against)):
        if a is not None and a.shape != y.shape:
            raise PipelineError(f"bootstrap: truth {y.shape} and {name} {a.shape} differ in shape")
    if y.ndim != 2 or not ((y > 0.5).sum(axis=1) == 1).all():
        raise PipelineError("bootstrap: the truth must have exactly one positive class per row (multiclass)")
    w = stratified_weights(y.argmax(axis=1), n_boot, seed)
    a = weighted_macro_dice(y, probs, w)
    out: dict[str, float] = {"n": len(y), "n_boot": n_boot, "macro_dice": macro_dice(y, probs),
           "se": float(a.std(ddof=1)),
           "ci_low": float(np.quantile(a, 0.025)), "ci_high": float(np.quantile(a, 0.975))}
    if against is not None:
        d = a - weighted_macro_dice(y, against, w)
        out.update(diff=out["macro_dice"] - macro_dice(y, against),
                   diff_se=float(d.std(ddof=1)),
                   diff_ci_low=float(np.quantile(d, 0.025)), diff_ci_high=float(np.quantile(d, 0.975)),
                   p_not_better=float((d <= 0).mean()))
    return out


def nested_uncertainty(y: np.ndarray, decisions: dict[str, np.ndarray], n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """Standard error / 95% interval of nested estimates: `decisions` {name: 0/1 decisions of the
    OOF rows}, each scored over the same class-stratified bootstrap draws of the OOF lesions."""
    out: dict = {"n_boot": n_boot, "draws": "class-stratified"}
    for name, dec in decisions.items():
        b = bootstrap_macro_dice(y, dec, n_boot=n_boot, seed=seed)
        out[name] = {k: round(b[k], 4) for k in ("macro_dice", "se", "ci_low", "ci_high")}
    return out


def grouped_draws(groups: np.ndarray, positive: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of `n_boot` cluster-bootstrap replicates: whole groups (patients) are redrawn with
    replacement, those with a positive row and those without separately (each keeps its count), so
    every replicate has both classes and a patient's rows stay together."""
    if n_boot < 2:
        raise PipelineError(f"bootstrap: n_boot must be >= 2 (a standard error needs two draws), got {n_boot}")
    rng = np.random.default_rng(seed)
    g = np.asarray(groups).astype(str)
    uniq, inv = np.unique(g, return_inverse=True)
    rows = [np.flatnonzero(inv == i) for i in range(len(uniq))]
    has_pos = np.array([bool(np.asarray(positive)[r].any()) for r in rows])
    strata = [np.flatnonzero(has_pos), np.flatnonzero(~has_pos)]
    out = []
    for _ in range(n_boot):
        pick = np.concatenate([rng.choice(s, len(s)) for s in strata if len(s)])
        out.append(np.concatenate([rows[i] for i in pick]))
    return out


def bootstrap_ranking(y: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None,
                      n_boot: int = 1000, seed: int = 0, min_tpr: float = 0.8) -> dict:
    """AUC and partial AUC (above `min_tpr`) of a binary task with the standard error and 95% interval
    of a cluster bootstrap: whole groups (patients; each row its own group when `groups` is None) are
    redrawn, stratified by whether the group holds a positive. Like the class-stratified bootstrap it
    holds the number of positive groups fixed, so the interval is a lower bound on the noise."""
    t = np.asarray(y, np.float64).ravel() > 0.5
    sc = np.asarray(scores, np.float64).ravel()
    if t.all() or not t.any():
        raise PipelineError("bootstrap: AUC needs both classes among the rows")
    g = np.arange(len(t)) if groups is None else np.asarray(groups)
    draws = grouped_draws(g, t, n_boot, seed)
    out: dict = {"n_boot": n_boot, "draws": "grouped by patient, stratified by a positive" if groups is not None
                 else "rows, stratified by class", "n_groups": int(len(np.unique(np.asarray(g).astype(str)))),
                 "n_positive": int(t.sum())}
    for name, fn in (("auc", lambda a, b: roc_auc_score(a, b)), (f"pauc_{int(min_tpr * 100)}",
                                                                lambda a, b: partial_auc(a, b, min_tpr))):
        a = np.array([fn(t[d], sc[d]) for d in draws])
        out[name] = {"value": round(float(fn(t, sc)), 4), "se": round(float(a.std(ddof=1)), 4),
                     "ci_low": round(float(np.quantile(a, 0.025)), 4),
                     "ci_high": round(float(np.quantile(a, 0.975)), 4)}
    return out
