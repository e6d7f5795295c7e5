"""Leak-free nested stacking on a fixed fold assignment.

For each outer fold k the rows with `fold == k` are the validation fold; everything fitted while
predicting them (per-block StandardScaler+PCA, every head, the early-stopping inner split) sees
only the rows with `fold != k`. Test predictions are averaged over folds (and seeds).

Heads (cfg `heads`):
- `xgb`  : one binary XGBoost per class, scale_pos_weight = neg/pos, early stopping on an inner
           stratified split carved from the training fold.
- `lgbm` : same with LightGBM (scale_pos_weight = neg/pos).
- `lr`   : multinomial logistic regression (per-class binary when `renorm` is False) on
           median-imputed, standardized features, class_weight from cfg.
Per-class binary probabilities are renormalized across classes when `renorm` (multiclass task);
heads are averaged with `head_weights`. A class with no positives (or no negatives) in a training
fold gets a constant smoothed prior and a warning.

The fitted parts (per fold: the blocks' imputer / scaler / PCA arrays, the boosters at the iteration
predict_proba uses, the logistic regressions' arrays, the constant priors) come back in
`StackResult.fitted`; `lib.tabular.stacker_io` saves, loads and applies them to new rows. PCA's
random_state is the first of `seeds`.

All matrices handed to scalers, PCA and models are DataFrames indexed by `lesion_id`, so tests can
verify the provenance of every fit.
"""
from __future__ import annotations

import inspect
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import lightgbm as lgb
from lightgbm import LGBMClassifier, early_stopping
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from lib.config.load import merge
from lib.config.schema import SCHEMA, STACK_DEFAULTS, STACK_HEADS
from lib.core.errors import PipelineError
from lib.core.io import ID, assert_unique_ids
from lib.core.progress import progress
from lib.core.runtime import resolve_device
from lib.core.scoring import argmax_onehot, macro_dice
from lib.tabular.stacker_apply import TREE_HEADS, blend_heads, predict_fold, prob_table, renorm_rows

log = logging.getLogger(__name__)

HEADS = STACK_HEADS
_LGBM_EVAL_XY = "eval_X" in inspect.signature(LGBMClassifier.fit).parameters  # lightgbm >= 4.6


@dataclass
class StackResult:
    """Stacking outputs; prediction tables are `lesion_id` + one column per class."""

    oof: pd.DataFrame
    test: pd.DataFrame | None
    per_head_oof: dict[str, pd.DataFrame]
    per_head_test: dict[str, pd.DataFrame]
    importance: pd.DataFrame          # feature, class, head, gain (mean over folds and seeds)
    fold_of: pd.Series                # lesion_id -> fold
    fitted: dict | None = None        # what predicts new rows per fold (see `fitted_layout`; lib.tabular.stacker_io)


# ----------------------------------------------------------------------------- config / checks
def stack_settings(over: dict | None) -> dict:
    """The stacker's settings: `over` (a partial or whole `stack` section) merged over STACK_DEFAULTS by
    lib.config's merge (an unknown key, also inside a head's dict, is a ConfigError)."""
    return merge(STACK_DEFAULTS, over or {}, SCHEMA["stack"], "stack")


