"""lib.evaluation.decision: threshold tuning, threshold-baking remaps, logit adjustment, the rule
(argmax vs thresholds) and the labels of the confusion matrix."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from lib.core.errors import PipelineError
from lib.evaluation import decision as D
from lib.evaluation import metrics as M
from tests.helpers import shifted_case

CLASSES = ["A", "B", "C"]


def test_tuned_thresholds_beat_half():
    Y, P = shifted_case()
    t = D.tune_thresholds(Y, P)
    assert M.macro_dice(Y, P, t) > M.macro_dice(Y, P) + 0.1
    assert t[0] < 0.4 and t[2] > 0.6


def test_per_class_tuning_is_the_joint_optimum():
    Y, P = shifted_case(1, n=200)
    grid = np.linspace(0.05, 0.95, 19)
    joint = max(M.macro_dice(Y, P, np.array(ts)) for ts in itertools.product(grid, repeat=3))
    assert M.macro_dice(Y, P, D.tune_thresholds(Y, P, grid, min_positives=1)) == pytest.approx(joint)


def test_dice_curve_matches_dice_per_class():
    Y, P = shifted_case(2, n=150)
    P = np.round(P, 2)  # values exactly on grid points
    grid = D.threshold_grid()
    curve = D.dice_curve(Y[:, 1], P[:, 1], grid)
    ref = [M.dice_per_class(Y[:, 1:2], P[:, 1:2], t)[0] for t in grid]
    np.testing.assert_allclose(curve, ref)


def test_few_positives_and_shrink_guards():
    Y, P = shifted_case()
    Y[:, 0], Y[:4, 0] = 0.0, 1.0  # class 0: 4 positives
    t = D.tune_thresholds(Y, P, min_positives=10)
    assert t[0] == 0.5 and t[2] != 0.5
    n2 = Y[:, 2].sum()
    t_s = D.tune_thresholds(Y, P, min_positives=10, shrink=n2)
    assert t_s[2] == pytest.approx(0.5 + (t[2] - 0.5) / 2)


def test_remap_decision_equivalence_and_ranking():
    rng = np.random.default_rng(0)
    t = np.array([0.07, 0.5, 0.33, 0.9300000000000001, 0.1 + 0.2])
    around = np.concatenate([[ti, np.nextafter(ti, 0), np.nextafter(ti, 1)] for ti in t])
    P = np.concatenate([rng.random((400, 5)), np.tile(around[:, None], (1, 5)),
                        np.array([[0.0] * 5, [1.0] * 5])])
    Q = D.remap_to_threshold(P, t)
    np.testing.assert_array_equal(P > t, Q > 0.5)
    assert Q.min() >= 0.0 and Q.max() <= 1.0
    for c in range(5):
        order = np.argsort(P[:, c], kind="stable")
        dp, dq = np.diff(P[order, c]), np.diff(Q[order, c])
        assert (dq >= 0).all() and (dq[dp > 1e-9] > 0).all()
    # AUC is unchanged (points 1 ulp apart may merge: more floats lie in [t, 1] than in [0.5, 1])
    R = np.concatenate([rng.random((400, 5)), np.tile(t, (5, 1))])
    y = (rng.random(R.shape) < R).astype(float)
    S = D.remap_to_threshold(R, t)
    np.testing.assert_allclose(M.auc_per_class(y, S), M.auc_per_class(y, R), rtol=0, atol=1e-15)
    assert M.macro_dice(y, S) == M.macro_dice(y, R, t)
    with pytest.raises(PipelineError):
        D.remap_to_threshold(P, np.array([0.0, 0.5, 0.5, 0.5, 1.0]))


def test_argmax_remap_gives_argmax_decisions():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(4), 300)
    P[0] = [0.4, 0.4, 0.1, 0.1]  # tie: first index wins
    P[1] = [0.0, 0.0, 0.0, 0.0]
    Q = D.argmax_remap(P)
    np.testing.assert_array_equal(Q > 0.5, D.argmax_decisions(P) > 0)
    assert (Q > 0.5).sum(axis=1).tolist() == [1] * len(P) and Q[0, 0] > 0.5 and Q[1, 0] > 0.5
    y = M.to_onehot(rng.integers(0, 4, 300), 4)
    assert M.macro_dice(y, Q) == pytest.approx(M.macro_f1_argmax(y, P))


def test_foldwise_honest_cv_not_above_tuned():
    Y, P = shifted_case(3, n=500)
    P = np.clip(P + np.random.default_rng(3).normal(0, 0.15, P.shape), 0, 1)  # noisy: overfit shows
    folds = np.arange(len(Y)) % 5
    r = D.foldwise_threshold_spread(Y, P, folds, CLASSES, min_positives=1)
    pf = r["per_fold"]
    assert len(pf) == 5 and (pf["dice_cv"] <= pf["dice_infold"] + 1e-12).all()
    assert r["cv_dice_pooled"] <= r["pooled_dice_tuned"]
    assert r["cv_dice_pooled"] > r["pooled_dice_05"]  # the tuned cuts still help honestly here
    assert r["thresholds_cv"].shape == (5, 3) and list(r["thresholds_cv"].columns) == CLASSES
    assert r["threshold_std"].shape == (3,) and (r["threshold_std"] > 0).any()


def test_logit_adjust():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 3))
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pri = np.array([0.7, 0.2, 0.1])
    ref = np.exp(logits - 0.5 * np.log(pri))
    np.testing.assert_allclose(D.logit_adjust(P, pri, 0.5), ref / ref.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(D.logit_adjust(P, pri, 0.0), P)


def test_decide_labels() -> None:
    P = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]])
    t = np.array([0.6, 0.2, 0.1])
    # row 0: B (1.5) and C (2.0) clear -> C; row 1: B 1.75 vs C 2.5 -> C; row 2: C
    np.testing.assert_array_equal(D.decide_labels(P, t), [2, 2, 2])
    np.testing.assert_array_equal(D.decide_labels(P, np.full(3, 0.9)), [0, 0, 2])  # none clear -> argmax
    np.testing.assert_array_equal(D.decide_labels(P), [0, 0, 2])


def test_choose_decision_by_task():
    scores = {"thresholds": 0.5, "argmax": 0.6}
    assert D.choose_decision("auto", "multiclass", scores) == "argmax"
    assert D.choose_decision("auto", "multiclass", {**scores, "argmax": 0.4}) == "thresholds"
    assert D.choose_decision("auto", "multiclass", {**scores, "argmax": 0.5}) == "thresholds"  # ties: thresholds
    assert D.choose_decision("auto", "binary") == "raw"
    assert D.choose_decision("auto", "multilabel") == "thresholds"
    assert D.choose_decision("thresholds", "binary") == "thresholds"
    with pytest.raises(PipelineError, match="needs a multiclass task"):
        D.choose_decision("argmax", "multilabel")
    with pytest.raises(PipelineError, match="unknown"):
        D.choose_decision("best", "multiclass", scores)


def test_deployment_rule_compares_the_nested_estimates_and_expects_the_fully_nested_figure():
    """Thresholds look better when only they are nested but worse once the blend weights are nested
    too: auto picks argmax on all rows; the expected score is the fully nested figure (rule re-chosen
    per fold), not the larger of the two per-rule estimates."""
    nested = {"macro_dice_tuned_nested": 0.49, "macro_f1_argmax_nested": 0.50, "macro_dice_nested": 0.47}
    assert D.deployment_rule("auto", "multiclass", nested) == "argmax"
    assert D.expected_score("argmax", "multiclass", nested) == 0.47
    assert D.deployment_rule("auto", "multiclass", {**nested, "macro_dice_tuned_nested": 0.505}) == "thresholds"
    assert D.deployment_rule("thresholds", "multiclass", nested) == "thresholds"
    assert D.expected_score("raw", "binary", {"pauc_80_nested": 0.15, "macro_dice_nested": 0.3}) == 0.15
