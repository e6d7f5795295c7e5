"""Stage 04 (lib.stages.stack) on fake members and fake features: the common cv.json, its manifest,
and OOF members / features refused when made on another folds.csv or before manifests existed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core import artifacts as A
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import ID, read_json, write_parquet
from lib.data.dataset import load_dataset
from lib.stages import stack
from tests.stages.conftest import stage_cfg

FAST = ("stack.heads=[lr]", "stack.lr.max_iter=200")


def _fake_features(cfg: dict, exp: str, name: str = "fk") -> Path:
    """`<exp>/features/<name>_{train,test}.parquet` (random 6-d embeddings) + a stage-03 manifest on cfg's prep."""
    _, train, test = load_dataset(cfg)
    folder = A.features_dir(cfg, exp)
    rng = np.random.default_rng(0)
    for split, df in (("train", train), ("test", test)):
        tab = pd.DataFrame(rng.normal(size=(len(df), 6)), columns=[f"emb_{name}_dermoscopic_{j}" for j in range(6)])
        tab.insert(0, ID, df[ID].to_numpy())
        write_parquet(tab, folder / A.features_file(name, split))
    A.write_manifest(dict(cfg, exp=exp), folder, "features", [A.input_record(cfg, A.prep_dir(cfg), "prep")], 3.0,
                     exp=f"{exp}/{A.FEATURES}")
    return folder


def test_stack_cv_json_and_manifest(preps: Path, make_member) -> None:
    make_member(stage_cfg(preps, "x"), "s_m1", seed=1)
    _fake_features(stage_cfg(preps, "x"), "s_feat")
    cfg = stage_cfg(preps, "s_ok", *FAST, "stack.oof_exps=[s_m1]", "stack.features=[fk]", "stack.features_exp=s_feat")
    stack.run(cfg)
    out = preps / "s_ok"
    cv = read_json(out / A.CV)
    assert {"schema_version", "stage", "exp", "task", "n", "macro_dice_tuned_cv", "macro_f1_argmax"} <= set(cv)
    assert cv["stage"] == "stack" and cv["exp"] == "s_ok" and cv["task"] == "multiclass"
    assert "oof_s_m1" in cv["stack"]["blocks"] and "lr" in cv["stack"]["per_head"]
    assert (out / A.TEST).exists() and (out / A.HEADS / A.head_file("oof", "lr")).exists()
    man = read_json(out / A.MANIFEST)
    assert man["stage"] == "stack" and man["folds_sha1"] == A.folds_sha1(cfg)
    roles = {i["role"]: i for i in man["inputs"]}
    assert set(roles) == {"prep", "features", "oof_exp"}
    assert roles["features"]["path"] == "s_feat/features" and roles["features"]["stage"] == "features"
    assert roles["oof_exp"]["fingerprint"] == read_json(preps / "s_m1" / A.MANIFEST)["fingerprint"]
    times = A.stage_times(cfg, man["inputs"])
    assert [(r["number"], r["exp"]) for r in times] == [("01", "p42"), ("02", "s_m1"), ("03", "s_feat/features")]


def test_stack_refuses_oof_member_made_on_other_folds(preps: Path, make_member) -> None:
    make_member(stage_cfg(preps, "x", folds_seed=7), "s_other")
    cfg = stage_cfg(preps, "s_bad", *FAST, "stack.oof_exps=[s_other]")
    with pytest.raises(MissingArtifactError) as e:
        stack.run(cfg)
    msg = str(e.value)
    theirs = A.folds_sha1(stage_cfg(preps, "x", folds_seed=7))
    assert "stack.oof_exps member 's_other'" in msg and theirs[:8] in msg and A.folds_sha1(cfg)[:8] in msg
    assert "rerun 02_train_fold.py" in msg and not (preps / "s_bad" / A.OOF).exists()


def test_stack_refuses_oof_member_without_manifest(preps: Path, make_member) -> None:
    make_member(stage_cfg(preps, "x"), "s_old", manifest=False)
    with pytest.raises(MissingArtifactError, match="'s_old'.*no manifest.json.*rerun 02_train_fold.py"):
        stack.run(stage_cfg(preps, "s_bad2", *FAST, "stack.oof_exps=[s_old]"))


def test_stack_refuses_features_made_on_other_folds_or_without_manifest(preps: Path) -> None:
    folder = _fake_features(stage_cfg(preps, "x", folds_seed=7), "s_feat7")
    cfg = stage_cfg(preps, "s_bad3", *FAST, "stack.features=[fk]", "stack.features_exp=s_feat7")
    with pytest.raises(MissingArtifactError, match="features 's_feat7/features' was made on another folds.csv"):
        stack.run(cfg)
    (folder / A.MANIFEST).unlink()
    with pytest.raises(MissingArtifactError, match="no manifest.json.*rerun 03_extract_features.py"):
        stack.run(cfg)


