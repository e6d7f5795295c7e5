"""lib.data readers on the shipped MILK10k sample (nested and flat image layouts), tiny HAM10000 /
ISIC 2019 / generic-CSV releases built from its images, CSV-level errors, label validation and the
metadata encoders (fitted on train only, unseen categories -> unknown)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config.load import load_config
from lib.core.errors import PipelineError
from lib.data import formats
from tests.helpers import (
    HAM_ROWS,
    ISIC2019_CLASSES,
    MILK_CLASSES,
    N_TEST,
    N_TRAIN,
    SAMPLE,
    TEST_META,
    TRAIN_GT,
    TRAIN_META,
    copy_sample,
    generic_cfg,
    make_generic,
    make_ham,
    make_isic2019,
    read_raw,
    write_raw,
)

README_COUNTS = {"BCC": 25, "NV": 10, "BKL": 10, "SCCKA": 8, "MEL": 8, "AKIEC": 8, "DF": 6, "INF": 6, "VASC": 6,
                 "BEN_OTH": 6, "MAL_OTH": 5}


def cfg_for(root: Path, *ov: str) -> dict:
    return load_config(None, [f"data.root={root}", *ov])


# --------------------------------------------------------------------------- MILK10k sample
@pytest.fixture(scope="module")
def milk_train() -> formats.Raw:
    return formats.read_split(cfg_for(SAMPLE), "train")


def test_milk_train_table(milk_train):
    t = milk_train.table
    assert len(t) == N_TRAIN and t["lesion_id"].is_unique
    assert milk_train.classes == MILK_CLASSES and milk_train.task == "multiclass"
    assert milk_train.modalities == ["dermoscopic", "clinical"]
    y = t[[f"y_{c}" for c in MILK_CLASSES]].to_numpy()
    assert set(np.unique(y)) == {0.0, 1.0} and (y.sum(1) == 1).all()
    assert dict(zip(MILK_CLASSES, y.sum(0).astype(int))) == {c: README_COUNTS[c] for c in MILK_CLASSES}
    assert milk_train.num_cols == ["age_approx"]
    assert milk_train.cat_cols == ["sex", "skin_tone_class", "site"]
    assert len([c for c in t.columns if c.startswith("monet_dermoscopic_")]) == 7
    assert len([c for c in t.columns if c.startswith("monet_clinical_")]) == 7


def test_milk_train_images_and_metadata_match_csv(milk_train):
    t = milk_train.table.set_index("lesion_id")
    meta = read_raw(SAMPLE / TRAIN_META)
    for _, r in meta.iterrows():
        m = "dermoscopic" if r["image_type"] == "dermoscopic" else "clinical"
        src = Path(t.loc[r["lesion_id"], f"src_{m}"])
        assert src.exists() and src.stem == r["isic_id"] == t.loc[r["lesion_id"], f"isic_{m}"]
        assert t.loc[r["lesion_id"], f"monet_{m}_hair"] == pytest.approx(float(r["MONET_hair"]))
        if m == "dermoscopic":
            assert t.loc[r["lesion_id"], "age_approx"] == float(r["age_approx"])
    gt = read_raw(SAMPLE / TRAIN_GT).set_index("lesion_id").astype(float)
    for c in MILK_CLASSES:
        assert (t[f"y_{c}"] == gt.loc[t.index, c]).all()


def test_milk_test_split_never_reads_held_out(monkeypatch):
    opened = []
    real = formats.read_csv
    monkeypatch.setattr(formats.milk10k, "read_csv", lambda p, *a, **k: opened.append(Path(p)) or real(p, *a, **k))
    raw = formats.read_split(cfg_for(SAMPLE), "test")
    assert [p.name for p in opened] == [TEST_META]
    t = raw.table
    assert len(t) == N_TEST and t["lesion_id"].is_unique
    assert not [c for c in t.columns if c.startswith("y_")]
    srcs = t["src_dermoscopic"].tolist() + t["src_clinical"].tolist()
    assert all(Path(p).exists() and "Test_Input" in p for p in srcs)
    train_ids = set(read_raw(SAMPLE / TRAIN_GT)["lesion_id"])
    assert not set(t["lesion_id"]) & train_ids


def test_milk_flat_image_folder_reads_the_same(tmp_path, milk_train):
    root = copy_sample(tmp_path / "flat", flat=True)
    assert not [p for p in (root / "MILK10k_Training_Input").iterdir() if p.is_dir()]
    raw = formats.read_split(cfg_for(root), "train")
    a, b = milk_train.table, raw.table
    assert list(a.columns) == list(b.columns)
    src = [c for c in a.columns if c.startswith("src_")]
    pd.testing.assert_frame_equal(a.drop(columns=src), b.drop(columns=src))
    for c in src:
        assert all(Path(p).parent == root / "MILK10k_Training_Input" for p in b[c])
        assert [Path(p).name for p in a[c]] == [Path(p).name for p in b[c]]
    assert len(formats.read_split(cfg_for(root), "test").table) == N_TEST


def test_missing_test_release_gives_none(tmp_path):
    root = copy_sample(tmp_path / "s")
    (root / TEST_META).unlink()
    assert formats.read_split(cfg_for(root), "test") is None


def test_missing_data_folder(tmp_path):
    with pytest.raises(PipelineError, match=r"data folder not found: .*nowhere"):
        formats.read_split(cfg_for(tmp_path / "nowhere"), "train")


def test_milk_missing_image_folder(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    for name in (TRAIN_META, TRAIN_GT):
        (root / name).write_bytes((SAMPLE / name).read_bytes())
    with pytest.raises(PipelineError, match=r"MILK10k images: none of \['MILK10k_Training_Input', 'images'\]"):
        formats.read_split(cfg_for(root), "train")


def test_milk_unknown_image_type(tmp_path):
    root = copy_sample(tmp_path / "s")
    meta = read_raw(root / TRAIN_META)
    meta.loc[3, "image_type"] = "clinical: overview"
    write_raw(meta, root / TRAIN_META)
    with pytest.raises(PipelineError, match=r"Metadata\.csv: line 5: unknown image_type 'clinical: overview'"):
        formats.read_split(cfg_for(root), "train")


def test_milk_gt_and_metadata_disagree(tmp_path):
    root = copy_sample(tmp_path / "s")
    gt = read_raw(root / TRAIN_GT)
    write_raw(gt.iloc[1:], root / TRAIN_GT)
    with pytest.raises(PipelineError, match=rf"GroundTruth\.csv: 0 lesions without metadata .*1 metadata lesions "
                                            rf"without ground truth \(e\.g\. \['{gt['lesion_id'][0]}'\]\)"):
        formats.read_split(cfg_for(root), "train")


# --------------------------------------------------------------------------- HAM10000
def test_ham_reader(tmp_path):
    root = make_ham(tmp_path / "ham")
    raw = formats.read_split(cfg_for(root, "data.format=ham10000"), "train")
    t = raw.table
    assert len(t) == len(HAM_ROWS) and raw.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert t["lesion_id"].tolist() == [r[1] for r in HAM_ROWS]          # one row per image
    assert raw.group_col == "group" and t["group"].tolist() == [r[0] for r in HAM_ROWS]
    assert t["group"].nunique() < len(t)
    lab = [c[2:] for c in t.filter(like="y_").columns[t.filter(like="y_").to_numpy().argmax(1)]]
    assert lab == [r[2].upper() for r in HAM_ROWS]
    assert all(Path(p).exists() and Path(p).stem == i for p, i in zip(t["src_dermoscopic"], t["lesion_id"]))
    assert raw.num_cols == ["age"] and raw.cat_cols == ["sex", "localization"]
    assert t["age"].isna().sum() == 2 and t["age"].dtype.kind == "f"


def test_ham_literal_unknown_category_is_encoded_as_unknown(tmp_path):
    raw = formats.read_split(cfg_for(make_ham(tmp_path / "ham"), "data.format=ham10000"), "train")
    enc = formats.fit_meta_encoders(raw.table, raw.num_cols, raw.cat_cols)
    meta = formats.apply_meta_encoders(raw.table, enc, "train")
    unk = (raw.table["sex"] == "unknown").to_numpy()
    assert unk.sum() == 2
    assert (meta.loc[unk, "meta_sex_unknown"] == 1).all()
    assert (meta.loc[~unk, "meta_sex_unknown"] == 0).all()
    sex = meta[[c for c in meta.columns if c.startswith("meta_sex_")]]
    assert (sex.sum(axis=1) == 1).all()                 # exactly one indicator per row
    assert list(meta.columns).count("meta_sex_unknown") == 1


def test_ham_test_split_without_lesion_ids(tmp_path):
    root = make_ham(tmp_path / "ham")
    pd.DataFrame({"image_id": ["ISIC_0024001", "ISIC_0024002"], "age": ["40", ""], "sex": ["male", "female"],
                  "localization": ["back", "ear"]}).to_csv(root / "HAM10000_test_metadata.csv", index=False)
    raw = formats.read_split(cfg_for(root, "data.format=ham10000"), "test")
    assert len(raw.table) == 2 and not raw.table.filter(like="y_").shape[1]
    assert raw.group_col is None or raw.group_col in raw.table


@pytest.mark.parametrize("col, value, pattern", [
    ("dx", "xyz", r"HAM10000_metadata\.csv: line 4: unknown class 'XYZ'"),
    ("dx", "", r"HAM10000_metadata\.csv: line 4: empty label in column dx"),
    ("image_id", "ISIC_9999999", r"HAM10000 train: 1 image\(s\) missing .*ISIC_9999999"),
    ("image_id", "ISIC_0024001", r"HAM10000_metadata\.csv: duplicate image_id 'ISIC_0024001' \(CSV lines \[2, 4\]\)"),
    ("age", "forty", r"HAM10000_metadata\.csv: column age line 4: 'forty' is not a number"),
])
def test_ham_errors(tmp_path, col, value, pattern):
    root = make_ham(tmp_path / "ham")
    df = read_raw(root / "HAM10000_metadata.csv")
    df.loc[2, col] = value if value else np.nan
    write_raw(df, root / "HAM10000_metadata.csv")
    with pytest.raises(PipelineError, match=pattern):
        formats.read_split(cfg_for(root, "data.format=ham10000"), "train")


# --------------------------------------------------------------------------- ISIC 2019
def test_isic2019_reader(tmp_path):
    root = make_isic2019(tmp_path / "i19")
    raw = formats.read_split(cfg_for(root, "data.format=isic2019"), "train")
    t = raw.table
    assert raw.classes == ISIC2019_CLASSES and "y_UNK" not in t
    assert t["lesion_id"].tolist() == [f"ISIC_000000{i}" for i in range(1, 7)]
    y = t[[f"y_{c}" for c in ISIC2019_CLASSES]].to_numpy()
    assert [ISIC2019_CLASSES[i] for i in y.argmax(1)] == ["MEL", "MEL", "NV", "BCC", "AK", "SCC"]
    assert (y.sum(1) == 1).all()
    # lesion ids group images; images without one are their own group
    assert t["group"].tolist() == ["BCN_0000001", "BCN_0000001", "ISIC_0000003", "BCN_0000002", "ISIC_0000005",
                                   "BCN_0000003"]
    assert raw.group_col == "group"
    assert raw.num_cols == ["age_approx"] and raw.cat_cols == ["sex", "anatom_site_general"]
    assert np.isnan(t["age_approx"].iloc[3]) and t["age_approx"].iloc[0] == 55.0


def test_isic2019_two_labels(tmp_path):
    root = make_isic2019(tmp_path / "i19")
    gt = read_raw(root / "ISIC_2019_Training_GroundTruth.csv")
    gt.loc[2, "MEL"] = "1.0"
    write_raw(gt, root / "ISIC_2019_Training_GroundTruth.csv")
    with pytest.raises(PipelineError, match=r"GroundTruth\.csv: line 4 \(ISIC_0000003\) has 2 labels; exactly one"):
        formats.read_split(cfg_for(root, "data.format=isic2019"), "train")


# --------------------------------------------------------------------------- generic CSV
def test_generic_label_col(tmp_path):
    root = make_generic(tmp_path / "g")
    cfg = generic_cfg(root, tmp_path / "o", "data.generic.label_col=diagnosis", "data.generic.group_col=patient")
    raw = formats.read_split(cfg, "train")
    t = raw.table
    assert raw.classes == ["benign", "malignant", "other"] and raw.task == "multiclass"
    assert t["lesion_id"].tolist() == [f"C{i:03d}" for i in range(12)]
    assert t["src_dermoscopic"].tolist() == [str(root / "imgs" / f"img{i:03d}.jpg") for i in range(12)]
    assert t["y_malignant"].tolist() == [float(i % 3 == 1) for i in range(12)]
    assert raw.group_col == "group" and t["group"].tolist() == [f"P{i // 2}" for i in range(12)]
    assert raw.num_cols == ["age"] and t["age"].dtype.kind in "if"
    assert raw.cat_cols == ["site"]


def test_generic_multilabel_cols(tmp_path):
    root = make_generic(tmp_path / "g")
    cfg = generic_cfg(root, tmp_path / "o", "data.generic.label_cols=[ulcer, pigment, bleeding]")
    raw = formats.read_split(cfg, "train")
    assert raw.task == "multilabel" and raw.classes == ["ulcer", "pigment", "bleeding"]
    y = raw.table[["y_ulcer", "y_pigment", "y_bleeding"]].to_numpy()
    assert (y.sum(1) >= 1).all() and (y.sum(1) == 2).any()
    assert y[:, 2].tolist() == [float(i % 3 == 0) for i in range(12)]
    with pytest.raises(PipelineError, match=r"train\.csv: line 2 \(C000\) has 2 labels; exactly one is required"):
        formats.read_split(generic_cfg(root, tmp_path / "o", "data.generic.label_cols=[ulcer, pigment, bleeding]",
                                 "data.task=multiclass"), "train")


def test_generic_test_split(tmp_path):
    root = make_generic(tmp_path / "g")
    cfg = generic_cfg(root, tmp_path / "o", "data.generic.label_col=diagnosis")
    with pytest.raises(PipelineError, match="data.classes must be set for a generic test split"):
        formats.read_split(cfg, "test")
    cfg = generic_cfg(root, tmp_path / "o", "data.generic.label_col=diagnosis",
                      "data.classes=[benign, malignant, other]")
    raw = formats.read_split(cfg, "test")
    assert raw.table["lesion_id"].tolist() == ["T000", "T001", "T002", "T003"]
    assert all(Path(p).exists() for p in raw.table["src_dermoscopic"])


LABEL = "data.generic.label_col=diagnosis"


@pytest.mark.parametrize("overrides, edit, pattern", [
    ([LABEL], ("image", 3, "img999"), r"train\.csv: line 5: image for dermoscopic not found: .*img999\.jpg"),
    ([LABEL], ("case", 3, "C000"), r"train\.csv: duplicate case 'C000' \(CSV lines \[2, 5\]\)"),
    ([LABEL], ("age", 0, "old"), r"train\.csv: column age line 2: 'old' is not a number"),
    ([LABEL], ("diagnosis", 6, "unsure"), None),        # label_col: the classes are whatever the data holds
    (["data.generic.label_col=dx"], None, r"train\.csv lacks columns \['dx'\]"),
    (["data.generic.label_cols=[ulcer, nope]"], None, r"train\.csv lacks columns \['nope'\]"),
    ([LABEL, "data.generic.group_col=hospital"], None, r"train\.csv lacks columns \['hospital'\]"),
    ([LABEL, "data.generic.meta_cat_cols=[colour]"], None, r"train\.csv lacks columns \['colour'\]"),
    ([LABEL, "data.generic.meta_num_cols=[weight]"], None, r"train\.csv lacks columns \['weight'\]"),
    ([LABEL, "data.classes=[benign, malignant]"], None,
     r"train\.csv: line 4: unknown class 'other' \(known: \['benign', 'malignant'\]\)"),
    (["data.classes=[x]"], None, r"set label_col"),
    ([LABEL, "data.generic.train_csv=null"], None, r"data\.generic\.train_csv is not set"),
])
def test_generic_errors(tmp_path, overrides, edit, pattern):
    root = make_generic(tmp_path / "g")
    if edit:
        df = read_raw(root / "train.csv")
        df.loc[edit[1], edit[0]] = edit[2]
        write_raw(df, root / "train.csv")
    cfg = generic_cfg(root, tmp_path / "o", *overrides)
    if pattern is None:
        assert "unsure" in formats.read_split(cfg, "train").classes
        return
    with pytest.raises(PipelineError, match=pattern):
        formats.read_split(cfg, "train")


# --------------------------------------------------------------------------- CSV and label validation
def test_read_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    with pytest.raises(PipelineError, match=r"T: file not found: .*x\.csv"):
        formats.read_csv(p, "T")
    p.write_bytes(b"")
    with pytest.raises(PipelineError, match=r"T: .*x\.csv is empty"):
        formats.read_csv(p, "T")
    p.write_text("a,b\n")
    with pytest.raises(PipelineError, match=r"x\.csv has a header but no rows"):
        formats.read_csv(p, "T")
    p.write_text("a,b\n1,2\n1,2,3,4\n")
    with pytest.raises(PipelineError, match=r"x\.csv is not a valid CSV: .*line 3"):
        formats.read_csv(p, "T")
    p.write_bytes(b"a,b\n\xff\xfe\x00bad,1\n")
    with pytest.raises(PipelineError, match=r"x\.csv is not a valid CSV"):
        formats.read_csv(p, "T")
    p.write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match=r"x\.csv lacks columns \['c'\]"):
        formats.read_csv(p, "T", ["a", "c"])
    p.write_text(" a , b\nNA,\n")
    df = formats.read_csv(p, "T", ["a", "b"])                 # header whitespace stripped; 'NA' kept as text
    assert df["a"].tolist() == ["NA"] and df["b"].isna().all()


def test_onehot_label_rules(tmp_path):
    p = Path("gt.csv")
    gt = pd.DataFrame({"id": ["a", "b", "c"], "X": ["1", "0", "0.5"], "Y": ["0", "1", "0.5"]})
    with pytest.raises(PipelineError, match=r"gt\.csv: line 4 \(c\): labels must be 0 or 1"):
        formats.onehot_labels(gt.copy(), "id", p, None)
    gt.loc[2, ["X", "Y"]] = ["0", "0"]
    with pytest.raises(PipelineError, match=r"line 4 \(c\) has no label; exactly one"):
        formats.onehot_labels(gt.copy(), "id", p, None)
    with pytest.raises(PipelineError, match=r"line 4 \(c\) has no label; at least one"):
        formats.onehot_labels(gt.copy(), "id", p, None, multilabel=True)
    gt.loc[2, ["X", "Y"]] = ["1", "1"]
    y, cls = formats.onehot_labels(gt.copy(), "id", p, None, multilabel=True)
    assert cls == ["X", "Y"] and y["y_X"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(PipelineError, match=r"unknown class columns \['Y'\]; expected \['X', 'Z'\]"):
        formats.onehot_labels(gt.copy(), "id", p, ["X", "Z"])
    y, cls = formats.onehot_labels(gt[["id", "Y", "X"]].iloc[:2].copy(), "id", p, ["X", "Y"])
    assert cls == ["X", "Y"] and list(y.columns) == ["lesion_id", "y_X", "y_Y"]   # the known order


# --------------------------------------------------------------------------- metadata encoders
def test_encoders_fitted_on_train_only(caplog):
    train = pd.DataFrame({"age": [30.0, 40.0, 50.0, np.nan], "sex": ["male", "female", "male", np.nan],
                          "site": ["trunk", "face", "trunk", "trunk"]})
    test = pd.DataFrame({"age": [90.0, np.nan], "sex": ["other", "female"], "site": ["palms", np.nan]})
    enc = formats.fit_meta_encoders(train, ["age"], ["sex", "site"])
    assert enc["num"]["age"] == {"mean": 40.0, "std": pytest.approx(10.0)}
    assert enc["cat"] == {"sex": ["female", "male"], "site": ["face", "trunk"]}
    with caplog.at_level(logging.WARNING, logger="lib.data.formats"):
        m = formats.apply_meta_encoders(test, enc, "test")
    assert "test: 1 of 2 rows lack 'age'" in caplog.text and "lack 'site'" in caplog.text
    assert m["meta_age"].tolist() == pytest.approx([5.0, 0.0])
    assert m["meta_age_missing"].tolist() == [0.0, 1.0]
    assert m["meta_sex_unknown"].tolist() == [1.0, 0.0] and m["meta_sex_female"].tolist() == [0.0, 1.0]
    assert m["meta_site_unknown"].tolist() == [1.0, 1.0]
    assert "meta_sex_other" not in m and "meta_site_palms" not in m
    assert m.dtypes.eq(np.float32).all()
    assert list(m.columns) == list(formats.apply_meta_encoders(train, enc, "train").columns)


def test_encoder_degenerate_columns():
    enc = formats.fit_meta_encoders(pd.DataFrame({"a": [5.0, 5.0], "b": [np.nan, np.nan], "c": [1.0, np.nan]}),
                              ["a", "b", "c"], [])
    assert enc["num"] == {"a": {"mean": 5.0, "std": 1.0}, "b": {"mean": 0.0, "std": 1.0},
                          "c": {"mean": 1.0, "std": 1.0}}


def test_generic_binary_one_column_with_negatives(tmp_path):
    root = make_generic(tmp_path / "g")
    cfg = generic_cfg(root, tmp_path / "o", "data.task=binary", "data.generic.label_cols=[bleeding]")
    raw = formats.read_split(cfg, "train")
    assert raw.task == "binary" and raw.classes == ["bleeding"]
    assert raw.table["y_bleeding"].tolist() == [float(i % 3 == 0) for i in range(12)]  # negatives kept
    with pytest.raises(PipelineError, match="binary task takes one 0/1 column"):
        formats.read_split(generic_cfg(root, tmp_path / "o", "data.task=binary",
                                 "data.generic.label_cols=[ulcer, pigment]"), "train")
    with pytest.raises(PipelineError, match="not label_col"):
        formats.read_split(generic_cfg(root, tmp_path / "o", "data.task=binary",
                                 "data.generic.label_col=diagnosis"), "train")
