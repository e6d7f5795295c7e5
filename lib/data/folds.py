"""Deterministic, stratified (optionally grouped) fold assignment, written once to folds.csv."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from lib.core.artifacts import FOLDS
from lib.core.errors import PipelineError
from lib.core.io import ID, assert_unique_ids

log = logging.getLogger(__name__)


def strat_key(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """The stratification target: the label index, for multi-label rows the rarest positive class,
    and `len(classes)` for rows without any positive (binary negatives, multi-label "none")."""
    y = df[[f"y_{c}" for c in classes]].to_numpy()
    none = y.sum(1) <= 0
    if (y.sum(1) <= 1).all():
        key = y.argmax(1)
    else:
        freq = y.sum(0)
        key = np.where(y > 0, freq[None, :], np.inf).argmin(1)
    return np.where(none, len(classes), key)


def make_folds(df: pd.DataFrame, classes: list[str], n_splits: int, seed: int,
               group_col: str | None = None) -> pd.DataFrame:
    """Return `lesion_id, fold`. Stratified on the diagnosis; grouped when `group_col` is given."""
    assert_unique_ids(df, "fold table")
    if n_splits < 2:
        raise PipelineError(f"folds.n_splits must be >= 2, got {n_splits}")
    if len(df) < n_splits:
        raise PipelineError(f"folds: {len(df)} rows cannot fill {n_splits} folds")
    y = strat_key(df, classes)
    counts = np.bincount(y, minlength=len(classes))
    thin = [classes[i] for i in range(len(classes)) if 0 < counts[i] < n_splits]
    if thin:
        log.warning("classes with fewer lesions than folds (some folds lack them): %s", thin)
    x = np.zeros(len(df))
    if group_col:
        if group_col not in df.columns:
            raise PipelineError(f"folds.group: column '{group_col}' not in the table")
        groups = df[group_col].astype(str).to_numpy()
        if len(np.unique(groups)) < n_splits:
            raise PipelineError(f"folds: only {len(np.unique(groups))} groups for {n_splits} folds")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(x, y, groups)
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(x, y)
    fold = np.full(len(df), -1, dtype=int)
    for k, (_, va) in enumerate(splits):
        fold[va] = k
    assert (fold >= 0).all()
    return pd.DataFrame({ID: df[ID].to_numpy(), "fold": fold})


def check_folds(df: pd.DataFrame, folds: pd.DataFrame, group_col: str | None = None) -> None:
    """Every row in exactly one fold; no group split across folds."""
    assert_unique_ids(folds, FOLDS)
    if set(df[ID]) != set(folds[ID]):
        raise PipelineError("folds.csv does not cover exactly the train lesions; delete it and rerun 01")
    if (folds["fold"] < 0).any():
        raise PipelineError("folds.csv has rows without a fold")
    if group_col:
        m = df[[ID, group_col]].merge(folds, on=ID)
        spread = m.groupby(group_col)["fold"].nunique()
        if (spread > 1).any():
            raise PipelineError(f"folds: group {spread[spread > 1].index[0]} spans several folds")


def fold_summary(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Counts of each class per fold (rows = folds)."""
    y = df[[f"y_{c}" for c in classes]]
    return y.groupby(df["fold"]).sum().astype(int).rename(columns=lambda c: c[2:])