def test_patient_features_need_grouped_folds_and_test_patients():
    tr = pd.DataFrame({"lesion_id": ["a", "b"], "fold": [0, 1], "y_X": [1.0, 0.0], "group": ["p", "q"]})
    with pytest.raises(PipelineError, match="folds grouped by it"):
        stack.check_patient_columns({"group": None}, tr, None)
    with pytest.raises(PipelineError, match="folds grouped by it"):
        stack.check_patient_columns({"group": "group"}, tr.drop(columns="group"), None)
    te = pd.DataFrame({"lesion_id": ["t"]})
    with pytest.raises(PipelineError, match="test table has no patient column"):
        stack.check_patient_columns({"group": "group"}, tr, te)


def test_each_fold_stacker_reads_its_fold_models_test_features(preps: Path) -> None:
    """03's `<name>_test_by_fold.parquet` (fine-tunes, from_exps) reaches 04: fold k's stacker gets fold
    model k's test features (issue 27 item 3); without the table every fold gets the mean table."""
    cfg0 = stage_cfg(preps, "x")
    folder = _fake_features(cfg0, "s_byfold", name="fb")
    _, train, test = load_dataset(cfg0)
    folds = sorted(int(f) for f in train["fold"].unique())
    mean = pd.read_parquet(folder / A.features_file("fb", "test"))
    cols = [c for c in mean.columns if c != ID]
    parts = []
    for k in folds:  # fold model k's own test features: the mean + a fold-specific offset
        t = mean.copy()
        t[cols] = t[cols].to_numpy() + 100.0 * (k + 1)
        t.insert(1, A.FOLD_MODEL, k)
        parts.append(t)
    cfg = stage_cfg(preps, "s_byfold_stack", *FAST, "stack.features=[fb]", "stack.features_exp=s_byfold")
    assert stack.test_by_fold(cfg, mean, folds) is None  # no per-fold table: the mean for every fold
    write_parquet(pd.concat(parts, ignore_index=True), folder / A.features_file("fb", A.TEST_BY_FOLD))
    by_fold = stack.test_by_fold(cfg, mean, folds)
    assert sorted(by_fold) == folds
    for k in folds:
        assert np.allclose(by_fold[k][cols].to_numpy() - mean[cols].to_numpy(), 100.0 * (k + 1))
        assert list(by_fold[k][ID]) == list(test[ID])
    cv = stack.run(cfg)
    assert cv["stack"]["test_inputs"].startswith("each fold's stacker reads its fold models'")
    bad = pd.concat(parts[:-1], ignore_index=True)  # the last fold model's rows are missing
    write_parquet(bad, folder / A.features_file("fb", A.TEST_BY_FOLD))
    with pytest.raises(PipelineError, match=f"no rows of fold model {folds[-1]}"):
        stack.test_by_fold(cfg, mean, folds)


# ----------------------------------------------------------------------------- fitted stackers (stacker/)
TREES = ("stack.heads=[xgb, lr]", "stack.lr.max_iter=200", "stack.xgb.n_estimators=15", "stack.xgb.device=cpu",
         "stack.xgb.n_jobs=1", "stack.xgb.early_stopping_rounds=5")


def _probs(path: Path) -> np.ndarray:
    df = pd.read_parquet(path)
    return df.drop(columns=ID).to_numpy()


