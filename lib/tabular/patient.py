"""Patient-relative ("ugly duckling") features for binary triage with several lesions per patient."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.core.errors import PipelineError


def patient_relative(x: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    """ISIC 2024-style "ugly duckling" features: each numeric column relative to the other rows of
    the same group (patient): `pat_diff_<c>` (value - patient mean), `pat_z_<c>` (z-score within the
    patient, 0 when the patient has one row or no spread), `pat_rank_<c>` (percentile rank within
    the patient), plus `pat_count` (rows of the patient). Uses no labels; NaN stays NaN.

    Rows of one group must come from one split and one fold (grouped folds) for these to be
    leak-free: statistics are computed over exactly the rows passed in."""
    if len(x) != len(groups):
        raise PipelineError(f"patient_relative: {len(x)} rows but {len(groups)} group ids")
    x = x.reset_index(drop=True).astype(np.float64)
    g = pd.Series(np.asarray(groups).astype(str))
    by = x.groupby(g.to_numpy())
    mean, std = by.transform("mean"), by.transform("std", ddof=0)
    cols: dict[str, np.ndarray] = {}
    for c in x.columns:
        d = (x[c] - mean[c]).to_numpy()
        s = std[c].to_numpy()
        cols[f"pat_diff_{c}"] = d
        cols[f"pat_z_{c}"] = np.where(s > 1e-12, d / np.where(s > 1e-12, s, 1.0), np.where(np.isnan(d), np.nan, 0.0))
        cols[f"pat_rank_{c}"] = by[c].rank(pct=True).to_numpy()
    cols["pat_count"] = g.map(g.value_counts()).to_numpy(dtype=np.float64)
    return pd.DataFrame(cols).astype(np.float32)