def _check_inputs(train: pd.DataFrame, test: pd.DataFrame | None, blocks: dict[str, list[str]],
                  classes: list[str], cfg: dict) -> tuple[list[str], list[str]]:
    """Validate everything; return (feature columns, names of PCA blocks)."""
    assert_unique_ids(train, "stack train")
    ycols = [f"y_{c}" for c in classes]
    missing = [c for c in ["fold", *ycols] if c not in train.columns]
    if missing:
        raise PipelineError(f"stack train: missing columns {missing}")
    fold = pd.to_numeric(train["fold"], errors="coerce")
    if fold.isna().any() or (fold != fold.round()).any() or (fold < 0).any():
        bad = train.loc[fold.isna() | (fold < 0) | (fold != fold.round()), ID].head(3).tolist()
        raise PipelineError(f"stack train: every row needs one fold >= 0, bad rows e.g. {bad}")
    k = int(fold.max()) + 1
    if k < 2 or set(fold.astype(int)) != set(range(k)):
        raise PipelineError(f"stack train: folds must be 0..K-1 with K >= 2, got {sorted(set(fold.astype(int)))}")
    y = train[ycols].to_numpy(float)
    if not np.isin(y, (0.0, 1.0)).all():
        raise PipelineError(f"stack train: label columns {ycols} must be 0/1")
    if cfg["renorm"] and not (y.sum(1) == 1).all():
        bad = train.loc[y.sum(1) != 1, ID].head(3).tolist()
        raise PipelineError(f"stack train: multiclass labels need exactly one 1 per row, e.g. {bad}")

    if not blocks or any(not cols for cols in blocks.values()):
        raise PipelineError("stack: feature_blocks must be a non-empty dict of non-empty column lists")
    feats = [c for cols in blocks.values() for c in cols]
    dup = sorted({c for c in feats if feats.count(c) > 1})
    if dup:
        raise PipelineError(f"stack: columns in more than one feature block: {dup[:5]}")
    leak = [c for c in feats if str(c).startswith("y_") or c in ("label", "fold", ID)]
    if leak:
        raise PipelineError(f"stack: label-like columns among features: {leak}")
    for what, df in (("train", train), ("test", test)):
        if df is None:
            continue
        absent = [c for c in feats if c not in df.columns]
        if absent:
            raise PipelineError(f"stack {what}: missing feature columns {absent[:5]} ({len(absent)} in all)")
        nonnum = [c for c in feats if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
        if nonnum:
            raise PipelineError(f"stack {what}: non-numeric feature columns {nonnum[:5]}")
    if test is not None:
        assert_unique_ids(test, "stack test")
        both = set(train[ID].astype(str)) & set(test[ID].astype(str))
        if both:
            log.warning("stack: %d lesion_ids are in both train and test, e.g. %s", len(both), sorted(both)[:3])

    heads = cfg["heads"]
    if not heads or set(heads) - set(HEADS) or len(set(heads)) != len(heads):
        raise PipelineError(f"config: stack.heads must be distinct names from {list(HEADS)}, got {heads}")
    hw = cfg["head_weights"]
    if hw is not None and (set(hw) != set(heads) or any(w < 0 for w in hw.values()) or sum(hw.values()) <= 0):
        raise PipelineError(f"config: stack.head_weights must give a weight >= 0 to each of {heads}, got {hw}")
    if cfg["imbalance"] not in ("balanced", "none"):
        raise PipelineError(f"config: stack.imbalance must be balanced|none, got {cfg['imbalance']!r}")
    if not cfg["seeds"]:
        raise PipelineError("config: stack.seeds must not be empty")
    pb = cfg["pca_blocks"]
    pca_blocks = [b for b in blocks if b.startswith("emb")] if pb == "auto" else list(pb or [])
    unknown = [b for b in pca_blocks if b not in blocks]
    if unknown:
        raise PipelineError(f"config: stack.pca_blocks {unknown} not among feature blocks {list(blocks)}")
    return feats, pca_blocks


# ----------------------------------------------------------------------------- fold features
def _fold_features(xtr: pd.DataFrame, others: list[pd.DataFrame], blocks: dict[str, list[str]],
                   pca_blocks: list[str], n_comp: int, seed: int = 0
                   ) -> tuple[list[pd.DataFrame], list[str], dict[str, dict]]:
    """Fit per-block imputer+scaler+PCA on the training fold `xtr` only; transform it and `others`.

    Returns the matrices (training fold first, columns f0..fN, index lesion_id), feature names and
    per block its fitted arrays (`pca`, `names`; PCA blocks: `fill`, `mean`, `scale`, `pca_mean`,
    `components`).
    """
    parts: list[list[pd.DataFrame]] = [[] for _ in range(1 + len(others))]
    names: list[str] = []
    params: dict[str, dict] = {}
    for name, cols in blocks.items():
        if name in pca_blocks:
            n = max(1, min(n_comp, len(cols), len(xtr) - 1))
            red = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                                StandardScaler(), PCA(n_components=n, random_state=seed)).set_output(transform="pandas")
            red.fit(xtr[cols])
            outs = [red.transform(d[cols]) for d in [xtr, *others]]
            imp, sc, pca = red
            params[name] = {"pca": True, "names": [f"{name}_pc{i}" for i in range(n)],
                            "fill": np.asarray(imp.statistics_, np.float64), "mean": np.asarray(sc.mean_, np.float64),
                            "scale": np.asarray(sc.scale_, np.float64), "pca_mean": np.asarray(pca.mean_, np.float64),
                            "components": np.asarray(pca.components_, np.float64)}
        else:
            outs = [d[cols] for d in [xtr, *others]]
            params[name] = {"pca": False, "names": list(cols)}
        names += params[name]["names"]
        for p, o in zip(parts, outs):
            p.append(pd.DataFrame(o.to_numpy(np.float64), index=o.index))
    mats = []
    for p in parts:
        m = pd.concat(p, axis=1)
        m.columns = [f"f{i}" for i in range(m.shape[1])]  # safe names for xgboost / lightgbm
        mats.append(m)
    return mats, names, params


