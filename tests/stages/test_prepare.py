"""Stage 01 (lib.stages.prepare.run / 01_preprocess.py) end to end on the shipped sample and on broken copies:
outputs, folds written once, encoders fitted on train only, cache reuse, every bad input -> one clear
PipelineError and nothing written, the script's exit code."""
from __future__ import annotations

import io
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.config.load import load_config
from lib.core.errors import PipelineError
from lib.core.io import read_json
from lib.data import dataset
from lib.stages import prepare
from tests.helpers import (
    MILK_CLASSES,
    N_TEST,
    N_TRAIN,
    PREP_TABLES,
    ROOT,
    SAMPLE,
    TEST_META,
    TRAIN_GT,
    TRAIN_META,
    copy_sample,
    generic_cfg,
    image_of,
    make_generic,
    make_ham,
    milk_cfg,
    prep_of,
    read_raw,
    write_raw,
    write_truncated_jpeg,
)

pytestmark = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return copy_sample(tmp_path_factory.mktemp("pristine") / "milk10k_sample")


@pytest.fixture
def milk(tmp_path, pristine) -> Path:
    """A private, editable copy of the sample (named like it, so the prep folder is prep/milk10k_sample)."""
    dst = tmp_path / "data" / "milk10k_sample"
    shutil.copytree(pristine, dst)
    return dst


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- end to end
def test_end_to_end_sample(tmp_path):
    cfg = milk_cfg(SAMPLE, tmp_path / "out")
    info = prepare.run(cfg)
    prep = prep_of(cfg)
    assert prep == tmp_path / "out" / "prep" / "milk10k_sample"
    assert info == read_json(prep / "dataset.json")
    assert info["n_train"] == N_TRAIN and info["n_test"] == N_TEST
    assert info["classes"] == MILK_CLASSES and len(info["classes"]) == 11
    assert info["modalities"] == ["dermoscopic", "clinical"] and info["task"] == "multiclass"
    assert info["cache_tag"] == "short_side64_q90" and info["group"] is None

    tr = pd.read_parquet(prep / "train.parquet")
    te = pd.read_parquet(prep / "test.parquet")
    assert len(tr) == N_TRAIN and len(te) == N_TEST
    assert tr["lesion_id"].is_unique and not set(tr["lesion_id"]) & set(te["lesion_id"])
    y = tr[[f"y_{c}" for c in MILK_CLASSES]].to_numpy()
    assert (y.sum(1) == 1).all() and (y.sum(0) > 0).all()
    assert (tr["label"].to_numpy() == y.argmax(1)).all()
    assert (te["label"] == -1).all() and not [c for c in te.columns if c.startswith("y_")]
    assert info["meta_columns"] == [c for c in tr.columns if c.startswith("meta_")]
    assert [c for c in te.columns if c.startswith("meta_")] == info["meta_columns"]
    assert len(info["monet_columns"]) == 14 and not tr[info["monet_columns"]].isna().any().any()

    # every cached image exists, is a JPEG of the configured size, and lives in the setting's folder
    for df in (tr, te):
        for m in ("dermoscopic", "clinical"):
            for rel, lid in zip(df[f"path_{m}"], df["lesion_id"]):
                assert rel == f"images/short_side64_q90/{lid}__{m}.jpg"
                p = prep_of(cfg) / rel
                assert p.is_file()
    some = prep_of(cfg) / tr["path_dermoscopic"].iloc[0]
    with Image.open(some) as im:
        assert im.format == "JPEG" and min(im.size) == 64
    n_images = len(list((prep / "images" / "short_side64_q90").glob("*.jpg")))
    assert n_images == 2 * (N_TRAIN + N_TEST)

    fo = pd.read_csv(prep / "folds.csv", dtype={"lesion_id": str})
    assert list(fo.columns) == ["lesion_id", "fold"]
    assert sorted(fo["fold"].unique()) == [0, 1, 2, 3, 4]
    assert set(fo["lesion_id"]) == set(tr["lesion_id"]) and fo["lesion_id"].is_unique
    summary = pd.read_csv(prep / "fold_summary.csv")
    assert (summary[MILK_CLASSES] >= 1).all().all()          # every class (>= 5 lesions) in every fold
    assert load_config(prep / "config.yaml") == cfg
    assert set(read_json(prep / "meta_encoders.json")) == {"num", "cat"}
    assert not [p for p in prep.rglob(".*")]                  # no temp files left behind

    info2, tr2, te2 = dataset.load_dataset(cfg)
    assert info2 == info and (tr2["fold"] >= 0).all() and (te2["fold"] == -1).all()
    assert tr2.merge(fo, on="lesion_id")[["fold_x", "fold_y"]].eval("fold_x == fold_y").all()


