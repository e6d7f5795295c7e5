"""Stage 04 (lib.stages.stack) on fake members and fake features: the common cv.json, its manifest,
and OOF members / features refused when made on another folds.csv or before manifests existed."""
from __future__ import annotations

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
        stack.add_patient_features({}, {"group": None}, tr, None, tr, None, {})
    with pytest.raises(PipelineError, match="folds grouped by it"):
        stack.add_patient_features({}, {"group": "group"}, tr.drop(columns="group"), None, tr, None, {})
    te = pd.DataFrame({"lesion_id": ["t"]})
    with pytest.raises(PipelineError, match="test table has no patient column"):
        stack.add_patient_features({}, {"group": "group"}, tr, te, tr, te, {})


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