def inner_split(y: np.ndarray, frac: float, rng: np.random.Generator,
                 groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (positive/negative) split of training-fold positions into (fit, early-stop valid).

    Each label group with >= 2 rows gives at least one row to the valid part and keeps at least one.
    With `groups` (patients / lesions) whole groups go to one side, stratified on "has a positive".
    """
    if groups is not None:
        ug, inv = np.unique(np.asarray(groups), return_inverse=True)
        gy = np.zeros(len(ug))
        np.maximum.at(gy, inv, y)
        _, gval = inner_split(gy, frac, rng)
        mask = np.isin(inv, gval)
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    valid = [rng.choice(g, min(len(g) - 1, max(1, round(frac * len(g)))), replace=False)
             for g in (np.flatnonzero(y == 1), np.flatnonzero(y == 0)) if len(g) >= 2]
    mask = np.zeros(len(y), bool)
    if valid:
        mask[np.concatenate(valid)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# ----------------------------------------------------------------------------- heads
def _make_booster(head: str, hp: dict, seed: int, device: str, spw: float, n_est: int, es: int | None):
    if head == "xgb":
        return XGBClassifier(
            n_estimators=n_est, learning_rate=hp["learning_rate"], max_depth=hp["max_depth"],
            subsample=hp["subsample"], colsample_bytree=hp["colsample_bytree"],
            min_child_weight=hp["min_child_weight"], reg_lambda=hp["reg_lambda"], tree_method="hist",
            device=device, n_jobs=hp["n_jobs"], random_state=seed, scale_pos_weight=spw,
            eval_metric="logloss", early_stopping_rounds=es)
    return LGBMClassifier(
        n_estimators=n_est, learning_rate=hp["learning_rate"], num_leaves=hp["num_leaves"],
        min_child_samples=hp["min_child_samples"], subsample=hp["subsample"], subsample_freq=1,
        colsample_bytree=hp["colsample_bytree"], reg_lambda=hp["reg_lambda"], scale_pos_weight=spw,
        random_state=seed, n_jobs=hp["n_jobs"], verbose=-1)


def _fit_binary(head: str, hp: dict, xtr: pd.DataFrame, y: np.ndarray, xpred: list[pd.DataFrame],
                seed: int, device: str, balanced: bool, tag: str,
                groups: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray, Any]:
    """One binary booster on the training fold; returns P(positive) for each of `xpred`, gains and the
    fitted model (an xgboost / lightgbm Booster cut at the iteration predict_proba uses, or the constant
    prior as a float). `groups` (row-aligned with `xtr`): the early-stopping split keeps each group on
    one side."""
    n, pos = len(y), int(y.sum())
    if pos in (0, n):
        prior = (pos + 0.5) / (n + 1.0)
        log.warning("stack %s %s: %d positives of %d in the training fold; constant prior %.4f",
                    head, tag, pos, n, prior)
        return [np.full(len(x), prior) for x in xpred], np.zeros(xtr.shape[1]), float(prior)
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode())])
    fit_i, es_i = inner_split(y, hp["inner_valid_frac"], rng, groups)
    if y[es_i].sum() == 0 or y[es_i].sum() == len(es_i):  # cannot early-stop on one label
        log.warning("stack %s %s: %d positive(s) only; no early stopping, %d rounds",
                    head, tag, pos, min(hp["n_estimators"], hp["fallback_rounds"]))
        fit_i, es_i, n_est, es = np.arange(n), None, min(hp["n_estimators"], hp["fallback_rounds"]), None
    else:
        n_est, es = hp["n_estimators"], hp["early_stopping_rounds"]
    yf = y[fit_i]
    spw = float((yf == 0).sum() / max(yf.sum(), 1)) if balanced else 1.0
    m = _make_booster(head, hp, seed, device, spw, n_est, es)
    xf = xtr.iloc[fit_i]
    if head == "xgb":
        ev = None if es_i is None else [(xtr.iloc[es_i], y[es_i])]
        m.fit(xf, yf, eval_set=ev, verbose=False)
        booster = m.get_booster() if es is None else m.get_booster()[: m.best_iteration + 1]
        score = booster.get_score(importance_type="total_gain")
        gain = np.array([score.get(c, 0.0) for c in xtr.columns])
        model = booster
    else:
        kw: dict[str, Any] = {}
        if es_i is not None:
            xe, ye = xtr.iloc[es_i], y[es_i]
            kw = {**({"eval_X": (xe,), "eval_y": (ye,)} if _LGBM_EVAL_XY else {"eval_set": [(xe, ye)]}),
                  "eval_metric": "binary_logloss", "callbacks": [early_stopping(es, verbose=False)]}
        m.fit(xf, yf, **kw)
        gain = m.booster_.feature_importance(importance_type="gain").astype(float)
        # the trees predict_proba uses (best iteration; 0 = all), as a booster of its own
        model = lgb.Booster(model_str=m.booster_.model_to_string(num_iteration=m.best_iteration_ or -1))
    return [m.predict_proba(x)[:, 1] for x in xpred], gain, model


def _tree_head(head: str, xtr: pd.DataFrame, ytr: np.ndarray, xpred: list[pd.DataFrame], cfg: dict,
               device: str, fold: int, classes: list[str], bar: Any,
               groups: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray, list[list[Any]]]:
    """Per-class binary boosters averaged over seeds; returns class probs per `xpred`, gains (C, F) and
    the models [seed][class] (Booster or constant prior)."""
    seeds, c_n = cfg["seeds"], ytr.shape[1]
    preds = [np.zeros((len(x), c_n)) for x in xpred]
    gains = np.zeros((c_n, xtr.shape[1]))
    models: list[list[Any]] = []
    for seed in seeds:
        models.append([])
        for c in range(c_n):
            ps, g, model = _fit_binary(head, cfg[head], xtr, ytr[:, c], xpred, seed, device,
                                cfg["imbalance"] == "balanced", f"fold{fold}/{classes[c]}/seed{seed}", groups)
            for out, p in zip(preds, ps):
                out[:, c] += p / len(seeds)
            gains[c] += g / len(seeds)
            models[-1].append(model)
            bar.update()
    return ([renorm_rows(p) for p in preds] if cfg["renorm"] else preds), gains, models


def _lr_pipe(hp: dict):
    lr = LogisticRegression(C=hp["C"], class_weight=hp["class_weight"], max_iter=hp["max_iter"])
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                         lr).set_output(transform="pandas")


def _lr_arrays(pipe: Any) -> dict:
    """A fitted `_lr_pipe`'s arrays: imputer fill, scaler mean/scale, coef, intercept, classes."""
    imp, sc, est = pipe
    return {"fill": np.asarray(imp.statistics_, np.float64), "mean": np.asarray(sc.mean_, np.float64),
            "scale": np.asarray(sc.scale_, np.float64), "coef": np.asarray(est.coef_, np.float64),
            "intercept": np.asarray(est.intercept_, np.float64), "classes": est.classes_.astype(int).tolist()}


def _lr_head(xtr: pd.DataFrame, ytr: np.ndarray, xpred: list[pd.DataFrame], cfg: dict,
             fold: int) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """Logistic regression on the training fold; multinomial if `renorm`, else one binary per class.
    Returns class probs per `xpred`, gains (C, F) and the fitted parts: {"multinomial": renorm,
    "targets": [per target {"prior": ...} or `_lr_arrays`]}."""
    hp, c_n = cfg["lr"], ytr.shape[1]
    preds = [np.zeros((len(x), c_n)) for x in xpred]
    gains = np.zeros((c_n, xtr.shape[1]))
    targets = [ytr.argmax(1)] if cfg["renorm"] else [ytr[:, c] for c in range(c_n)]
    parts: list[dict] = []
    for c, y in enumerate(targets):
        present = np.unique(y)
        if len(present) < 2:
            prior = (ytr.sum(0) + 0.5) / (len(ytr) + 1.0) if cfg["renorm"] else (y.sum() + 0.5) / (len(y) + 1.0)
            log.warning("stack lr fold%d: single label in training fold; constant prior", fold)
            for out in preds:
                if cfg["renorm"]:
                    out[:] = prior
                else:
                    out[:, c] = prior
            parts.append({"prior": np.asarray(prior, np.float64).tolist()})
            continue
        pipe = _lr_pipe(hp).fit(xtr, y)
        est = pipe[-1]
        parts.append(_lr_arrays(pipe))
        coef = np.abs(est.coef_)
        if cfg["renorm"]:
            cls = est.classes_.astype(int)
            if len(cls) < c_n:
                log.warning("stack lr fold%d: classes absent from training fold get 0: %s",
                            fold, sorted(set(range(c_n)) - set(cls)))
            for out, x in zip(preds, xpred):
                out[:, cls] = pipe.predict_proba(x)
            gains[cls] = coef if len(coef) == len(cls) else coef[0]
        else:
            for out, x in zip(preds, xpred):
                out[:, c] = pipe.predict_proba(x)[:, 1]
            gains[c] = coef[0]
    return preds, gains, {"multinomial": bool(cfg["renorm"]), "targets": parts}


# ----------------------------------------------------------------------------- main entry
def _test_frames(test: pd.DataFrame | None, test_by_fold: dict[int, pd.DataFrame] | None, feats: list[str],
                 n_folds: int) -> dict[int, pd.DataFrame] | None:
    """The test matrix each fold's stacker predicts: `test_by_fold[k]` (the test features as fold k's
    upstream models gave them; same ids in the same order as `test`) or `test` for every fold."""
    if test is None:
        return None
    frames = {}
    for k in range(n_folds):
        t = test if test_by_fold is None else test_by_fold[k]
        if test_by_fold is not None and list(t[ID].astype(str)) != list(test[ID].astype(str)):
            raise PipelineError(f"stack: fold {k}'s test features hold other lesions (or another order) than the test table")
        frames[k] = pd.DataFrame(t[feats].to_numpy(np.float64), index=pd.Index(t[ID].astype(str).to_numpy(), name=ID),
                                 columns=feats)
    return frames


def _fit_fold(k: int, va: np.ndarray, x_all: pd.DataFrame, y_all: np.ndarray, x_te: pd.DataFrame | None,
              groups: np.ndarray | None, blocks: dict[str, list[str]], pca_blocks: list[str], cfg: dict,
              device: str, classes: list[str], bar: Any) -> tuple[dict, list[pd.DataFrame], dict]:
    """Outer fold k: fold features and every head fitted on `~va`; returns {head: [valid probs, (test
    probs)]}, the importance rows and the fold's fitted parts ({"blocks", "names", "heads"}). The test
    rows go through `predict_fold` (lib.tabular.stacker_apply), the path of saved stackers too."""
    (xtr, *xpred), names, params = _fold_features(x_all[~va], [x_all[va]], blocks, pca_blocks,
                                                  cfg["pca_components"], seed=cfg["seeds"][0])
    preds: dict[str, list[np.ndarray]] = {}
    imp, heads = [], {}
    c_n = len(classes)
    for h in cfg["heads"]:
        if h in TREE_HEADS:
            preds[h], gains, heads[h] = _tree_head(h, xtr, y_all[~va], xpred, cfg, device, k, classes, bar,
                                                   None if groups is None else groups[~va])
        else:
            preds[h], gains, heads[h] = _lr_head(xtr, y_all[~va], xpred, cfg, k)
        imp.append(pd.DataFrame({"feature": np.tile(names, c_n), "class": np.repeat(classes, len(names)),
                                 "head": h, "gain": gains.ravel(), "fold": k}))
    fitted = {"blocks": params, "names": names, "heads": heads}
    if x_te is not None:
        feats = [c for cols in blocks.values() for c in cols]
        te = predict_fold(fitted, feats, blocks, x_te[feats].to_numpy(np.float64), c_n, cfg["renorm"])
        for h in cfg["heads"]:
            preds[h].append(te[h])
    return preds, imp, fitted


def fitted_layout(classes: list[str], feats: list[str], blocks: dict[str, list[str]], pca_blocks: list[str],
                  cfg: dict, weights: dict[str, float], folds: list[dict]) -> dict:
    """`StackResult.fitted`: what predicts new rows, fold by fold (lib.tabular.stacker_io applies it).

    classes, feats (the input columns in order), blocks, pca_blocks, heads, weights (normalized head
    weights), renorm, seeds (the tree heads' random states), n_folds and `folds`: per fold `blocks`
    (per block `pca`, output `names`, PCA blocks' fill / mean / scale / pca_mean / components arrays),
    `names` (the fold's model input names) and `heads`: xgb / lgbm [seed][class] Booster or float
    prior; lr {"multinomial", "targets": [{"prior"} | {fill, mean, scale, coef, intercept, classes}]}.
    """
    return {"classes": list(classes), "feats": list(feats), "blocks": {b: list(c) for b, c in blocks.items()},
            "pca_blocks": list(pca_blocks), "heads": list(cfg["heads"]), "weights": dict(weights),
            "renorm": bool(cfg["renorm"]), "seeds": [int(s) for s in cfg["seeds"]], "n_folds": len(folds),
            "folds": folds}


def fit_predict_stack(train: pd.DataFrame, test: pd.DataFrame | None, feature_blocks: dict[str, list[str]],
                      classes: list[str], cfg: dict | None = None,
                      test_by_fold: dict[int, pd.DataFrame] | None = None) -> StackResult:
    """Nested stacking on the fixed `fold` column of `train` (see the module docstring). An optional
    `group` column (patients / lesions) keeps each group on one side of the inner early-stopping split.

    `cfg` is the `stack` config section (partial dicts are merged over STACK_DEFAULTS). `test_by_fold`
    ({fold k: test table}) gives fold k's stacker the test features made by fold k's upstream models
    (the same models that made its validation rows' features), instead of `test` (their mean).
    """
    cfg = stack_settings(cfg)
    feats, pca_blocks = _check_inputs(train, test, feature_blocks, classes, cfg)
    heads, c_n = list(cfg["heads"]), len(classes)
    hw = cfg["head_weights"] or {h: 1.0 for h in heads}
    w = {h: hw[h] / sum(hw[h] for h in heads) for h in heads}
    device = resolve_device(cfg["xgb"]["device"], "stack.xgb.device") if "xgb" in heads else "cpu"
    ids = train[ID].astype(str).to_numpy()
    x_all = pd.DataFrame(train[feats].to_numpy(np.float64), index=pd.Index(ids, name=ID), columns=feats)
    y_all = train[[f"y_{c}" for c in classes]].to_numpy(float)
    folds = train["fold"].astype(int).to_numpy()
    groups = train["group"].astype(str).to_numpy() if "group" in train.columns else None
    n_folds = folds.max() + 1
    x_tes = _test_frames(test, test_by_fold, feats, n_folds)
    x_te = None if x_tes is None else x_tes[0]
    oof = {h: np.full((len(train), c_n), np.nan) for h in heads}
    tst = {h: np.zeros((0 if x_te is None else len(x_te), c_n)) for h in heads}
    imp: list[pd.DataFrame] = []
    fits: list[dict] = []
    n_tree = sum(h in TREE_HEADS for h in heads)
    log.info("stack: %d rows, %d folds, %d features in %d blocks (PCA: %s), heads %s, device %s",
             len(train), n_folds, len(feats), len(feature_blocks), pca_blocks, heads, device)
    with progress(n_folds * len(cfg["seeds"]) * c_n * n_tree, "stack", unit="fit") as bar:
        for k in range(n_folds):
            va = folds == k
            preds, fold_imp, fold_fit = _fit_fold(k, va, x_all, y_all, None if x_tes is None else x_tes[k], groups,
                                                  feature_blocks, pca_blocks, cfg, device, classes, bar)
            imp += fold_imp
            fits.append(fold_fit)
            for h in heads:
                oof[h][va] = preds[h][0]
                if x_te is not None:
                    tst[h] += preds[h][1] / n_folds
            p = sum(w[h] * oof[h][va] for h in heads)
            yt = y_all[va]
            # logged only: macro F1 (the official Dice, lib.core.scoring) of argmax decisions (renorm) or p > 0.5
            f1 = macro_dice(yt, argmax_onehot(p) if cfg["renorm"] else p)
            log.info("stack fold %d: %d train / %d valid rows, macro F1 %.4f", k, (~va).sum(), va.sum(), f1)

    blend_oof = sum(w[h] * oof[h] for h in heads)
    blend_te = None if x_te is None else blend_heads(tst, w, cfg["renorm"])
    if cfg["renorm"]:
        blend_oof = renorm_rows(blend_oof)
    te_ids = None if x_te is None else x_te.index.to_numpy()
    importance = (pd.concat(imp).groupby(["feature", "class", "head"], sort=False, as_index=False)["gain"].mean()
                  .sort_values(["head", "class", "gain"], ascending=[True, True, False], ignore_index=True))
    return StackResult(
        oof=prob_table(blend_oof, ids, classes),
        test=None if x_te is None else prob_table(blend_te, te_ids, classes),
        per_head_oof={h: prob_table(oof[h], ids, classes) for h in heads},
        per_head_test={} if x_te is None else {h: prob_table(tst[h], te_ids, classes) for h in heads},
        importance=importance,
        fold_of=pd.Series(folds, index=pd.Index(ids, name=ID), name="fold"),
        fitted=fitted_layout(classes, feats, feature_blocks, pca_blocks, cfg, w, fits),
    )