def test_rerun_reuses_cache_and_folds(tmp_path):
    cfg = milk_cfg(SAMPLE, tmp_path / "out")
    prepare.run(cfg)
    prep = prep_of(cfg)
    images = prep / "images" / "short_side64_q90"
    before, folds = mtimes(images), (prep / "folds.csv").read_bytes()
    tr = pd.read_parquet(prep / "train.parquet")
    prepare.run(cfg)
    assert mtimes(images) == before                        # up-to-date cached images skipped
    assert (prep / "folds.csv").read_bytes() == folds
    pd.testing.assert_frame_equal(pd.read_parquet(prep / "train.parquet"), tr)


def test_changed_cache_settings_use_another_folder(tmp_path):
    cfg = milk_cfg(SAMPLE, tmp_path / "out")
    prepare.run(cfg)
    prep = prep_of(cfg)
    old = mtimes(prep / "images" / "short_side64_q90")
    cfg2 = milk_cfg(SAMPLE, tmp_path / "out", "cache.mode=pad", "cache.size=48", "cache.clahe=true",
                    "cache.color_constancy=true", "cache.quality=80")
    info = prepare.run(cfg2)
    assert info["cache_tag"] == "pad48_q80_clahe_sog"
    assert mtimes(prep / "images" / "short_side64_q90") == old     # the old cache is left alone
    tr = pd.read_parquet(prep / "train.parquet")
    assert tr["path_clinical"].str.startswith("images/pad48_q80_clahe_sog/").all()
    for rel in tr["path_dermoscopic"].iloc[:5]:
        with Image.open(prep / rel) as im:
            assert im.size == (48, 48)                               # pad mode: square


def test_cache_mode_none_points_at_sources(tmp_path):
    cfg = milk_cfg(SAMPLE, tmp_path / "out", "cache.mode=none")
    info = prepare.run(cfg)
    prep = prep_of(cfg)
    assert info["cache_tag"] == "original" and not (prep / "images").exists()
    tr = pd.read_parquet(prep / "train.parquet")
    assert all(Path(p).is_file() and Path(p).is_relative_to(SAMPLE) for p in tr["path_dermoscopic"])


def test_cache_mode_none_with_relative_data_root(tmp_path, monkeypatch):
    """A relative data.root (as in the shipped configs) must still resolve from later stages."""
    monkeypatch.chdir(SAMPLE.parent)
    cfg = milk_cfg(Path(SAMPLE.name), tmp_path / "out", "cache.mode=none")
    prepare.run(cfg)
    tr = pd.read_parquet(prep_of(cfg) / "train.parquet")
    assert all((prep_of(cfg) / p).is_file() for p in tr["path_dermoscopic"])


