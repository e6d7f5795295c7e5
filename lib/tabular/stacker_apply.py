"""Fitted stackers (`StackResult.fitted`, lib.tabular.stackers) applied to new rows: THE test-side path,
used by `fit_predict_stack` itself for its test predictions and by a later run on the loaded stackers
(lib.tabular.stacker_io), so both give the same bits.

The fold features with numpy from the fitted arrays (imputer fill, (x - mean) / scale, PCA
(x - mean) @ components.T), XGBoost `Booster.inplace_predict`, LightGBM `Booster.predict`, the logistic
regressions' softmax / sigmoid; averaged over seeds and folds, head weights and renormalization as
`fit_predict_stack` does.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from lib.core.errors import PipelineError
from lib.core.io import ID

TREE_HEADS = ("xgb", "lgbm")


def renorm_rows(p: np.ndarray) -> np.ndarray:
    """Rows divided by their sum (a row summing to ~0 becomes uniform)."""
    s = p.sum(1, keepdims=True)
    return np.where(s > 1e-12, p / np.maximum(s, 1e-12), 1.0 / p.shape[1])


def blend_heads(per_head: dict[str, np.ndarray], weights: dict[str, float], renorm: bool) -> np.ndarray:
    """The weighted mean of the heads' probabilities (renormalized rows when `renorm`)."""
    p = sum(weights[h] * per_head[h] for h in per_head)
    return renorm_rows(p) if renorm else p


def prob_table(p: np.ndarray, rid: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """`lesion_id` + one column per class."""
    return pd.concat([pd.DataFrame({ID: rid}), pd.DataFrame(p, columns=classes)], axis=1)


def fold_matrix(feats: list[str], blocks: dict[str, list[str]], fold: dict, x: np.ndarray) -> pd.DataFrame:
    """One fold's model inputs (columns f0..fN) from the raw feature matrix `x` (columns `feats`)."""
    pos = {c: i for i, c in enumerate(feats)}
    parts = []
    for name, cols in blocks.items():
        p = fold["blocks"][name]
        xb = x[:, [pos[c] for c in cols]]
        if p["pca"]:
            xb = np.where(np.isnan(xb), p["fill"], xb)
            xb = ((xb - p["mean"]) / p["scale"] - p["pca_mean"]) @ p["components"].T
        parts.append(xb)
    m = np.concatenate(parts, axis=1)
    return pd.DataFrame(m, columns=[f"f{i}" for i in range(m.shape[1])])


def _tree_predict(head: str, models: list[list[Any]], xf: pd.DataFrame, c_n: int, renorm: bool) -> np.ndarray:
    out = np.zeros((len(xf), c_n))
    for row in models:
        for c, m in enumerate(row):
            if isinstance(m, float):
                p = np.full(len(xf), m)
            elif head == "xgb":
                p = m.inplace_predict(xf)
            else:
                p = m.predict(xf)
            out[:, c] += p / len(models)
    return renorm_rows(out) if renorm else out


def _lr_predict(part: dict, xf: pd.DataFrame, c_n: int) -> np.ndarray:
    x = xf.to_numpy(np.float64)
    out = np.zeros((len(x), c_n))
    for c, t in enumerate(part["targets"]):
        if "prior" in t:
            if part["multinomial"]:
                out[:] = np.asarray(t["prior"], np.float64)
            else:
                out[:, c] = float(t["prior"])
            continue
        xs = (np.where(np.isnan(x), t["fill"], x) - t["mean"]) / t["scale"]
        z = xs @ t["coef"].T + t["intercept"]
        if not part["multinomial"]:
            out[:, c] = expit(z[:, 0])
        elif z.shape[1] == 1:   # two classes present: sklearn's binary form
            out[:, t["classes"]] = np.column_stack([1.0 - expit(z[:, 0]), expit(z[:, 0])])
        else:
            out[:, t["classes"]] = softmax(z, axis=1)
    return out


def predict_fold(fold: dict, feats: list[str], blocks: dict[str, list[str]], x: np.ndarray, c_n: int,
                 renorm: bool) -> dict[str, np.ndarray]:
    """One fold's stacker on the raw feature matrix `x` (columns `feats`): {head: class probabilities}."""
    xf = fold_matrix(feats, blocks, fold, x)
    return {h: _tree_predict(h, part, xf, c_n, renorm) if h in TREE_HEADS else _lr_predict(part, xf, c_n)
            for h, part in fold["heads"].items()}


def predict_fitted(fitted: dict, test_by_fold: dict[int, pd.DataFrame]
                   ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Test probabilities of the fitted stackers: fold k's stacker reads `test_by_fold[k]` (lesion_id +
    the feature columns; the same ids in the same order for every fold), averaged over folds as
    `fit_predict_stack` does. Returns (blended table, {head: table}), `lesion_id` + one column per class."""
    n, classes, feats = int(fitted["n_folds"]), list(fitted["classes"]), list(fitted["feats"])
    absent = [k for k in range(n) if k not in test_by_fold]
    if absent:
        raise PipelineError(f"stack: no test table for fold(s) {absent} of the fitted stackers")
    ids = test_by_fold[0][ID].astype(str).to_numpy()
    tst = {h: np.zeros((len(ids), len(classes))) for h in fitted["heads"]}
    for k in range(n):
        t = test_by_fold[k]
        if list(t[ID].astype(str)) != list(ids):
            raise PipelineError(f"stack: fold {k}'s test features hold other lesions (or another order) than fold 0's")
        missing = [c for c in feats if c not in t.columns]
        if missing:
            raise PipelineError(f"stack test: missing feature columns {missing[:5]} ({len(missing)} in all) "
                                "of the fitted stackers")
        p = predict_fold(fitted["folds"][k], feats, fitted["blocks"], t[feats].to_numpy(np.float64), len(classes),
                         fitted["renorm"])
        for h in fitted["heads"]:
            tst[h] += p[h] / n
    blend = blend_heads(tst, fitted["weights"], fitted["renorm"])
    return prob_table(blend, ids, classes), {h: prob_table(tst[h], ids, classes) for h in fitted["heads"]}
