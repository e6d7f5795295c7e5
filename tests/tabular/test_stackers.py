"""lib.tabular.stackers: fold mechanics (planted leaks, per-row provenance, PCA inside folds), guards,
rare classes, output shapes. Tiny synthetic data, CPU, small boosters."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from lib.config.schema import STACK_DEFAULTS
from lib.core.errors import ConfigError, PipelineError
from lib.tabular import stackers

# n_jobs=1: OpenMP threads slow down ~10x when the 2 cores are shared with other test runs.
FAST = {"pca_components": 4,
        "xgb": {"n_estimators": 30, "early_stopping_rounds": 10, "device": "cpu", "n_jobs": 1},
        "lgbm": {"n_estimators": 30, "early_stopping_rounds": 10, "n_jobs": 1}}


def cfg(**kw) -> dict:
    return stackers.stack_settings({**FAST, **kw})


def make_data(n: int = 300, n_classes: int = 4, k: int = 5, seed: int = 0, signal: float = 0.5):
    """Train table (weak signal in the emb block, noise in monet), test table, blocks, classes."""
    rng = np.random.default_rng(seed)
    classes = [f"C{c}" for c in range(n_classes)]
    lab = rng.integers(0, n_classes, n)
    df = pd.DataFrame({"lesion_id": [f"ISIC_{i:05d}" for i in range(n)], "fold": rng.permutation(np.arange(n) % k)})
    for c, name in enumerate(classes):
        df[f"y_{name}"] = (lab == c).astype(float)
    emb = rng.normal(size=(n, 12)) + signal * (lab[:, None] == np.arange(12)[None] % n_classes)
    for j in range(12):
        df[f"emb_a_{j}"] = emb[:, j]
    for j in range(3):
        df[f"monet_{j}"] = rng.normal(size=n)
    blocks = {"emb_a": [f"emb_a_{j}" for j in range(12)], "monet": [f"monet_{j}" for j in range(3)]}
    feats = [c for cols in blocks.values() for c in cols]
    test = pd.DataFrame({"lesion_id": [f"TEST_{i:04d}" for i in range(40)]})
    test[feats] = rng.normal(size=(40, len(feats)))
    return df, test, blocks, classes, lab


def probs(res_table: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return res_table[classes].to_numpy()


# ----------------------------------------------------------------------------- 1. planted leak
@pytest.mark.parametrize("everywhere", [False, True])
def test_planted_leak_only_helps_when_present_out_of_fold(everywhere):
    df, test, blocks, classes, lab = make_data(signal=0.0)
    rng = np.random.default_rng(1)
    f0 = df["fold"].to_numpy() == 0
    leak = rng.normal(size=len(df)) * 3
    leak[f0 | everywhere] = lab[f0 | everywhere]
    df["oof_leak"] = leak
    test["oof_leak"] = 0.0
    blocks = {**blocks, "oof": ["oof_leak"]}
    res = stackers.fit_predict_stack(df, test, blocks, classes, cfg())
    acc = probs(res.oof, classes).argmax(1) == lab
    if everywhere:   # power: a real signal is found out of fold
        assert acc.mean() > 0.9
    else:            # fold-0 rows are predicted only by models that never saw fold 0 (chance = 0.25)
        assert acc[f0].mean() < 0.5
        assert acc[~f0].mean() < 0.5


# ----------------------------------------------------------------------------- 2. provenance
def _ids(x) -> set[str]:
    return set(map(str, x.index))


def _spy(base, records: list):
    """Subclass of `base` recording fit / early-stopping / predicted lesion_ids per model instance."""

    class Spy(base):
        def fit(self, X, y, *a, **kw):
            ev = [e[0] for e in kw.get("eval_set") or []] + list(kw.get("eval_X") or ())
            self._rec = {"kind": base.__name__, "fit": _ids(X), "eval": set().union(*map(_ids, ev)),
                         "pred": set()}
            records.append(self._rec)
            return super().fit(X, y, *a, **kw)

        def predict_proba(self, X, *a, **kw):
            self._rec["pred"] |= _ids(X)
            return super().predict_proba(X, *a, **kw)

    Spy.__name__ = base.__name__
    return Spy


def test_every_row_predicted_by_models_that_never_saw_it(monkeypatch):
    df, test, blocks, classes, _ = make_data()
    records: list[dict] = []
    for name in ("XGBClassifier", "LGBMClassifier", "LogisticRegression"):
        monkeypatch.setattr(stackers, name, _spy(getattr(stackers, name), records))
    res = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["xgb", "lgbm", "lr"]))
    fold_of = dict(zip(df["lesion_id"], df["fold"]))
    train_ids, test_ids = set(fold_of), set(test["lesion_id"])
    kinds = {r["kind"] for r in records}
    assert kinds == {"XGBClassifier", "LGBMClassifier", "LogisticRegression"}
    assert len(records) == 5 * (2 * len(classes) + 1)
    covered = {k: set() for k in kinds}
    for r in records:
        seen = r["fit"] | r["eval"]
        assert not (r["pred"] & seen), "a model predicted a row it was trained / early-stopped on"
        assert not (r["fit"] & r["eval"])
        if r["kind"] != "LogisticRegression":
            assert r["eval"], "tree heads early-stop on an inner split"
        pred_train = r["pred"] & train_ids
        folds = {fold_of[i] for i in pred_train}
        assert len(folds) == 1
        k = folds.pop()
        assert pred_train == {i for i, f in fold_of.items() if f == k}       # the whole validation fold
        assert seen == {i for i, f in fold_of.items() if f != k}              # exactly the training fold
        assert r["pred"] <= train_ids   # test rows go through the fitted parts (stacker_apply.predict_fold)
        covered[r["kind"]] |= pred_train
    assert all(c == train_ids for c in covered.values())
    assert list(res.oof["lesion_id"]) == list(df["lesion_id"])


# ----------------------------------------------------------------------------- 3. PCA inside fold
def test_pca_fitted_on_training_fold_only(monkeypatch):
    df, test, blocks, classes, _ = make_data()
    blocks = {**blocks, "emb_b": blocks["monet"]}
    del blocks["monet"]
    fits: list[set[str]] = []

    class SpyPCA(stackers.PCA):
        def fit(self, X, y=None):
            fits.append(_ids(X))
            return super().fit(X, y)

        def fit_transform(self, X, y=None):
            fits.append(_ids(X))
            return super().fit_transform(X, y)

    monkeypatch.setattr(stackers, "PCA", SpyPCA)
    stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]))
    assert len(fits) == 5 * 2  # two PCA blocks ("auto": names starting with emb) x five folds
    for i, ids in enumerate(fits):
        k = i // 2
        assert ids == set(df.loc[df["fold"] != k, "lesion_id"])


# ----------------------------------------------------------------------------- 4. guards
def _dup_train(df, test, blocks):
    df.loc[5, "lesion_id"] = df.loc[6, "lesion_id"]


def _dup_test(df, test, blocks):
    test.loc[3, "lesion_id"] = test.loc[0, "lesion_id"]


def _label_feature(df, test, blocks):
    df["y_X"] = 0.0
    test["y_X"] = 0.0
    blocks["monet"].append("y_X")


def _fold_feature(df, test, blocks):
    test["fold"] = -1
    blocks["monet"].append("fold")


def _missing_fold(df, test, blocks):
    df.loc[0, "fold"] = -1


def _missing_test_col(df, test, blocks):
    del test["monet_1"]


@pytest.mark.parametrize("corrupt", [_dup_train, _dup_test, _label_feature, _fold_feature, _missing_fold,
                                     _missing_test_col])
def test_guards_raise_pipeline_error(corrupt):
    df, test, blocks, classes, _ = make_data(n=60)
    corrupt(df, test, blocks)
    with pytest.raises(PipelineError):
        stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]))


def test_settings_are_lib_configs_merge():
    with pytest.raises(ConfigError, match="unknown key 'stack.xgb.n_estimator'.*did you mean 'n_estimators'"):
        stackers.stack_settings({"xgb": {"n_estimator": 5}})
    with pytest.raises(ConfigError, match="unknown key 'stack.nope'"):
        stackers.stack_settings({"nope": 1})
    got = stackers.stack_settings({"oof_exps": ["m"], "xgb": {"max_depth": 2}})  # a whole stack section is fine
    assert {k: got[k] for k in STACK_DEFAULTS} == {**STACK_DEFAULTS, "xgb": {**STACK_DEFAULTS["xgb"], "max_depth": 2}}
    assert stackers.stack_settings(None) == STACK_DEFAULTS


def test_device_is_runtimes_choice(monkeypatch):
    df, test, blocks, classes, _ = make_data(n=60)
    seen = []
    monkeypatch.setattr(stackers, "resolve_device", lambda dev, key: seen.append((dev, key)) or "cpu")
    stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["xgb"], xgb={**FAST["xgb"], "n_estimators": 5}))
    assert seen == [("cpu", "stack.xgb.device")]


# ----------------------------------------------------------------------------- 5. rare classes
@pytest.mark.parametrize("renorm", [True, False])
def test_rare_class_absent_from_a_training_fold(renorm, caplog):
    df, test, blocks, classes, _ = make_data()
    rare, scarce = classes[3], classes[2]
    ycols = [f"y_{c}" for c in classes]
    df[f"y_{rare}"] = 0.0
    df[f"y_{scarce}"] = 0.0
    df.loc[df[ycols].sum(axis=1) == 0, f"y_{classes[0]}"] = 1.0
    f = df["fold"]
    rows_rare = df.index[f == 0][:2]                        # only in fold 0 -> fold-0 model has 0 positives
    rows_scarce = [*df.index[f == 1][:2], df.index[f == 2][0]]  # fold-1 model has 1 positive (no early stop)
    for rows, c in ((rows_rare, rare), (rows_scarce, scarce)):
        df.loc[rows, ycols] = 0.0
        df.loc[rows, f"y_{c}"] = 1.0
    with caplog.at_level(logging.WARNING, logger="lib.tabular.stackers"):
        res = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["xgb", "lgbm", "lr"], renorm=renorm))
    assert "constant prior" in caplog.text and "no early stopping" in caplog.text
    for table in [res.oof, res.test, *res.per_head_oof.values(), *res.per_head_test.values()]:
        p = probs(table, classes)
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        if renorm:
            np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)


# ----------------------------------------------------------------------------- 6. outputs
def test_outputs_ids_sums_importance_and_determinism():
    df, test, blocks, classes, lab = make_data(n=200, signal=1.0)
    c = cfg(heads=["xgb", "lr"], seeds=[0, 1], head_weights={"xgb": 2.0, "lr": 1.0})
    res = stackers.fit_predict_stack(df, test, blocks, classes, c)
    assert set(res.oof["lesion_id"]) == set(df["lesion_id"]) and len(res.oof) == len(df)
    assert list(res.oof.columns) == ["lesion_id", *classes]
    assert list(res.test["lesion_id"]) == list(test["lesion_id"])
    np.testing.assert_allclose(probs(res.test, classes).sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs(res.oof, classes).sum(1), 1.0, atol=1e-9)
    assert set(res.per_head_oof) == set(res.per_head_test) == {"xgb", "lr"}
    blend = (2 * probs(res.per_head_oof["xgb"], classes) + probs(res.per_head_oof["lr"], classes)) / 3
    np.testing.assert_allclose(probs(res.oof, classes), blend, atol=1e-9)
    assert (probs(res.oof, classes).argmax(1) == lab).mean() > 0.5  # real signal is learnt
    assert list(res.importance.columns) == ["feature", "class", "head", "gain"]
    assert set(res.importance["feature"]) == {f"emb_a_pc{i}" for i in range(4)} | set(blocks["monet"])
    assert (res.fold_of == df.set_index("lesion_id")["fold"]).all()
    again = stackers.fit_predict_stack(df, test, blocks, classes, c)
    pd.testing.assert_frame_equal(res.oof, again.oof)


def test_inner_split_keeps_groups_together_and_stratifies():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(40)], 3)
    y = np.zeros(120)
    y[:15] = 1  # positives in the first 5 patients
    fit, es = stackers.inner_split(y, 0.2, rng, groups)
    assert len(np.intersect1d(fit, es)) == 0 and len(fit) + len(es) == 120
    assert not set(groups[fit]) & set(groups[es])  # no patient on both sides
    assert y[es].sum() > 0 and y[fit].sum() > 0


@pytest.mark.parametrize("renorm", [True, False])
def test_fold_f1_log_is_the_official_dice(renorm, caplog):
    """The per-fold macro F1 the stacker logs is lib.core.scoring's Dice (a class absent from the truth
    and never predicted scores 1, as the ISIC scorer; sklearn's zero_division=0 scored it 0)."""
    from lib.core.scoring import argmax_onehot, macro_dice
    df, test, blocks, classes, _ = make_data()
    ycols = [f"y_{c}" for c in classes]
    df = df[df[f"y_{classes[3]}"] < 0.5].reset_index(drop=True)  # class 3 in no row: never true, never predicted
    with caplog.at_level(logging.INFO, logger="lib.tabular.stackers"):
        res = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"], renorm=renorm))
    logged = {int(m.split("stack fold ")[1].split(":")[0]): float(m.rsplit("macro F1 ", 1)[1])
              for m in caplog.messages if m.startswith("stack fold ")}
    p = probs(res.oof, classes)
    for k, f1 in logged.items():
        m = (df["fold"] == k).to_numpy()
        dec = argmax_onehot(p[m]) if renorm else p[m]
        assert f1 == pytest.approx(macro_dice(df.loc[m, ycols].to_numpy(), dec), abs=5e-5)
    assert sorted(logged) == [0, 1, 2, 3, 4]
    assert (p[:, 3] <= 0.5).all() and (argmax_onehot(p)[:, 3] == 0).all()