# --------------------------------------------------------------------------- folds written once
def test_folds_written_once(tmp_path):
    out = tmp_path / "out"
    prepare.run(milk_cfg(SAMPLE, out))
    prep = out / "prep" / "milk10k_sample"
    folds = (prep / "folds.csv").read_bytes()
    before = mtimes(prep)
    for ov in ("folds.seed=7", "folds.n_splits=3"):
        with pytest.raises(PipelineError, match=r"folds\.csv exists with a different assignment.*--force-folds"):
            prepare.run(milk_cfg(SAMPLE, out, ov))
        assert mtimes(prep) == before                       # nothing rewritten, not even dataset.json
    info = prepare.run(milk_cfg(SAMPLE, out, "folds.seed=7"), force_folds=True)
    new = pd.read_csv(prep / "folds.csv", dtype={"lesion_id": str})
    old = pd.read_csv(io.BytesIO(folds), dtype={"lesion_id": str})
    assert (new.set_index("lesion_id")["fold"] != old.set_index("lesion_id")["fold"]).any()
    assert info["folds"]["seed"] == 7 and sorted(new["fold"].unique()) == [0, 1, 2, 3, 4]
    prepare.run(milk_cfg(SAMPLE, out, "folds.seed=7"))      # the same settings rerun fine


def test_folds_csv_other_lesions_is_an_error(tmp_path, milk):
    cfg = milk_cfg(milk, tmp_path / "out", "cache.mode=none")
    prepare.run(cfg)
    gt, meta = read_raw(milk / TRAIN_GT), read_raw(milk / TRAIN_META)
    drop = gt["lesion_id"].iloc[0]
    write_raw(gt.iloc[1:], milk / TRAIN_GT)
    write_raw(meta[meta["lesion_id"] != drop], milk / TRAIN_META)
    with pytest.raises(PipelineError, match="folds.csv exists with a different assignment"):
        prepare.run(cfg)


def test_load_dataset_guards(tmp_path):
    cfg = milk_cfg(SAMPLE, tmp_path / "out", "cache.mode=none")
    with pytest.raises(PipelineError, match=r"dataset\.json not found: run 01_preprocess\.py"):
        dataset.load_dataset(cfg)
    prepare.run(cfg)
    fo = pd.read_csv(prep_of(cfg) / "folds.csv", dtype={"lesion_id": str})
    fo.iloc[1:].to_csv(prep_of(cfg) / "folds.csv", index=False)
    with pytest.raises(PipelineError, match="does not cover exactly the train lesions"):
        dataset.load_dataset(cfg)


# --------------------------------------------------------------------------- metadata encoders
def test_encoders_fitted_on_train_only(tmp_path, milk, caplog):
    meta = read_raw(milk / TEST_META)
    ids = meta["lesion_id"].drop_duplicates().tolist()
    meta["age_approx"] = "85.0"                                     # far older than train
    meta["sex"] = "female"
    meta.loc[meta["lesion_id"] == ids[0], "sex"] = "intersex"       # unseen level
    meta.loc[meta["lesion_id"] == ids[2], "site"] = "palms_soles"   # unseen level
    meta.loc[meta["lesion_id"] == ids[4], "site"] = np.nan          # missing
    write_raw(meta, milk / TEST_META)
    cfg = milk_cfg(milk, tmp_path / "out", "cache.mode=none")
    with caplog.at_level(logging.WARNING, logger="lib.data.formats"):
        prepare.run(cfg)
    assert "test: 1 of 32 rows lack 'site'" in caplog.text

    train = read_raw(milk / TRAIN_META)
    derm = train[train["image_type"] == "dermoscopic"]
    age = derm["age_approx"].astype(float)
    enc = read_json(prep_of(cfg) / "meta_encoders.json")
    assert enc["num"]["age_approx"]["mean"] == pytest.approx(age.mean())
    assert enc["num"]["age_approx"]["std"] == pytest.approx(age.std())
    for c in ("sex", "site", "skin_tone_class"):
        assert enc["cat"][c] == sorted(derm[c].dropna().unique())
    assert "intersex" not in enc["cat"]["sex"] and "palms_soles" not in enc["cat"]["site"]

    tr = pd.read_parquet(prep_of(cfg) / "train.parquet")
    te = pd.read_parquet(prep_of(cfg) / "test.parquet").set_index("lesion_id")
    assert abs(tr["meta_age_approx"].mean()) < 1e-5 and tr["meta_age_approx"].std() == pytest.approx(1, abs=1e-4)
    expected = (85.0 - age.mean()) / age.std()
    assert te["meta_age_approx"].to_numpy() == pytest.approx(np.full(32, expected), rel=1e-5)
    assert te.loc[ids[0], "meta_sex_unknown"] == 1 and te.loc[ids[0], "meta_sex_female"] == 0
    assert te.loc[ids[1], "meta_sex_unknown"] == 0 and te.loc[ids[1], "meta_sex_female"] == 1
    assert te.loc[ids[2], "meta_site_unknown"] == 1 and te.loc[ids[4], "meta_site_unknown"] == 1
    assert te.loc[ids[3], "meta_site_unknown"] == 0
    site_cols = [c for c in te.columns if c.startswith("meta_site_")]
    assert (te[site_cols].sum(axis=1) == 1).all()
    assert list(te.filter(like="meta_").columns) == list(tr.filter(like="meta_").columns)


