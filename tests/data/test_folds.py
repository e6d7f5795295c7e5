"""lib.data.folds: exactly one fold per row, grouped folds never split a group, stratification (every class in
every fold where possible, rare classes spread), seeded determinism, the guards of check_folds."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import PipelineError
from lib.data import folds

COUNTS = {"BIG": 40, "MID": 20, "SMALL": 10, "RARE7": 7, "FIVE": 5, "TINY3": 3}
CLASSES = list(COUNTS)
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # lib logs its own


def table(counts: dict[str, int] = COUNTS, group_size: int = 1, seed: int = 0) -> pd.DataFrame:
    """Lesions with one-hot labels, rows shuffled; `group` ids shared by `group_size` same-class rows."""
    rows, g = [], 0
    for c, n in counts.items():
        for i in range(n):
            if i % group_size == 0:
                g += 1
            rows.append((c, f"G{g:04d}"))
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    df = pd.DataFrame({"lesion_id": [f"IL_{i:05d}" for i in range(len(rows))],
                       "group": [g for _, g in rows]})
    for c in counts:
        df[f"y_{c}"] = [float(r[0] == c) for r in rows]
    return df


def per_fold(df: pd.DataFrame, fo: pd.DataFrame) -> pd.DataFrame:
    m = df.merge(fo, on="lesion_id", validate="one_to_one")
    return folds.fold_summary(m, [c for c in CLASSES if f"y_{c}" in df])


def check_stratified(df, fo, k):
    counts = per_fold(df, fo)
    assert sorted(counts.index) == list(range(k))
    for c, n in COUNTS.items():
        col = counts[c]
        assert col.sum() == n
        if n >= k:
            assert (col >= 1).all(), f"class {c} ({n}) missing from a fold:\n{counts}"
        assert col.max() <= math.ceil(n / k), f"class {c} ({n}) crowded in one fold:\n{counts}"
        assert (col > 0).sum() == min(n, k), f"class {c} not spread:\n{counts}"


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_every_row_one_fold_and_stratified(seed):
    df = table(seed=seed)
    fo = folds.make_folds(df, CLASSES, 5, seed)
    assert list(fo.columns) == ["lesion_id", "fold"]
    assert fo["lesion_id"].tolist() == df["lesion_id"].tolist()
    assert fo["lesion_id"].is_unique and set(fo["fold"]) == set(range(5))
    assert fo["fold"].dtype.kind == "i"
    check_stratified(df, fo, 5)
    folds.check_folds(df, fo)
    sizes = fo["fold"].value_counts()
    assert sizes.max() - sizes.min() <= len(COUNTS)           # balanced fold sizes


@pytest.mark.parametrize("seed", [0, 3])
def test_grouped_singletons_still_stratified(seed):
    df = table(seed=seed)
    fo = folds.make_folds(df, CLASSES, 5, seed, group_col="group")
    check_stratified(df, fo, 5)
    folds.check_folds(df, fo, "group")


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_groups_never_cross_folds(seed):
    df = table({"BIG": 60, "MID": 30, "SMALL": 15}, group_size=3, seed=seed)
    fo = folds.make_folds(df, ["BIG", "MID", "SMALL"], 5, seed, group_col="group")
    m = df.merge(fo, on="lesion_id")
    assert (m.groupby("group")["fold"].nunique() == 1).all()
    assert set(fo["fold"]) == set(range(5))
    counts = per_fold(df, fo)
    assert (counts >= 1).all().all()                 # 5+ groups per class: every class in every fold
    folds.check_folds(df, fo, "group")


def test_deterministic_per_seed():
    df = table()
    a = folds.make_folds(df, CLASSES, 5, 42)
    b = folds.make_folds(df.copy(), CLASSES, 5, 42)
    c = folds.make_folds(df, CLASSES, 5, 43)
    pd.testing.assert_frame_equal(a, b)
    assert (a["fold"] != c["fold"]).any()
    g1 = folds.make_folds(df, CLASSES, 5, 42, "group")
    g2 = folds.make_folds(df, CLASSES, 5, 42, "group")
    g3 = folds.make_folds(df, CLASSES, 5, 5, "group")
    pd.testing.assert_frame_equal(g1, g2)
    assert (g1["fold"] != g3["fold"]).any()


def test_rare_class_warning(caplog):
    df = table({"A": 20, "B": 3})
    with caplog.at_level("WARNING", logger="lib.data.folds"):
        folds.make_folds(df, ["A", "B"], 5, 0)
    assert "fewer lesions than folds" in caplog.text and "'B'" in caplog.text


def test_multilabel_stratifies_on_rarest_positive():
    df = pd.DataFrame({"lesion_id": list("abcd"), "y_X": [1.0, 1.0, 1.0, 0.0], "y_Y": [1.0, 0.0, 0.0, 1.0],
                       "y_Z": [0.0, 0.0, 1.0, 0.0]})
    assert folds.strat_key(df, ["X", "Y", "Z"]).tolist() == [1, 0, 2, 1]
    one_hot = pd.DataFrame({"lesion_id": list("ab"), "y_X": [0.0, 1.0], "y_Y": [1.0, 0.0]})
    assert folds.strat_key(one_hot, ["X", "Y"]).tolist() == [1, 0]


def test_binary_negatives_are_their_own_stratum():
    """Binary (one column) and multi-label rows without a positive get key len(classes), so folds
    are stratified on positives vs negatives (a key of 0 for everyone would not stratify)."""
    df = pd.DataFrame({"lesion_id": list("abcd"), "y_malignant": [0.0, 1.0, 0.0, 0.0]})
    assert folds.strat_key(df, ["malignant"]).tolist() == [1, 0, 1, 1]
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random(n) < 0.05).astype(float)
    groups = [f"P{i // 3}" for i in range(n)]  # 3 lesions per patient
    df = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(n)], "y_malignant": y, "group": groups})
    fo = folds.make_folds(df, ["malignant"], 5, 0, "group")
    folds.check_folds(df, fo, "group")
    pos = df.merge(fo, on="lesion_id").groupby("fold")["y_malignant"].sum()
    assert pos.max() - pos.min() <= 3, pos.tolist()


def test_multilabel_folds():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < [0.6, 0.3, 0.15]).astype(float)
    y[y.sum(1) == 0, 0] = 1
    df = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(60)], "y_A": y[:, 0], "y_B": y[:, 1], "y_C": y[:, 2]})
    fo = folds.make_folds(df, ["A", "B", "C"], 3, 0)
    folds.check_folds(df, fo)
    m = df.merge(fo, on="lesion_id")
    assert (m.groupby("fold")[["y_A", "y_B", "y_C"]].sum() >= 1).all().all()


# --------------------------------------------------------------------------- guards
def test_make_folds_errors():
    df = table({"A": 6, "B": 4}, group_size=4)
    with pytest.raises(PipelineError, match="n_splits must be >= 2"):
        folds.make_folds(df, ["A", "B"], 1, 0)
    with pytest.raises(PipelineError, match="10 rows cannot fill 11 folds"):
        folds.make_folds(df, ["A", "B"], 11, 0)
    with pytest.raises(PipelineError, match="only 3 groups for 5 folds"):
        folds.make_folds(df, ["A", "B"], 5, 0, group_col="group")
    with pytest.raises(PipelineError, match="column 'patient' not in the table"):
        folds.make_folds(df, ["A", "B"], 2, 0, group_col="patient")
    dup = pd.concat([df, df.iloc[:1]])
    with pytest.raises(PipelineError, match="duplicate lesion_id"):
        folds.make_folds(dup, ["A", "B"], 2, 0)


def test_check_folds_catches_bad_assignments():
    df = table({"A": 12, "B": 8}, group_size=2)
    fo = folds.make_folds(df, ["A", "B"], 4, 0, "group")
    folds.check_folds(df, fo, "group")
    with pytest.raises(PipelineError, match="does not cover exactly"):
        folds.check_folds(df, fo.iloc[1:], "group")
    extra = pd.concat([fo, pd.DataFrame({"lesion_id": ["NEW"], "fold": [0]})])
    with pytest.raises(PipelineError, match="does not cover exactly"):
        folds.check_folds(df, extra)
    with pytest.raises(PipelineError, match="duplicate lesion_id"):
        folds.check_folds(df, pd.concat([fo, fo.iloc[:1]]))
    neg = fo.copy()
    neg.loc[0, "fold"] = -1
    with pytest.raises(PipelineError, match="rows without a fold"):
        folds.check_folds(df, neg)
    split = fo.copy()
    g = df.loc[df["lesion_id"] == split.loc[0, "lesion_id"], "group"].iloc[0]
    mates = df.loc[df["group"] == g, "lesion_id"]
    split.loc[split["lesion_id"] == mates.iloc[1], "fold"] = (split.loc[0, "fold"] + 1) % 4
    with pytest.raises(PipelineError, match=f"group {g} spans several folds"):
        folds.check_folds(df, split, "group")
    folds.check_folds(df, split)                           # ungrouped check does not care


def test_fold_summary_counts():
    df = pd.DataFrame({"lesion_id": list("abcde"), "y_A": [1.0, 1, 0, 0, 1], "y_B": [0.0, 0, 1, 1, 0],
                       "fold": [0, 1, 0, 1, 1]})
    s = folds.fold_summary(df, ["A", "B"])
    assert s.to_dict() == {"A": {0: 1, 1: 2}, "B": {0: 1, 1: 1}}
