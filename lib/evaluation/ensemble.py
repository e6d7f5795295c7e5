"""Decision thresholds, threshold-baking remaps, blending and blend-weight search.

The official MILK10k scorer cuts every submitted probability at ``> 0.5`` and averages per-class
Dice, so decisions tuned on OOF must be baked into the submitted numbers:

* ``tune_thresholds`` + ``remap_to_threshold``: per-class thresholds t_c, then a monotone map
  sending t_c to 0.5 (AUC unchanged, ``p > t_c`` iff ``p' > 0.5``);
* ``argmax_remap``: single-label mode, only the argmax class ends up above 0.5.

Macro Dice is a mean of per-class terms, each depending only on its own class's threshold, so
maximizing each class independently maximizes the macro score exactly (tested against a joint
grid search).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from math import comb

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import log_loss

from lib.config.schema import BLENDS
from lib.core.errors import PipelineError
from lib.core.io import ID, assert_same_ids
from lib.evaluation import metrics as M

log = logging.getLogger(__name__)

_HALF_UP = np.nextafter(0.5, 1.0)  # smallest float64 > 0.5


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
    """Per-class thresholds maximizing per-class Dice (decision ``p > t``) on pooled OOF.

    Guards: a class with fewer than ``min_positives`` positives keeps 0.5; when several grid
    points tie for the best Dice the median one is taken (a plateau's middle, not its edge);
    ``shrink`` > 0 pulls the choice toward 0.5 as ``0.5 + (t - 0.5) * n_pos / (n_pos + shrink)``.
    """
    Y, P = M._f2(y_onehot), M._f2(probs)
    grid = threshold_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    out = np.full(P.shape[1], 0.5)
    for c in range(P.shape[1]):
        n_pos = int((Y[:, c] > 0.5).sum())
        if n_pos < max(min_positives, 1):
            continue
        curve = dice_curve(Y[:, c], P[:, c], grid)
        best = grid[curve >= curve.max() - 1e-12]
        t = best[(len(best) - 1) // 2]
        out[c] = 0.5 + (t - 0.5) * n_pos / (n_pos + shrink)
    return out


def remap_to_threshold(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per-class piecewise-linear map: [0, t] -> [0, 0.5], (t, 1] -> (0.5, 1].

    Guarantees ``(p > t) == (p' > 0.5)`` bit-exactly (values just above t are lifted to the
    smallest float above 0.5) and is non-decreasing, strictly increasing up to float64
    resolution, so per-class rankings (AUC) are unchanged; inputs within ~1e-16 of each other may
    merge, unavoidably, as [t, 1] can hold more floats than [0.5, 1]. Write the result at full precision
    (no CSV ``float_format``), or 0.5000000000000001 may round to 0.5.
    """
    P = np.clip(M._f2(probs), 0.0, 1.0)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), P.shape[1:])
    if not ((t > 0) & (t < 1)).all():
        raise PipelineError(f"remap_to_threshold: thresholds must lie in (0, 1), got {t.tolist()}")
    low = 0.5 * (P / t)  # P <= t -> P/t <= 1 exactly (correctly rounded division)
    high = np.maximum(0.5 + 0.5 * ((P - t) / (1 - t)), _HALF_UP)
    return np.clip(np.where(P > t, high, low), 0.0, 1.0)


def argmax_decisions(probs: np.ndarray) -> np.ndarray:
    """One-hot decisions at the row argmax (first index on ties)."""
    P = M._f2(probs)
    return M.to_onehot(P.argmax(axis=1), P.shape[1])


def argmax_remap(probs: np.ndarray) -> np.ndarray:
    """Single-label submission values: argmax class -> (0.5, 1], every other class -> [0, 0.5].

    ``p' = 0.5 * p`` for non-argmax classes and ``0.5 + 0.5 * p`` (at least just above 0.5) for
    the argmax, so the scorer's ``> 0.5`` cut gives exactly the argmax decision and the order
    within each of the two groups of a class column is kept.
    """
    P = np.clip(M._f2(probs), 0.0, 1.0)
    hot = argmax_decisions(P) > 0
    return np.where(hot, np.maximum(0.5 + 0.5 * P, _HALF_UP), 0.5 * P)