def test_missing_metadata_values_warn_not_fail(tmp_path, milk, caplog):
    meta = read_raw(milk / TRAIN_META)
    lid = meta["lesion_id"].iloc[10]
    meta.loc[meta["lesion_id"] == lid, ["age_approx", "site", "sex"]] = np.nan
    write_raw(meta, milk / TRAIN_META)
    cfg = milk_cfg(milk, tmp_path / "out", "cache.mode=none")
    with caplog.at_level(logging.WARNING):
        info = prepare.run(cfg)
    assert info["n_train"] == N_TRAIN
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train: 1 of 98 rows lack 'age_approx'" in w for w in warn)
    assert any("lack 'site'" in w for w in warn) and any("lack 'sex'" in w for w in warn)
    tr = pd.read_parquet(prep_of(cfg) / "train.parquet").set_index("lesion_id")
    assert tr.loc[lid, "meta_age_approx_missing"] == 1 and tr.loc[lid, "meta_age_approx"] == 0
    assert tr["meta_age_approx_missing"].sum() == 1
    assert tr.loc[lid, "meta_sex_unknown"] == 1 and tr.loc[lid, "meta_site_unknown"] == 1


# --------------------------------------------------------------------------- other formats
def test_ham_grouped_folds(tmp_path):
    root = make_ham(tmp_path / "ham10000")
    cfg = load_config(None, ["data.format=ham10000", f"data.root={root}", f"paths.output={tmp_path / 'out'}",
                             "cache.workers=1", "cache.size=32", "folds.n_splits=3"])
    info = prepare.run(cfg)
    assert info["group"] == "group" and info["n_train"] == 17 and info["n_test"] == 0
    tr = pd.read_parquet(prep_of(cfg) / "train.parquet")
    fo = pd.read_csv(prep_of(cfg) / "folds.csv", dtype={"lesion_id": str})
    m = tr.merge(fo, on="lesion_id")
    assert (m.groupby("group")["fold"].nunique() == 1).all()
    assert m.groupby("group").size().max() == 3 and set(fo["fold"]) == {0, 1, 2}
    assert "meta_sex_unknown" in tr and tr["meta_sex_unknown"].sum() == 2


def test_generic_multilabel_with_test(tmp_path):
    root = make_generic(tmp_path / "gen")
    cfg = generic_cfg(root, tmp_path / "out", "data.generic.label_cols=[ulcer, pigment, bleeding]",
                      "data.classes=[ulcer, pigment, bleeding]", "data.generic.group_col=patient",
                      "folds.n_splits=3")
    info = prepare.run(cfg)
    assert info["task"] == "multilabel" and info["n_test"] == 4 and info["group"] == "group"
    tr = pd.read_parquet(prep_of(cfg) / "train.parquet")
    te = pd.read_parquet(prep_of(cfg) / "test.parquet")
    assert (tr["label"] == -1).all() and (te["label"] == -1).all()
    assert tr[["y_ulcer", "y_pigment", "y_bleeding"]].sum(axis=1).max() == 2
    t1 = te.set_index("lesion_id").loc["T001"]            # age blank, site 'foot' never seen in train
    assert t1["meta_age_missing"] == 1 and t1["meta_site_unknown"] == 1
    assert "meta_site_foot" not in te and t1["meta_site_arm"] == t1["meta_site_leg"] == 0
    assert te["group"].tolist() == ["Q0", "Q1", "Q2", "Q3"]
    m = tr.merge(pd.read_csv(prep_of(cfg) / "folds.csv", dtype={"lesion_id": str}), on="lesion_id")
    assert (m.groupby("group")["fold"].nunique() == 1).all()


