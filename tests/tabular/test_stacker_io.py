"""lib.tabular.stacker_io: fitted stackers saved (safetensors, XGBoost / LightGBM formats, JSON; no pickle),
loaded and applied to the test rows reproduce fit_predict_stack's test predictions; a planted pickle is
never read; another format version is refused."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core import artifacts as A
from lib.core.errors import PipelineError
from lib.tabular import stacker_apply, stacker_io, stackers

FAST = {"pca_components": 3, "seeds": [3, 11],
        "xgb": {"n_estimators": 20, "early_stopping_rounds": 5, "device": "cpu", "n_jobs": 1},
        "lgbm": {"n_estimators": 20, "early_stopping_rounds": 5, "n_jobs": 1}}


def _problem(seed: int = 0):
    """4 classes over 3 folds, C3's rows all in fold 0 (fold 0's stacker has no C3 positive: the constant
    prior path), NaNs in both blocks, a PCA block (emb_a) and a plain one (meta)."""
    rng = np.random.default_rng(seed)
    n, classes = 150, ["C0", "C1", "C2", "C3"]
    lab = rng.integers(0, 3, n)
    fold = np.arange(n) % 3
    lab[np.flatnonzero(fold == 0)[:4]] = 3            # C3 only in fold 0: fold 1 and 2 still see it, fold 0 does not
    df = pd.DataFrame({"lesion_id": [f"L{i:04d}" for i in range(n)], "fold": fold})
    for c, name in enumerate(classes):
        df[f"y_{name}"] = (lab == c).astype(float)
    emb = rng.normal(size=(n, 8)) + 0.8 * (lab[:, None] == np.arange(8)[None] % 4)
    meta = rng.normal(size=(n, 3)) + 0.5 * lab[:, None]
    emb[rng.random(emb.shape) < 0.05] = np.nan
    meta[rng.random(meta.shape) < 0.1] = np.nan
    blocks = {"emb_a": [f"emb_a_{j}" for j in range(8)], "meta": [f"meta_{j}" for j in range(3)]}
    df[blocks["emb_a"]] = emb
    df[blocks["meta"]] = meta
    test = pd.DataFrame({"lesion_id": [f"T{i:03d}" for i in range(30)]})
    feats = blocks["emb_a"] + blocks["meta"]
    x = rng.normal(size=(30, len(feats)))
    x[rng.random(x.shape) < 0.1] = np.nan
    test[feats] = x
    return df, test, blocks, classes


@pytest.mark.parametrize("renorm", [True, False])
def test_saved_stackers_reproduce_the_test_predictions(tmp_path: Path, renorm: bool, monkeypatch, caplog) -> None:
    df, test, blocks, classes = _problem()
    cfg = {**FAST, "heads": ["xgb", "lgbm", "lr"], "head_weights": {"xgb": 1.0, "lgbm": 2.0, "lr": 1.0},
           "renorm": renorm}
    res = stackers.fit_predict_stack(df, test, blocks, classes, cfg)
    assert "constant prior" in caplog.text                          # the prior path is in the fitted parts
    fit = res.fitted
    assert any(isinstance(m, float) for fold in fit["folds"] for row in fold["heads"]["xgb"] for m in row)
    assert fit["seeds"] == [3, 11] and fit["pca_blocks"] == ["emb_a"] and fit["n_folds"] == 3
    by_fold = {k: test for k in range(3)}
    mem, mem_heads = stacker_apply.predict_fitted(fit, by_fold)       # in memory
    assert np.abs(mem[classes].to_numpy() - res.test[classes].to_numpy()).max() < 1e-6

    folder = tmp_path / A.STACKER_DIR
    stacker_io.save_fitted(fit, folder, extra={"fingerprint": {"train": "abc"}})
    (folder / "evil.pkl").write_bytes(b"not a pickle")          # planted: must never be read
    (folder / A.fold_name(0) / "evil.pkl").write_bytes(b"not a pickle")
    read: list[str] = []
    for name in ("read_bytes", "read_text"):
        orig = getattr(Path, name)
        monkeypatch.setattr(Path, name, lambda self, *a, _o=orig, **kw: (read.append(self.name), _o(self, *a, **kw))[1])
    monkeypatch.setattr(pickle, "load", lambda *a, **kw: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **kw: pytest.fail("pickle.loads called"))
    loaded = stacker_io.load_fitted(folder)
    monkeypatch.undo()
    assert "evil.pkl" not in read and read[0] == A.STACKER_JSON
    doc = json.loads((folder / A.STACKER_JSON).read_text())
    named = {A.STACKER_JSON} | {m["file"] for f in doc["folds"] for h in ("xgb", "lgbm") for row in f["heads"][h]
                                for m in row if "file" in m} | {f["arrays"] for f in doc["folds"]}
    assert set(read) <= named
    assert loaded["fingerprint"] == {"train": "abc"} and not list(folder.rglob("*.tmp"))
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".joblib") and p.name != "evil.pkl"]
    disk, disk_heads = stacker_apply.predict_fitted(loaded, by_fold)
    assert list(disk["lesion_id"]) == list(res.test["lesion_id"])
    assert np.abs(disk[classes].to_numpy() - res.test[classes].to_numpy()).max() < 1e-6
    pd.testing.assert_frame_equal(disk, res.test, check_exact=True)   # a rerun of 04 reusing them: the same bits
    for h in cfg["heads"]:
        assert np.abs(disk_heads[h][classes].to_numpy() - res.per_head_test[h][classes].to_numpy()).max() < 1e-6


def test_per_fold_test_tables_and_lr_only(tmp_path: Path) -> None:
    df, test, blocks, classes = _problem(1)
    feats = [c for b in blocks.values() for c in b]
    by_fold = {k: test.assign(**{c: test[c] + k for c in feats}) for k in range(3)}
    res = stackers.fit_predict_stack(df, test, blocks, classes, {**FAST, "heads": ["lr"]}, test_by_fold=by_fold)
    stacker_io.save_fitted(res.fitted, tmp_path)
    out, _ = stacker_apply.predict_fitted(stacker_io.load_fitted(tmp_path), by_fold)
    assert np.abs(out[classes].to_numpy() - res.test[classes].to_numpy()).max() < 1e-6
    with pytest.raises(PipelineError, match="missing feature columns"):
        stacker_apply.predict_fitted(res.fitted, {k: t.drop(columns=feats[-1]) for k, t in by_fold.items()})


def test_other_version_and_foreign_file_names_are_refused(tmp_path: Path) -> None:
    df, test, blocks, classes = _problem(2)
    res = stackers.fit_predict_stack(df, None, blocks, classes, {**FAST, "heads": ["xgb"], "seeds": [0]})
    path = stacker_io.save_fitted(res.fitted, tmp_path)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(PipelineError, match=f"{A.STACKER_JSON}.*format version 99"):
        stacker_io.load_fitted(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": 1}))
    for bad in ("../evil.pkl", "evil.pkl"):
        doc["folds"][0]["arrays"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(PipelineError, match="not a fitted-stacker file"):
            stacker_io.load_fitted(tmp_path)
    path.unlink()
    with pytest.raises(PipelineError, match="run 04_stack.py"):
        stacker_io.load_fitted(tmp_path)
