"""lib/evaluation/bootstrap.py: class-stratified bootstrap of the official macro Dice."""
from __future__ import annotations

import numpy as np
import pytest

from lib.core.errors import PipelineError
from lib.evaluation.bootstrap import bootstrap_macro_dice, stratified_weights, weighted_macro_dice
from lib.evaluation.metrics import macro_dice


def _data(n: int = 120, k: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = np.r_[np.arange(k), rng.integers(0, k, n - k)]          # every class present, one of them rare-ish
    y = np.eye(k)[lab]
    noisy = np.where(rng.random(n) < 0.3, rng.integers(0, k, n), lab)  # 30% of rows relabelled at random
    return y, np.eye(k)[noisy] * 0.9 + 0.01


def test_weights_keep_every_class_count_and_follow_the_seed() -> None:
    lab = np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 1])
    w = stratified_weights(lab, 50, seed=3)
    assert w.shape == (50, len(lab))
    for k in np.unique(lab):
        assert (w[:, lab == k].sum(axis=1) == (lab == k).sum()).all()
    assert np.array_equal(w, stratified_weights(lab, 50, seed=3)) and not np.array_equal(w, stratified_weights(lab, 50, 4))
    with pytest.raises(PipelineError, match="n_boot"):
        stratified_weights(lab, 0, 0)


def test_weighted_dice_equals_the_official_dice_on_repeated_rows() -> None:
    y, p = _data()
    assert weighted_macro_dice(y, p, np.ones((1, len(y))))[0] == pytest.approx(macro_dice(y, p))
    w = stratified_weights(y.argmax(1), 3, seed=0)
    for row in w:
        rep = np.repeat(np.arange(len(y)), row.astype(int))
        assert weighted_macro_dice(y, p, row[None])[0] == pytest.approx(macro_dice(y[rep], p[rep]))


def test_interval_and_paired_difference() -> None:
    y, p = _data()
    b = bootstrap_macro_dice(y, p, n_boot=400, seed=0)
    assert b["macro_dice"] == pytest.approx(macro_dice(y, p)) and b["se"] > 0
    assert b["ci_low"] < b["macro_dice"] < b["ci_high"]
    perfect = bootstrap_macro_dice(y, y, n_boot=50)
    assert perfect["macro_dice"] == 1.0 and perfect["se"] == 0.0
    same = bootstrap_macro_dice(y, p, against=p.copy(), n_boot=100)
    assert same["diff"] == 0.0 and same["diff_se"] == 0.0 and same["p_not_better"] == 1.0
    # correcting wrong rows can only raise every class's Dice: the paired difference is >= 0 on every draw
    fixed = p.copy()
    wrong = np.flatnonzero(p.argmax(1) != y.argmax(1))[:3]
    fixed[wrong] = y[wrong] * 0.9 + 0.01
    d = bootstrap_macro_dice(y, fixed, against=p, n_boot=300, seed=0)
    assert d["diff"] > 0 and d["diff_ci_low"] >= 0 and d["diff_se"] > 0
    with pytest.raises(PipelineError, match="shape"):
        bootstrap_macro_dice(y, p[:-1])
    with pytest.raises(PipelineError, match="--against predictions"):
        bootstrap_macro_dice(y, p, against=p[:-1])


def test_bad_requests_are_refused_and_lists_are_accepted() -> None:
    y, p = _data(n=30)
    with pytest.raises(PipelineError, match="n_boot must be >= 2"):
        bootstrap_macro_dice(y, p, n_boot=1)
    multi = y.copy()
    multi[0] = 1.0
    with pytest.raises(PipelineError, match="exactly one positive"):
        bootstrap_macro_dice(multi, p)
    assert bootstrap_macro_dice(y.tolist(), p.tolist(), n_boot=20)["macro_dice"] == pytest.approx(macro_dice(y, p))


def test_grouped_draws_keep_patients_whole_and_positive_patients_counted():
    from lib.evaluation.bootstrap import grouped_draws
    groups = np.array(["a", "a", "b", "c", "c", "c", "d"])
    pos = np.array([0, 1, 0, 0, 0, 0, 0], bool)
    for d in grouped_draws(groups, pos, 50, seed=1):
        drawn = groups[d]
        for g in set(drawn):  # a drawn patient comes with all of its rows, as often as it was drawn
            assert (drawn == g).sum() % (groups == g).sum() == 0
        assert (drawn == "a").sum() == 2  # the one positive patient: drawn exactly once (its stratum's size)
        assert sum((drawn == g).sum() // (groups == g).sum() for g in "bcd") == 3


def test_bootstrap_ranking_interval_brackets_the_auc_and_widens_with_fewer_patients():
    from lib.evaluation.bootstrap import bootstrap_ranking
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.1).astype(float)
    s = y * 0.8 + rng.random(400)
    rows = bootstrap_ranking(y, s, n_boot=200)
    assert rows["auc"]["ci_low"] <= rows["auc"]["value"] <= rows["auc"]["ci_high"]
    assert 0 < rows["auc"]["se"] < 0.1 and "pauc_80" in rows
    few = bootstrap_ranking(y, s, groups=np.arange(400) // 40, n_boot=200)  # 10 patients of 40 rows
    assert few["auc"]["value"] == rows["auc"]["value"] and few["auc"]["se"] > rows["auc"]["se"]
    with pytest.raises(PipelineError, match="both classes"):
        bootstrap_ranking(np.zeros(5), np.arange(5.0))