def test_test_release_removed_drops_stale_test_table(tmp_path, milk):
    cfg = milk_cfg(milk, tmp_path / "out", "cache.mode=none")
    prepare.run(cfg)
    assert (prep_of(cfg) / "test.parquet").exists()
    (milk / TEST_META).unlink()
    info = prepare.run(cfg)
    assert info["n_test"] == 0 and not (prep_of(cfg) / "test.parquet").exists()


# --------------------------------------------------------------------------- bad inputs
def _first(df: pd.DataFrame, col: str, value: str) -> int:
    return int(np.flatnonzero((df[col] == value).to_numpy())[0])


def missing_image(root):
    isic = read_raw(root / TRAIN_META)["isic_id"].iloc[7]
    image_of(root, isic).unlink()
    return rf"MILK10k train: 1 image\(s\) missing under .*MILK10k_Training_Input, e\.g\. \['{isic}'\]"


def missing_test_image(root):
    isic = read_raw(root / TEST_META)["isic_id"].iloc[3]
    image_of(root, isic, "test").unlink()
    return rf"MILK10k test: 1 image\(s\) missing under .*MILK10k_Test_Input, e\.g\. \['{isic}'\]"


def missing_modality(root):
    meta = read_raw(root / TRAIN_META)
    lid = meta["lesion_id"].iloc[20]
    drop = meta.index[(meta["lesion_id"] == lid) & (meta["image_type"] != "dermoscopic")]
    write_raw(meta.drop(drop), root / TRAIN_META)
    return rf"Training_Metadata\.csv: lesion {lid} has 1 dermoscopic and 0 clinical images"


def two_dermoscopic(root):
    meta = read_raw(root / TRAIN_META)
    lid = meta["lesion_id"].iloc[30]
    meta.loc[meta["lesion_id"] == lid, "image_type"] = "dermoscopic"
    write_raw(meta, root / TRAIN_META)
    return rf"lesion {lid} has 2 dermoscopic and 0 clinical images"


def duplicate_gt_lesion(root):
    gt = read_raw(root / TRAIN_GT)
    lid = gt["lesion_id"].iloc[5]
    write_raw(pd.concat([gt, gt.iloc[[5]]], ignore_index=True), root / TRAIN_GT)
    return rf"Training_GroundTruth\.csv: duplicate lesion_id '{lid}' \(CSV lines \[7, {len(gt) + 2}\]\)"


def duplicate_isic_id(root):
    meta = read_raw(root / TRAIN_META)
    meta.loc[40, "isic_id"] = meta.loc[10, "isic_id"]
    write_raw(meta, root / TRAIN_META)
    return rf"Training_Metadata\.csv: duplicate isic_id '{meta.loc[10, 'isic_id']}' \(CSV lines \[12, 42\]\)"


def gt_zero_labels(root):
    gt = read_raw(root / TRAIN_GT)
    gt.loc[13, MILK_CLASSES] = "0.0"
    write_raw(gt, root / TRAIN_GT)
    return rf"Training_GroundTruth\.csv: line 15 \({gt['lesion_id'][13]}\) has no label; exactly one is required"


def gt_two_labels(root):
    gt = read_raw(root / TRAIN_GT)
    gt.loc[0, MILK_CLASSES] = "0.0"
    gt.loc[0, ["MEL", "NV"]] = "1.0"
    write_raw(gt, root / TRAIN_GT)
    return rf"Training_GroundTruth\.csv: line 2 \({gt['lesion_id'][0]}\) has 2 labels"