def logit_adjust(probs: np.ndarray, priors: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Multiclass logit adjustment: ``p_c / prior_c**tau`` renormalized per row.

    Equal to subtracting ``tau * log(prior_c)`` from the logits before the softmax.
    """
    pri = np.asarray(priors, dtype=np.float64)
    if (pri <= 0).any():
        raise PipelineError(f"logit_adjust: priors must be > 0, got {pri.tolist()}")
    q = M._f2(probs) * pri ** (-tau)
    return q / q.sum(axis=1, keepdims=True)


def foldwise_threshold_spread(y_onehot: np.ndarray, probs: np.ndarray, folds: np.ndarray,
                              classes: Sequence[str] | None = None, grid: np.ndarray | None = None,
                              **tune_kw: float) -> dict:
    """How stable tuned thresholds are across folds, and an honest CV estimate of their gain.

    Per fold: macro Dice at 0.5, at thresholds tuned on that fold (optimistic) and at thresholds
    tuned on the other folds (honest). Returns ``per_fold`` (DataFrame), ``thresholds_infold`` /
    ``thresholds_cv`` (fold x class DataFrames), ``threshold_std`` (per class, in-fold), the
    pooled values ``pooled_thresholds``, ``pooled_dice_05``, ``pooled_dice_tuned`` (tuned and
    scored on all OOF: optimistic) and ``cv_dice_pooled`` (all OOF rows decided by thresholds from
    the other folds), plus means/stds of the per-fold columns.
    """
    Y, P, folds = M._f2(y_onehot), M._f2(probs), np.asarray(folds)
    classes = list(classes) if classes is not None else [str(c) for c in range(P.shape[1])]
    decided = np.zeros_like(P, dtype=bool)
    rows, t_in, t_cv = [], {}, {}
    for f in np.unique(folds):
        m = folds == f
        t_in[f] = tune_thresholds(Y[m], P[m], grid, **tune_kw)
        t_cv[f] = tune_thresholds(Y[~m], P[~m], grid, **tune_kw)
        decided[m] = P[m] > t_cv[f]
        rows.append({"fold": f, "n": int(m.sum()), "dice_05": M.macro_dice(Y[m], P[m]),
                     "dice_infold": M.macro_dice(Y[m], P[m], t_in[f]),
                     "dice_cv": M.macro_dice(Y[m], P[m], t_cv[f])})
    per_fold = pd.DataFrame(rows)
    t_all = tune_thresholds(Y, P, grid, **tune_kw)
    out = {"per_fold": per_fold,
           "thresholds_infold": pd.DataFrame(t_in, index=classes).T.rename_axis("fold"),
           "thresholds_cv": pd.DataFrame(t_cv, index=classes).T.rename_axis("fold"),
           "pooled_thresholds": t_all,
           "pooled_dice_05": M.macro_dice(Y, P),
           "pooled_dice_tuned": M.macro_dice(Y, P, t_all),
           "cv_dice_pooled": M.macro_dice(Y, decided.astype(float))}
    out["threshold_std"] = out["thresholds_infold"].std(ddof=0).to_numpy()
    for col in ("dice_05", "dice_infold", "dice_cv"):
        out[f"{col}_mean"] = float(per_fold[col].mean())
        out[f"{col}_std"] = float(per_fold[col].std(ddof=0))
    return out


# ----------------------------------------------------------------------------- blending


def _check_tables(tables: Sequence[pd.DataFrame]) -> list[str]:
    """Class columns shared by all tables; raises unless every table has the same ids in the same order."""
    if not tables:
        raise PipelineError("blend: no prediction tables")
    classes = [c for c in tables[0].columns if c != ID]
    for i, t in enumerate(tables[1:], 1):
        assert_same_ids(tables[0], t, f"blend: table 0 vs table {i}", ordered=True)
        if sorted(c for c in t.columns if c != ID) != sorted(classes):
            raise PipelineError(f"blend: table {i} class columns differ from table 0 ({classes})")
    return classes


def _simplex(weights: Sequence[float] | None, n: int) -> np.ndarray:
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise PipelineError(f"blend: need {n} non-negative weights with a positive sum, got {w.tolist()}")
    return w / w.sum()


def _percentile(P: np.ndarray) -> np.ndarray:
    """Per-column average ranks scaled to (0, 1): ``(rank - 0.5) / n``."""
    return (rankdata(P, axis=0) - 0.5) / len(P)


def _blend_arrays(mats: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    return np.tensordot(w, np.stack(mats), axes=1)


def blend(pred_tables: Sequence[pd.DataFrame], weights: Sequence[float] | None = None,
          method: str = "prob") -> pd.DataFrame:
    """Weighted average of aligned prediction tables (weights normalized to sum 1; default equal).

    ``method='rank'`` averages per-class percentile ranks ``(rank - 0.5)/n`` instead of
    probabilities; the result is a score in (0, 1), not a probability, so thresholds must be tuned
    on the rank-blended OOF. Tables must hold the same lesion_ids in the same order.
    """
    if method not in BLENDS:
        raise PipelineError(f"blend: method must be 'prob' or 'rank', got '{method}'")
    classes = _check_tables(pred_tables)
    w = _simplex(weights, len(pred_tables))
    mats = [t[classes].to_numpy(dtype=np.float64) for t in pred_tables]
    if method == "rank":
        mats = [_percentile(m) for m in mats]
    out = pd.DataFrame(_blend_arrays(mats, w), columns=classes)
    out.insert(0, ID, pred_tables[0][ID].to_numpy())
    return out


Metric = Callable[[np.ndarray, np.ndarray], float]


def blend_metric(name: str | Metric, **tune_kw: float) -> Metric:
    """A higher-is-better ``f(Y, P)``: macro_dice_tuned (thresholds tuned on the same rows),
    macro_dice (at 0.5), macro_auc, balanced_accuracy, macro_f1_argmax, pauc (first column, partial
    AUC above 80% TPR: ISIC 2024), neg_log_loss (a smooth proxy for probability blends), or a
    callable returned unchanged."""
    if callable(name):
        return name
    table: dict[str, Metric] = {
        "macro_dice_tuned": lambda Y, P: M.macro_dice(Y, P, tune_thresholds(Y, P, **tune_kw)),
        "macro_dice": M.macro_dice, "macro_auc": M.macro_auc,
        "balanced_accuracy": M.balanced_accuracy, "macro_f1_argmax": M.macro_f1_argmax,
        "pauc": lambda Y, P: M.partial_auc(Y[:, 0], P[:, 0]),
        "neg_log_loss": lambda Y, P: -log_loss(Y.argmax(axis=1), np.clip(P, 1e-7, 1)
                                               / np.clip(P, 1e-7, 1).sum(axis=1, keepdims=True),
                                               labels=list(range(P.shape[1]))),
    }
    if name not in table:
        raise PipelineError(f"blend: unknown metric '{name}' (one of {sorted(table)})")
    return table[name]


BLEND_METRICS = {  # metrics that mean something for each task
    "multiclass": ("macro_dice_tuned", "macro_dice", "macro_auc", "balanced_accuracy", "macro_f1_argmax",
                   "neg_log_loss"),
    "multilabel": ("macro_dice_tuned", "macro_dice", "macro_auc"),
    "binary": ("pauc", "macro_auc", "macro_dice_tuned", "macro_dice"),
}


def task_blend_metric(name: str, task: str) -> str:
    """`auto` -> pauc (binary) or macro_dice_tuned; otherwise check the name fits the task."""
    if name == "auto":
        return "pauc" if task == "binary" else "macro_dice_tuned"
    ok = BLEND_METRICS.get(task, ())
    if name not in ok:
        raise PipelineError(f"config: submit.blend_metric '{name}' does not fit a {task} task (one of {list(ok)})")
    return name


def _search_weights(mats: Sequence[np.ndarray], Y: np.ndarray, score: Metric, step: float,
                    max_lattice: int, n_greedy: int) -> tuple[np.ndarray, float]:
    """Best simplex weights: full lattice of spacing ``step`` when small, else greedy selection
    with replacement (Caruana et al. 2004). Ties prefer weights closest to uniform."""
    n, k = len(mats), int(round(1 / step))
    best_w, best_s = np.full(n, 1.0 / n), -np.inf
    if n == 1:
        return best_w, score(Y, mats[0])
    if comb(k + n - 1, n - 1) <= max_lattice:
        for bars in itertools.combinations(range(k + n - 1), n - 1):
            w = np.diff((-1, *bars, k + n - 1)) - 1.0
            w /= k
            s = score(Y, _blend_arrays(mats, w))
            closer = np.sum((w - 1 / n) ** 2) < np.sum((best_w - 1 / n) ** 2)
            if s > best_s + 1e-12 or (s >= best_s - 1e-12 and closer):
                best_w, best_s = w, max(s, best_s)
        return best_w, best_s
    counts = np.zeros(n)
    for _ in range(n_greedy):
        trial = np.array([score(Y, _blend_arrays(mats, (counts + np.eye(n)[i]) / (counts.sum() + 1)))
                          for i in range(n)], dtype=float)
        trial = np.where(np.isfinite(trial), trial, -np.inf)  # e.g. pAUC of a fold without positives
        counts[int(np.argmax(trial))] += 1
        if trial.max() > best_s:
            best_w, best_s = counts / counts.sum(), float(trial.max())
    return best_w, best_s


def optimize_blend_weights(oof_tables: Sequence[pd.DataFrame], truth_df: pd.DataFrame,
                           metric: str | Metric = "macro_dice_tuned", per_fold: bool = True,
                           method: str = "prob", step: float = 0.1, max_lattice: int = 3000,
                           n_greedy: int = 40, **tune_kw: float) -> dict:
    """Simplex blend weights maximizing ``metric`` on OOF predictions.

    ``truth_df`` holds lesion_id, labels (``y_<C>`` or ``<C>``) and, for ``per_fold``, ``fold``.
    Returns ``pooled`` (tuned on all OOF rows), ``fold_avg`` (mean of weights tuned on each
    fold separately; less overfit), ``per_fold`` (fold x model DataFrame), the metric of each
    single model on all rows (``single``) and of both blends (``score_pooled``,
    ``score_fold_avg``). Rank blends are ranked within the rows being scored.
    """
    if method not in BLENDS:
        raise PipelineError(f"blend: method must be 'prob' or 'rank', got '{method}'")
    classes = _check_tables(oof_tables)
    _, Y, _ = M.align_to_truth(truth_df, oof_tables[0], classes)
    pos = pd.Index(oof_tables[0][ID].astype(str)).get_indexer(truth_df[ID].astype(str))
    raw = [t[classes].to_numpy(dtype=np.float64)[pos] for t in oof_tables]
    score = blend_metric(metric, **tune_kw)

    def prep(rows: np.ndarray | slice) -> list[np.ndarray]:
        return [_percentile(m[rows]) if method == "rank" else m[rows] for m in raw]

    everything = prep(slice(None))
    w_pool, s_pool = _search_weights(everything, Y, score, step, max_lattice, n_greedy)
    log.info("blend weights (pooled, %s): %s -> %.4f", metric, np.round(w_pool, 3).tolist(), s_pool)
    out = {"pooled": w_pool, "score_pooled": s_pool,
           "single": [float(score(Y, m)) for m in everything]}
    if per_fold:
        if "fold" not in truth_df.columns:
            raise PipelineError("optimize_blend_weights: per_fold needs a 'fold' column in the truth table")
        folds = truth_df["fold"].to_numpy()
        ws = {f: _search_weights(prep(folds == f), Y[folds == f], score, step, max_lattice,
                                 n_greedy)[0] for f in np.unique(folds[folds >= 0])}
        out["per_fold"] = pd.DataFrame(ws).T.rename_axis("fold")
        out["fold_avg"] = out["per_fold"].mean().to_numpy()
        out["score_fold_avg"] = float(score(Y, _blend_arrays(everything, out["fold_avg"])))
    return out


def nested_blend_cv(oof_tables: Sequence[pd.DataFrame], truth_df: pd.DataFrame,
                    weights_per_fold: dict | None, method: str = "prob", post=None, **tune_kw: float) -> dict:
    """Honest CV of the whole 05 decision, blend weights included.

    For each fold k the blend weights are those tuned WITHOUT fold k's rows (the mean of the
    per-fold weights of the other folds, `weights_per_fold` = {fold: weights}, each tuned on its own
    fold's rows only; None = fixed weights, equal here), and fold k's rows are then decided by
    thresholds tuned on the other folds' rows of that blend (and, for reference, by argmax). Before,
    05 tuned the weights on every fold and nested only the thresholds: the fold's own rows had
    helped choose its weights. Returns the nested macro Dice at tuned thresholds, the nested argmax
    macro F1, the nested blended OOF probabilities (rows in `truth_df` order) and the nested tuned
    decisions (`decided_tuned`, 0/1). `post`: what 05
    applies to the blend before deciding (its logit adjustment), applied here too."""
    classes = _check_tables(oof_tables)
    post = post or (lambda P: P)
    _, Y, _ = M.align_to_truth(truth_df, oof_tables[0], classes)
    pos = pd.Index(oof_tables[0][ID].astype(str)).get_indexer(truth_df[ID].astype(str))
    raw = [t[classes].to_numpy(dtype=np.float64)[pos] for t in oof_tables]
    folds = truth_df["fold"].to_numpy()
    P_nested = np.zeros_like(Y, dtype=np.float64)
    decided = np.zeros_like(Y, dtype=bool)
    used = {}
    for f in np.unique(folds[folds >= 0]):
        m = folds == f
        w = _nested_weights(weights_per_fold, f, len(raw))
        used[int(f)] = w.tolist()
        P_out = post(_blend_arrays([_percentile(r[~m]) if method == "rank" else r[~m] for r in raw], w))
        P_in = post(_blend_arrays([_percentile(r[m]) if method == "rank" else r[m] for r in raw], w))
        decided[m] = P_in > tune_thresholds(Y[~m], P_out, **tune_kw)
        P_nested[m] = P_in
    return {"macro_dice_tuned_nested": float(M.macro_dice(Y, decided.astype(float))),
            "macro_f1_argmax_nested": float(M.macro_dice(Y, argmax_decisions(P_nested))),
            "weights_per_fold": used, "probs": P_nested, "decided_tuned": decided.astype(np.float64)}


def _nested_weights(weights_per_fold: dict | None, fold: int, n: int) -> np.ndarray:
    """Mean of the other folds' weights (normalized); equal weights when none were tuned."""
    if not weights_per_fold:
        return np.full(n, 1.0 / n)
    others = [np.asarray(w, float) for k, w in weights_per_fold.items() if k != fold]
    w = np.mean(others, 0) if others else np.full(n, 1.0 / n)
    return w / w.sum()


def fold_average_gap(oof_probs: np.ndarray, test_probs: np.ndarray, thresholds: np.ndarray,
                     classes: Sequence[str]) -> dict:
    """The fold-average gap, per class: test probabilities are the mean of the fold models and are
    smoother than the single-model OOF probabilities that thresholds and weights were tuned on.
    Reports the spread (std) of OOF vs test probabilities and the share of rows above the tuned
    threshold in each; a test share far below the OOF share means the thresholds cut a different
    distribution on test than the one they were tuned on."""
    O, T, t = M._f2(oof_probs), M._f2(test_probs), np.asarray(thresholds, float)
    out = {}
    for i, c in enumerate(classes):
        o_std, t_std = float(O[:, i].std()), float(T[:, i].std())
        out[str(c)] = {"oof_std": o_std, "test_std": t_std, "std_ratio": t_std / o_std if o_std > 0 else float("nan"),
                       "oof_above_threshold": float((O[:, i] > t[i]).mean()),
                       "test_above_threshold": float((T[:, i] > t[i]).mean())}
    return out
