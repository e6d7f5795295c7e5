"""lib.evaluation.metrics against the official isic-challenge-scoring package and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from lib.core.errors import PipelineError
from lib.evaluation import metrics as M

CLASSES = ["AKIEC", "BCC", "MEL", "NV", "VASC"]


@pytest.fixture
def pkg():
    """The official scorer modules (skips only where the package is not installed)."""
    pytest.importorskip("isic_challenge_scoring")
    from isic_challenge_scoring import classification, confusion, metrics
    return classification, confusion, metrics


def _pkg_dice(pkg, Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """The package's per-category Dice path (``_category_score``) without its AUC parts."""
    _, confusion, metrics = pkg
    out = []
    for c in range(Y.shape[1]):
        cm = confusion.create_binary_confusion_matrix(
            truth_binary_values=pd.Series(Y[:, c]).gt(0.5).to_numpy(),
            prediction_binary_values=pd.Series(P[:, c]).gt(0.5).to_numpy(),
            weights=np.ones(len(Y)), name=str(c))
        out.append(metrics.binary_dice(cm))
    return np.array(out, dtype=float)


def _pkg_bacc(pkg, Y: np.ndarray, P: np.ndarray) -> float:
    cols = [f"c{i}" for i in range(Y.shape[1])]
    return float(pkg[2].balanced_multiclass_accuracy(
        pd.DataFrame(Y, columns=cols), pd.DataFrame(P, columns=cols), pd.Series(np.ones(len(Y)))))


def _random_case(seed: int, n: int = 300, sharp: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(len(CLASSES)), rng.integers(0, len(CLASSES), n - len(CLASSES))])
    Y = M.to_onehot(labels, len(CLASSES))
    logits = rng.normal(size=Y.shape) + sharp * Y * rng.random((n, 1))
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    P[: n // 3] = 1 / (1 + np.exp(-logits[: n // 3]))  # multilabel-style rows: several may be > 0.5
    return Y, P


def _tables(Y: np.ndarray, P: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = [f"IL_{i:05d}" for i in range(len(Y))]
    truth = pd.DataFrame(Y, columns=[f"y_{c}" for c in CLASSES]).assign(lesion_id=ids)
    pred = pd.DataFrame(P, columns=CLASSES).assign(lesion_id=ids)
    return truth, pred


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's own pandas calls
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_classification_score(pkg, seed):
    classification = pkg[0]
    Y, P = _random_case(seed)
    P[5, :2] = 0.5  # exact ties at the cut and at the row maximum
    idx = pd.Index([f"i{i}" for i in range(len(Y))], name="image")
    s = classification.ClassificationScore(
        pd.DataFrame(Y, index=idx, columns=CLASSES), pd.DataFrame(P, index=idx, columns=CLASSES),
        pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=idx),
        classification.ClassificationMetric.BALANCED_ACCURACY)
    np.testing.assert_allclose(M.dice_per_class(Y, P), s.per_category["dice"].to_numpy(), atol=1e-12)
    assert M.macro_dice(Y, P) == pytest.approx(s.macro_average["dice"], abs=1e-12)
    assert M.balanced_accuracy(Y, P) == pytest.approx(s.aggregate["balanced_accuracy"], abs=1e-12)
    np.testing.assert_allclose(M.auc_per_class(Y, P), s.per_category["auc"].to_numpy(), atol=1e-12)
    assert M.macro_auc(Y, P) == pytest.approx(s.macro_average["auc"], abs=1e-12)


def test_official_score_wrapper_agrees_with_score_table(pkg):
    Y, P = _random_case(3)
    truth, pred = _tables(Y, P)
    mine = M.score_table(truth, pred.sample(frac=1.0, random_state=0), CLASSES, "multiclass")
    off = M.official_score(truth, pred, CLASSES)
    for k in ("macro_dice", "balanced_accuracy", "macro_auc"):
        assert mine[k] == pytest.approx(off[k], abs=1e-12), k
    truth.loc[truth["y_VASC"] > 0.5, ["y_VASC", "y_NV"]] = [0.0, 1.0]
    with pytest.raises(PipelineError, match="VASC"):
        M.official_score(truth, pred, CLASSES)


EDGE_CASES = {
    # class 2 absent and never predicted (-> 1.0); class 3 absent but predicted (-> 0.0)
    "no_positives": (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]),
                     np.array([[.9, .1, .1, .6], [.2, .7, .3, .1], [.6, .2, .4, .2]]),
                     [1.0, 1.0, 1.0, 0.0]),
    "all_below_half": (np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]),
                       np.full((4, 3), 0.49), [0.0, 0.0, 0.0]),
    "ties_at_half": (np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                     np.array([[.5, .5, 0.], [.5, .5, 0.], [0., 0., .5000001]]), [0.0, 0.0, 1.0]),
    "single_row": (np.array([[0, 1, 0]]), np.array([[.3, .6, .55]]), [1.0, 1.0, 0.0]),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_match_package(pkg, case):
    Y, P, expected = EDGE_CASES[case]
    Y, P = Y.astype(float), P.astype(float)
    np.testing.assert_array_equal(M.dice_per_class(Y, P), expected)
    np.testing.assert_array_equal(M.dice_per_class(Y, P), _pkg_dice(pkg, Y, P))
    assert M.balanced_accuracy(Y, P) == pytest.approx(_pkg_bacc(pkg, Y, P), nan_ok=True)