def test_rerun_on_same_training_inputs_predicts_with_the_saved_stackers(preps: Path, make_member, monkeypatch,
                                                                         caplog) -> None:
    """04 rerun (e.g. a new test release) on unchanged training inputs loads stacker/ and predicts the test
    rows only: the fitter is never called, test.parquet is the same; a changed training input refits."""
    make_member(stage_cfg(preps, "x"), "s_re_m", seed=1)
    cfg = stage_cfg(preps, "s_re", *TREES, "stack.oof_exps=[s_re_m]")
    stack.run(cfg)
    out = preps / "s_re"
    doc = read_json(out / A.STACKER_DIR / A.STACKER_JSON)
    assert doc["format_version"] == A.STACKER_FORMAT_VERSION and set(doc["fingerprint"]) == {"train", "config",
                                                                                               "folds_sha1"}
    first, oof_mtime = _probs(out / A.TEST), (out / A.OOF).stat().st_mtime_ns
    (out / A.TEST).unlink()

    def no_fit(*a, **kw):
        raise AssertionError("fit_predict_stack called")
    monkeypatch.setattr(stack, "fit_predict_stack", no_fit)
    caplog.set_level("INFO", logger="lib.stages.stack")
    cv = stack.run(cfg)
    assert "not refitting, predicting the test rows only" in caplog.text and cv["stage"] == "stack"
    assert np.abs(_probs(out / A.TEST) - first).max() < 1e-6
    assert np.array_equal(_probs(out / A.TEST), first)            # the fault battery compares reruns exactly
    assert (out / A.OOF).stat().st_mtime_ns == oof_mtime          # the OOF side is kept
    arrays = out / A.STACKER_DIR / A.fold_name(0) / A.STACKER_ARRAYS
    good = arrays.read_bytes()
    arrays.write_bytes(good[: len(good) // 2])                      # a corrupt stacker is refitted, never used
    with pytest.raises(AssertionError, match="fit_predict_stack called"):
        stack.run(cfg)
    assert "cannot reuse the fitted stackers" in caplog.text
    arrays.write_bytes(good)                                        # restored (the refit removed stacker.json)
    (out / A.STACKER_DIR / A.STACKER_JSON).write_text(json.dumps(doc))
    stack.run(cfg)                                                  # reused again
    make_member(stage_cfg(preps, "x"), "s_re_m", seed=2)           # the member's OOF changed: refit
    with pytest.raises(AssertionError, match="fit_predict_stack called"):
        stack.run(cfg)
    assert not (out / A.STACKER_DIR / A.STACKER_JSON).exists()    # never left paired with other OOF tables


def test_predict_test_from_the_test_side_alone(preps: Path, make_member, tmp_path: Path) -> None:
    """`predict_test` on a fresh output folder holding only test-side files (03's test features, the
    member's test.parquet, their manifests, folds.csv, stacker/) equals 04's test.parquet."""
    import shutil
    make_member(stage_cfg(preps, "x"), "s_pt_m", seed=3)
    _fake_features(stage_cfg(preps, "x"), "s_pt_feat")
    over = (*TREES, "stack.oof_exps=[s_pt_m]", "stack.features=[fk]", "stack.features_exp=s_pt_feat")
    cfg = stage_cfg(preps, "s_pt", *over)
    stack.run(cfg)
    fresh = tmp_path / "bundle"
    for rel in [f"p42/{A.FOLDS}", f"s_pt_m/{A.TEST}", f"s_pt_m/{A.MANIFEST}",
                f"s_pt_feat/{A.FEATURES}/{A.features_file('fk', 'test')}", f"s_pt_feat/{A.FEATURES}/{A.MANIFEST}"]:
        (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(preps / rel, fresh / rel)
    shutil.copytree(preps / "s_pt" / A.STACKER_DIR, fresh / "stacker")
    info, _, test = load_dataset(cfg)
    fcfg = stage_cfg(fresh, "s_pt", *over)
    got = stack.predict_test(fcfg, info, test, fresh / "stacker")
    want = pd.read_parquet(preps / "s_pt" / A.TEST)
    assert list(got[ID]) == list(want[ID])
    assert np.abs(got[info["classes"]].to_numpy() - want[info["classes"]].to_numpy()).max() < 1e-6
    with pytest.raises(PipelineError, match=r"feature columns differ from those of .*stacker.json: missing \['oof_s_pt_m"):
        stack.predict_test(stage_cfg(fresh, "s_pt", *over, "stack.oof_exps=[]"), info, test, fresh / "stacker")


def test_tree_seeds_follow_the_top_level_seed(preps: Path) -> None:
    """The heads' random states come from the top-level seed and stack.seeds (issue 27 item 10)."""
    def run(exp: str, seed: int) -> tuple[dict, np.ndarray]:
        cv = stack.run(stage_cfg(preps, exp, *TREES, "stack.heads=[xgb]", "stack.use_meta=true", f"seed={seed}"))
        return cv, _probs(preps / exp / A.HEADS / A.head_file("oof", "xgb"))
    cv1, a = run("s_seed1", 1)
    cv1b, b = run("s_seed1b", 1)
    cv2, c = run("s_seed2", 2)
    assert cv1["stack"]["seeds"]["head_seeds"] == cv1b["stack"]["seeds"]["head_seeds"] \
        != cv2["stack"]["seeds"]["head_seeds"]
    assert cv1["stack"]["seeds"]["stack_seeds"] == [0] and cv1["stack"]["seeds"]["seed"] == 1
    assert np.array_equal(a, b) and not np.allclose(a, c)