def gt_not_binary(root):
    gt = read_raw(root / TRAIN_GT)
    gt.loc[3, "BCC"] = "2"
    write_raw(gt, root / TRAIN_GT)
    return r"Training_GroundTruth\.csv: line 5 \(.*\): labels must be 0 or 1"


def gt_text_label(root):
    gt = read_raw(root / TRAIN_GT)
    gt.loc[8, "DF"] = "yes"
    write_raw(gt, root / TRAIN_GT)
    return r"Training_GroundTruth\.csv: column DF line 10: 'yes' is not a number"


def unknown_class_column(root):
    gt = read_raw(root / TRAIN_GT)
    gt["FOO"] = "0.0"
    write_raw(gt, root / TRAIN_GT)
    return r"Training_GroundTruth\.csv: unknown class columns \['FOO'\]"


def monet_not_numeric(root):
    meta = read_raw(root / TRAIN_META)
    meta.loc[17, "MONET_hair"] = "abc"
    write_raw(meta, root / TRAIN_META)
    return r"Training_Metadata\.csv: column MONET_hair line 19: 'abc' is not a number"


def monet_not_numeric_in_test(root):
    meta = read_raw(root / TEST_META)
    meta.loc[2, "MONET_erythema"] = "0.3.1"
    write_raw(meta, root / TEST_META)
    return r"Test_Metadata\.csv: column MONET_erythema line 4: '0\.3\.1' is not a number"


def age_not_numeric(root):
    meta = read_raw(root / TRAIN_META)
    meta.loc[0, "age_approx"] = "forty"
    write_raw(meta, root / TRAIN_META)
    return r"Training_Metadata\.csv: column age_approx line 2: 'forty' is not a number"


def corrupt_jpeg(root):
    isic = read_raw(root / TRAIN_META)["isic_id"].iloc[50]
    image_of(root, isic).write_bytes(b"\x00garbage, not an image" * 40)
    return rf"1 image\(s\) could not be cached: unreadable or corrupt image .*{isic}\.jpg"


def truncated_jpeg(root):
    isic = read_raw(root / TEST_META)["isic_id"].iloc[5]
    p = image_of(root, isic, "test")
    write_truncated_jpeg(p, p)
    return rf"1 image\(s\) could not be cached: unreadable or corrupt image .*{isic}\.jpg"


def empty_gt(root):
    (root / TRAIN_GT).write_bytes(b"")
    return r"MILK10k ground truth: .*Training_GroundTruth\.csv is empty"


def empty_metadata(root):
    (root / TRAIN_META).write_bytes(b"")
    return r"MILK10k metadata: .*Training_Metadata\.csv is empty"


def header_only_gt(root):
    (root / TRAIN_GT).write_text("lesion_id," + ",".join(MILK_CLASSES) + "\n")
    return r"Training_GroundTruth\.csv has a header but no rows"


def header_only_test_metadata(root):
    (root / TEST_META).write_text((root / TEST_META).read_text().splitlines()[0] + "\n")
    return r"Test_Metadata\.csv has a header but no rows"


def malformed_csv(root):
    lines = (root / TRAIN_META).read_text().splitlines()
    lines[6] += ",extra,fields"
    (root / TRAIN_META).write_text("\n".join(lines) + "\n")
    return r"Training_Metadata\.csv is not a valid CSV: .*line 7"


def binary_csv(root):
    (root / TRAIN_GT).write_bytes(b"lesion_id,AKIEC\n\xff\xfe\xfa\x00\x81,1\n")
    return r"Training_GroundTruth\.csv is not a valid CSV"


def missing_gt_file(root):
    (root / TRAIN_GT).unlink()
    return r"MILK10k ground truth: file not found: .*Training_GroundTruth\.csv"


def gt_missing_id_column(root):
    gt = read_raw(root / TRAIN_GT).rename(columns={"lesion_id": "lesion"})
    write_raw(gt, root / TRAIN_GT)
    return r"Training_GroundTruth\.csv lacks columns \['lesion_id'\]"