def test_balanced_accuracy_by_hand():
    Y = M.to_onehot(np.array([0, 0, 1, 1, 2]), 4)  # class 3 has no truth rows: skipped
    P = np.array([[.6, .3, .1, 0], [.4, .4, .2, 0], [.1, .8, .1, 0], [.7, .2, .1, 0], [0, 0, 1, 0]])
    # class 0: 1/2 (row 1 is a tie -> undecided), class 1: 1/2, class 2: 1/1
    assert M.balanced_accuracy(Y, P) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    np.testing.assert_array_equal(M.argmax_labels(P), [0, -1, 1, 0, 2])


def _pauc_mcclish(y, s, min_tpr=0.8):
    """The Kaggle metric's commented 'equivalent code' (McClish-rescaled roc_auc_score)."""
    m = abs(1 - min_tpr)
    scaled = roc_auc_score(np.abs(np.asarray(y) - 1), np.array([1.0 - x for x in s]), max_fpr=m)
    return 0.5 * m ** 2 + (m - 0.5 * m ** 2) / (1.0 - 0.5) * (scaled - 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_partial_auc_matches_kaggle_definition(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(500) < 0.1).astype(int)
    s = np.round(rng.random(500) * 0.6 + 0.4 * y * rng.random(500), 2)  # rounded: many ties
    assert M.partial_auc(y, s) == pytest.approx(_pauc_mcclish(y, s), abs=1e-12)
    assert 0.0 <= M.partial_auc(y, s) <= 0.2 + 1e-12


def test_partial_auc_bounds():
    y = np.array([0, 0, 0, 1, 1])
    assert M.partial_auc(y, np.array([.1, .2, .3, .8, .9])) == pytest.approx(0.2)
    assert M.partial_auc(y, np.array([.9, .8, .7, .2, .1])) == pytest.approx(0.0)
    assert np.isnan(M.partial_auc(np.zeros(4), np.arange(4.0)))


def test_auc_nan_for_degenerate_class():
    Y = np.array([[1, 0], [1, 0], [0, 0]], dtype=float)
    a = M.auc_per_class(Y, np.array([[.9, .1], [.8, .2], [.1, .3]]))
    assert a[0] == 1.0 and np.isnan(a[1])
    assert M.macro_auc(Y, np.array([[.9, .1], [.8, .2], [.1, .3]])) == 1.0


def test_macro_f1_argmax_and_thresholded_macro_dice():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.arange(4), rng.integers(0, 4, 96)])
    P = rng.random((100, 4)) + 0.5 * M.to_onehot(labels, 4)
    ref = f1_score(labels, P.argmax(axis=1), average="macro", labels=range(4))
    assert M.macro_f1_argmax(labels, P) == pytest.approx(ref)
    assert M.macro_f1_argmax(M.to_onehot(labels, 4), P) == pytest.approx(ref)
    Ym = (rng.random((100, 4)) < 0.3).astype(float)
    t = np.array([0.3, 0.5, 0.6, 0.7])
    ref = f1_score(Ym, (P > t).astype(int), average="macro", zero_division=1.0)
    assert M.macro_dice(Ym, P, t) == pytest.approx(ref)


def test_topk_accuracy():
    Y = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    S = np.array([[.9, .8, .1, .2], [.1, .9, .8, .2], [.5, .4, .3, .2]])
    assert M.topk_accuracy(Y, S, 1) == pytest.approx(0.0)
    assert M.topk_accuracy(Y, S, 2) == pytest.approx(1 / 3)
    assert M.topk_accuracy(Y, S, 4) == pytest.approx(2 / 3)


def test_score_table_alignment_and_errors():
    Y, P = _random_case(5, n=60)
    truth, pred = _tables(Y, P)
    a = M.score_table(truth, pred, CLASSES)
    b = M.score_table(truth, pred.iloc[::-1], CLASSES)  # row order must not matter
    assert a == b and a["macro_dice"] == pytest.approx(M.macro_dice(Y, P))
    with pytest.raises(PipelineError, match=r"1 missing.*IL_00003.*1 extra.*XX"):
        M.score_table(truth, pred.replace({"lesion_id": {"IL_00003": "XX"}}), CLASSES)
    with pytest.raises(PipelineError, match="duplicate"):
        M.score_table(truth, pd.concat([pred, pred.iloc[:1]]), CLASSES)
    with pytest.raises(PipelineError, match="VASC"):
        M.score_table(truth, pred.drop(columns="VASC"), CLASSES)
    ml = M.score_table(truth, pred, CLASSES, "multilabel")
    assert {"macro_f1", "top1_accuracy", "top3_accuracy"} <= set(ml)
    bi = M.score_table(truth, pred, ["MEL"], "binary")
    assert bi["pauc"] == pytest.approx(M.partial_auc(Y[:, 2], P[:, 2]))
