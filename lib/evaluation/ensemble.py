"""Blending member predictions, blend-weight search, and the nested CV of stage 05's whole decision.

The decision rule itself (thresholds, remaps, logit adjustment, argmax vs thresholds) lives in
``lib.evaluation.decision``; this module blends and calls it.
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
from lib.evaluation import decision as D
from lib.evaluation import metrics as M

log = logging.getLogger(__name__)

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


def _percentile(scores: np.ndarray) -> np.ndarray:
    """Per-column average ranks scaled to (0, 1): ``(rank - 0.5) / n``."""
    return (rankdata(scores, axis=0) - 0.5) / len(scores)


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
    """A higher-is-better ``f(y, probs)``: macro_dice_tuned (thresholds tuned on the same rows),
    macro_dice (at 0.5), macro_auc, balanced_accuracy, macro_f1_argmax, pauc (first column, partial
    AUC above 80% TPR: ISIC 2024), neg_log_loss (a smooth proxy for probability blends), or a
    callable returned unchanged."""
    if callable(name):
        return name
    table: dict[str, Metric] = {
        "macro_dice_tuned": lambda y, p: M.macro_dice(y, p, D.tune_thresholds(y, p, **tune_kw)),
        "macro_dice": M.macro_dice, "macro_auc": M.macro_auc,
        "balanced_accuracy": M.balanced_accuracy, "macro_f1_argmax": M.macro_f1_argmax,
        "pauc": lambda y, p: M.partial_auc(y[:, 0], p[:, 0]),
        "neg_log_loss": lambda y, p: -log_loss(y.argmax(axis=1), np.clip(p, 1e-7, 1)
                                               / np.clip(p, 1e-7, 1).sum(axis=1, keepdims=True),
                                               labels=list(range(p.shape[1]))),
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


def _search_weights(mats: Sequence[np.ndarray], y: np.ndarray, score: Metric, step: float,
                    max_lattice: int, n_greedy: int) -> tuple[np.ndarray, float]:
    """Best simplex weights: full lattice of spacing ``step`` when small, else greedy selection
    with replacement (Caruana et al. 2004). Ties prefer weights closest to uniform."""
    n, k = len(mats), int(round(1 / step))
    best_w, best_s = np.full(n, 1.0 / n), -np.inf
    if n == 1:
        return best_w, score(y, mats[0])
    if comb(k + n - 1, n - 1) <= max_lattice:
        for bars in itertools.combinations(range(k + n - 1), n - 1):
            w = np.diff((-1, *bars, k + n - 1)) - 1.0
            w /= k
            s = score(y, _blend_arrays(mats, w))
            closer = np.sum((w - 1 / n) ** 2) < np.sum((best_w - 1 / n) ** 2)
            if s > best_s + 1e-12 or (s >= best_s - 1e-12 and closer):
                best_w, best_s = w, max(s, best_s)
        return best_w, best_s
    counts = np.zeros(n)
    for _ in range(n_greedy):
        trial = np.array([score(y, _blend_arrays(mats, (counts + np.eye(n)[i]) / (counts.sum() + 1)))
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


def blend_weights(oof_tables: Sequence[pd.DataFrame], truth_df: pd.DataFrame, names: Sequence[str],
                  fixed: Sequence[float | None], optimize: bool, metric: str, task: str, method: str = "prob"
                  ) -> tuple[np.ndarray, dict, dict | None]:
    """Stage 05's blend weights, normalized: one member -> 1; all `fixed` given -> those; `optimize`
    -> tuned per fold on OOF (`optimize_blend_weights`) and averaged; else equal. Also returns the
    tuning info (empty when nothing was tuned) and the per-fold tuned weights ({fold: weights},
    None when nothing was tuned: the nested CV then uses the same weights for every fold)."""
    info: dict = {}
    per_fold = None
    if len(names) == 1:
        w = np.array([1.0])
    elif all(x is not None for x in fixed):
        w = np.asarray(fixed, float)
    elif optimize:
        metric = task_blend_metric(metric, task)
        opt = optimize_blend_weights(oof_tables, truth_df, metric=metric, per_fold=True, method=method)
        w = np.asarray(opt["fold_avg"], float)
        per_fold = {int(k): row.to_numpy(float) for k, row in pd.DataFrame(opt["per_fold"]).iterrows()}
        info = {"metric": metric, "pooled": list(map(float, opt["pooled"])),
                "fold_avg": list(map(float, opt["fold_avg"])),
                "score_pooled": float(opt["score_pooled"]), "score_fold_avg": float(opt["score_fold_avg"]),
                "per_fold": pd.DataFrame(opt["per_fold"]).to_dict(orient="records")}
        log.info("blend weights (fold-averaged, used) %s; pooled-tuned %s", dict(zip(names, w.round(3).tolist())),
                 dict(zip(names, np.round(opt["pooled"], 3).tolist())))
    else:
        w = np.ones(len(names))
    return w / w.sum(), info, per_fold


def _blend_rows(raw: Sequence[np.ndarray], rows: np.ndarray, w: np.ndarray, method: str) -> np.ndarray:
    """The blend of these rows only (a rank blend ranks within them)."""
    return _blend_arrays([_percentile(r[rows]) if method == "rank" else r[rows] for r in raw], w)


def nested_blend_cv(oof_tables: Sequence[pd.DataFrame], truth_df: pd.DataFrame, weights_per_fold: dict | None,
                    method: str = "prob", tau: float = 0.0, asked: str = "thresholds", task: str = "multiclass",
                    **tune_kw: float) -> dict:
    """Nested CV of the whole 05 decision: each fold k is decided by what was fitted WITHOUT its rows.

    Fitted without fold k: the blend weights (the mean of the other folds' per-fold weights,
    `weights_per_fold` = {fold: weights}, each tuned on its own fold's rows; None = equal weights),
    the logit-adjustment priors (`tau` > 0: class frequencies of the other folds' labels), the
    thresholds (tuned on the other folds' rows of that blend) and, for `asked` = auto on a
    multiclass task, the rule itself (argmax vs thresholds compared on the other folds' rows, with
    thresholds nested within them: `decision.fold_rule`). Returns `macro_dice_nested` (each fold
    decided by its own rule: the fully nested figure), `rules_per_fold`, the per-rule figures
    `macro_dice_tuned_nested` (thresholds for every fold) and `macro_f1_argmax_nested` (argmax),
    `pauc_80_nested` (binary), `weights_per_fold` (used), the nested blended OOF `probs` (rows in
    `truth_df` order) and the 0/1 decisions `decided` (fully nested) and `decided_tuned`."""
    classes = _check_tables(oof_tables)
    _, y, _ = M.align_to_truth(truth_df, oof_tables[0], classes)
    pos = pd.Index(oof_tables[0][ID].astype(str)).get_indexer(truth_df[ID].astype(str))
    raw = [t[classes].to_numpy(dtype=np.float64)[pos] for t in oof_tables]
    folds = truth_df["fold"].to_numpy()
    probs, decided, decided_tuned = np.zeros_like(y), np.zeros_like(y), np.zeros_like(y)
    used, rules = {}, {}
    for f in np.unique(folds[folds >= 0]):
        m = folds == f
        w = _nested_weights(weights_per_fold, f, len(raw))
        post = D.logit_adjuster(tau, y[~m])
        p_out, p_in = post(_blend_rows(raw, ~m, w, method)), post(_blend_rows(raw, m, w, method))
        t = D.tune_thresholds(y[~m], p_out, **tune_kw)
        rules[int(f)] = D.fold_rule(asked, task, y[~m], p_out, folds[~m], **tune_kw)
        decided_tuned[m] = D.apply_rule(p_in, "thresholds", t)
        decided[m] = D.apply_rule(p_in, rules[int(f)], t)
        probs[m], used[int(f)] = p_in, w.tolist()
    out = {"macro_dice_nested": M.macro_dice(y, decided), "rules_per_fold": rules,
           "macro_dice_tuned_nested": M.macro_dice(y, decided_tuned),
           "macro_f1_argmax_nested": M.macro_dice(y, D.argmax_decisions(probs)),
           "weights_per_fold": used, "probs": probs, "decided": decided, "decided_tuned": decided_tuned}
    if task == "binary":
        out["pauc_80_nested"] = float(M.partial_auc(y[:, 0], probs[:, 0]))
    return out


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
    O, T, t = M.as_2d(oof_probs), M.as_2d(test_probs), np.asarray(thresholds, float)
    out = {}
    for i, c in enumerate(classes):
        o_std, t_std = float(O[:, i].std()), float(T[:, i].std())
        out[str(c)] = {"oof_std": o_std, "test_std": t_std, "std_ratio": t_std / o_std if o_std > 0 else float("nan"),
                       "oof_above_threshold": float((O[:, i] > t[i]).mean()),
                       "test_above_threshold": float((T[:, i] > t[i]).mean())}
    return out


DEPLOYMENT_VERSION = 1   # `format_version` of 05's deployment.json (what a bundle's predict path applies)


def deployment(classes: list[str], task: str, names: Sequence[str], w: np.ndarray, method: str, tau: float,
               y_onehot: np.ndarray, rule: str, thresholds: dict[str, float]) -> dict:
    """Everything 05 applies to its members' test predictions, JSON-able: the members and their
    weights, the blend method, the logit adjustment (tau and the class priors of all training labels),
    the decision rule and its per-class thresholds. `apply_deployment` applies it."""
    priors = D.class_priors(y_onehot).tolist() if tau else None
    return {"format_version": DEPLOYMENT_VERSION, "task": task, "classes": list(classes),
            "members": [{"exp": n, "weight": float(x)} for n, x in zip(names, w)], "blend": method,
            "logit_adjust_tau": float(tau), "priors": priors, "decision": rule,
            "thresholds": {c: float(thresholds[c]) for c in classes}}


def deployed_probs(dep: dict, tests: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The blended (and logit-adjusted) test probabilities of a deployment, before the decision."""
    classes = dep["classes"]
    te = blend(tests, [m["weight"] for m in dep["members"]], method=dep["blend"])
    if dep["logit_adjust_tau"]:
        te[classes] = D.logit_adjust(te[classes].to_numpy(), np.asarray(dep["priors"]), dep["logit_adjust_tau"])
    return te

