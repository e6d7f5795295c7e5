"""Raw metadata -> `meta_*` features (encoders fitted on train only); column-name helpers."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- metadata encoding
def fit_meta_encoders(train: pd.DataFrame, num_cols: list[str], cat_cols: list[str]) -> dict:
    """Numeric: mean/std on train; categorical: train levels (+ 'unknown'). Fitted on train only."""
    enc: dict = {"num": {}, "cat": {}}
    for c in num_cols:
        v = pd.to_numeric(train[c], errors="coerce")
        std = float(v.std()) if v.notna().sum() > 1 else 1.0
        enc["num"][c] = {"mean": float(v.mean()) if v.notna().any() else 0.0, "std": std if std > 0 else 1.0}
    for c in cat_cols:  # a literal 'unknown' level (HAM10000) is the unknown column, not a level of its own
        enc["cat"][c] = sorted(set(train[c].dropna().astype(str).unique().tolist()) - {"unknown"})
    return enc


def apply_meta_encoders(df: pd.DataFrame, enc: dict, split: str) -> pd.DataFrame:
    """Raw metadata -> `meta_*` columns (scaled numbers + missing flags, one-hot with unknown)."""
    cols: dict[str, np.ndarray] = {}
    for c, s in enc["num"].items():
        v = pd.to_numeric(df[c], errors="coerce")
        miss = v.isna()
        if miss.any():
            log.warning("%s: %d of %d rows lack '%s' (encoded as mean + missing flag)", split, int(miss.sum()), len(v), c)
        cols[f"meta_{c}"] = ((v.fillna(s["mean"]) - s["mean"]) / s["std"]).to_numpy(dtype=np.float32)
        cols[f"meta_{c}_missing"] = miss.to_numpy(dtype=np.float32)
    for c, levels in enc["cat"].items():
        v = df[c].astype("string")
        miss = v.isna()
        if miss.any():
            log.warning("%s: %d of %d rows lack '%s' (encoded as unknown)", split, int(miss.sum()), len(v), c)
        v = v.fillna("unknown").astype(str)
        levels = [lv for lv in levels if lv != "unknown"]
        for lv in levels:
            cols[f"meta_{c}_{lv}"] = (v == lv).to_numpy(dtype=np.float32)
        cols[f"meta_{c}_unknown"] = (~v.isin(levels)).to_numpy(dtype=np.float32)
    return pd.DataFrame(cols, index=df.index)


# --------------------------------------------------------------------------- column names
def meta_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("meta_")]


def monet_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("monet_")]


def label_columns(classes: list[str]) -> list[str]:
    return [f"y_{c}" for c in classes]