def test_test_by_fold_feeds_fold_k_its_own_test_table(monkeypatch):
    """Each fold's stacker predicts the test table made by that fold's upstream models (issue 27 item 3):
    identical tables reproduce the plain path exactly; fold k's table reaches fold k's fit and nothing else."""
    df, test, blocks, classes, _ = make_data()
    plain = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]))
    same = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]),
                                      test_by_fold={k: test.copy() for k in range(5)})
    pd.testing.assert_frame_equal(plain.test, same.test)
    feats = [c for cols in blocks.values() for c in cols]
    by_fold = {}
    for k in range(5):
        t = test.copy()
        t[feats] = t[feats].to_numpy() + 10.0 * k  # a fold-specific mark
        by_fold[k] = t
    seen = []
    real = stackers.predict_fold   # the test rows' path (lib.tabular.stacker_apply)

    def spy(fold, fe, bl, x, *a, **kw):
        seen.append(float(np.nanmean(x - test[feats].to_numpy())))
        return real(fold, fe, bl, x, *a, **kw)

    monkeypatch.setattr(stackers, "predict_fold", spy)
    moved = stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]), test_by_fold=by_fold)
    assert seen == pytest.approx([0.0, 10.0, 20.0, 30.0, 40.0])
    pd.testing.assert_frame_equal(moved.oof, plain.oof)  # OOF rows never see the test tables
    assert not np.allclose(moved.test[classes].to_numpy(), plain.test[classes].to_numpy())
    shuffled = {k: t.iloc[::-1].reset_index(drop=True) for k, t in by_fold.items()}
    with pytest.raises(PipelineError, match="fold 0's test features hold other lesions"):
        stackers.fit_predict_stack(df, test, blocks, classes, cfg(heads=["lr"]), test_by_fold=shuffled)