def lesion_in_train_and_test(root):
    test = read_raw(root / TEST_META)
    lid = read_raw(root / TRAIN_GT)["lesion_id"].iloc[0]
    old = test["lesion_id"].iloc[0]
    test.loc[test["lesion_id"] == old, "lesion_id"] = lid
    write_raw(test, root / TEST_META)
    (root / "MILK10k_Test_Input" / old).rename(root / "MILK10k_Test_Input" / lid)
    return rf"1 ids are in both train and test, e\.g\. \['{lid}'\]"


CACHE_STAGE = {corrupt_jpeg, truncated_jpeg}
BAD_INPUTS = [missing_image, missing_test_image, missing_modality, two_dermoscopic, duplicate_gt_lesion,
              duplicate_isic_id, gt_zero_labels, gt_two_labels, gt_not_binary, gt_text_label, unknown_class_column,
              monet_not_numeric, monet_not_numeric_in_test, age_not_numeric, corrupt_jpeg, truncated_jpeg, empty_gt,
              empty_metadata, header_only_gt, header_only_test_metadata, malformed_csv, binary_csv,
              missing_gt_file, gt_missing_id_column, lesion_in_train_and_test]


@pytest.mark.parametrize("breakage", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_one_clear_error_and_nothing_written(tmp_path, milk, breakage):
    pattern = breakage(milk)
    cfg = milk_cfg(milk, tmp_path / "out")
    with pytest.raises(PipelineError, match=pattern):
        prepare.run(cfg)
    prep = prep_of(cfg)
    assert not [n for n in PREP_TABLES + ["fold_summary.csv", "config.yaml"] if (prep / n).exists()]
    if breakage in CACHE_STAGE:        # the good images may be cached for the rerun; nothing else is
        assert [p.name for p in prep.iterdir()] == ["images"]
        assert not [p for p in prep.rglob(".*")]
    else:
        assert not prep.exists()


def test_bad_input_on_rerun_keeps_previous_outputs(tmp_path, milk):
    cfg = milk_cfg(milk, tmp_path / "out", "cache.mode=none")
    prepare.run(cfg)
    before = mtimes(prep_of(cfg))
    gt_two_labels(milk)
    with pytest.raises(PipelineError, match="has 2 labels"):
        prepare.run(cfg)
    assert mtimes(prep_of(cfg)) == before


# --------------------------------------------------------------------------- the script
def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "01_preprocess.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_bad_input_exits_2_with_one_line(tmp_path, milk):
    pattern = duplicate_gt_lesion(milk)
    out = tmp_path / "out"
    r = run_script("-c", str(ROOT / "configs" / "milk10k_sample" / "base.yaml"), f"data.root={milk}",
                   f"paths.output={out}", "cache.workers=1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Training_GroundTruth.csv: duplicate lesion_id" in errors[0]
    assert re.search(pattern, errors[0])
    assert not (out / "prep").exists()


def run_in_process(monkeypatch, *args: str) -> int:
    """Run 01_preprocess.py as __main__ in this process (its real argument wiring, without the start-up)."""
    monkeypatch.setattr(sys, "argv", ["01_preprocess.py", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "01_preprocess.py"), run_name="__main__")
    return e.value.code


def test_script_fold_guard_and_force_flag(tmp_path, monkeypatch, capsys):
    base = ["-c", str(ROOT / "configs" / "milk10k_sample" / "base.yaml"), f"paths.output={tmp_path}",
            "cache.mode=none"]
    assert run_in_process(monkeypatch, *base) == 0
    capsys.readouterr()
    assert run_in_process(monkeypatch, *base, "folds.seed=1") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "folds.csv exists" in lines[0] and "Traceback" not in err
    assert run_in_process(monkeypatch, *base, "folds.seed=1", "--force-folds") == 0
    assert read_json(tmp_path / "prep" / "milk10k_sample" / "dataset.json")["folds"]["seed"] == 1
