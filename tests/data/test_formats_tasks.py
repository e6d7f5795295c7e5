"""The other tasks' readers on their official layouts: ISIC 2019 (the real files, UNK kept in the
submission), ISIC 2020, ISIC 2024 (the real public test files + HDF5 crops, tiny training files in the
exact layout), SCIN (the real case / label tables; a tiny release with 1-3 images per case), the
format registry, and bad input (one line naming file and row, nothing read further)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config.load import load_config
from lib.core.errors import ConfigError, PipelineError
from lib.data import cache
from lib.data import formats
from lib.evaluation import submission as S
from tests.data.task_builders import I24, make_isic2020, make_isic2024_train, make_scin
from tests.helpers import ROOT

SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if p.is_dir()),
              ROOT.parent / "shared" / "data")
needs_shared = pytest.mark.skipif(not (SHARED / "scin").is_dir(), reason="../shared/data not present")


def cfg(root: Path, fmt: str, *ov: str) -> dict:
    return load_config(None, [f"data.root={root}", f"data.format={fmt}", *ov])


# --------------------------------------------------------------------------- registry
def test_registry_has_every_format_with_its_layout():
    assert formats.format_names() == ["milk10k", "ham10000", "isic2019", "isic2020", "isic2024", "scin", "generic"]
    assert formats.get_format("isic2019").extra_cols == (("UNK", 0.0),)
    assert (formats.get_format("isic2020").id_col, formats.get_format("isic2020").target_col) == ("image_name", "target")
    assert formats.get_format("scin").task == "multilabel"
    with pytest.raises(ConfigError, match="unknown"):
        formats.get_format("isic2030")


def test_isic2019_submission_keeps_unk_in_official_order():
    probs = pd.DataFrame({"lesion_id": ["ISIC_1"], **{c: [0.1] for c in formats.ISIC2019_CLASSES}})
    sub = S.build_submission(probs, formats.ISIC2019_CLASSES, "isic2019", "multiclass")
    assert list(sub.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert sub["UNK"].tolist() == [0.0]
    S.validate_submission(sub, ["ISIC_1"], list(sub.columns[1:]), "image")
    b = S.build_submission(pd.DataFrame({"lesion_id": ["a"], "malignant": [0.3]}), ["malignant"], "isic2020", "binary")
    assert list(b.columns) == ["image_name", "target"]


# --------------------------------------------------------------------------- ISIC 2019 (real files)
@needs_shared
def test_isic2019_real_files_subset(tmp_path):
    src = SHARED / "isic2019"
    gt = pd.read_csv(src / "ISIC_2019_Training_GroundTruth.csv", dtype=str)
    meta = pd.read_csv(src / "ISIC_2019_Training_Metadata.csv", dtype=str)
    keep = pd.concat([gt[gt[c] == "1.0"].head(3) for c in formats.ISIC2019_CLASSES])["image"]
    gt[gt["image"].isin(keep)].to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    meta[meta["image"].isin(keep)].to_csv(tmp_path / "ISIC_2019_Training_Metadata.csv", index=False)
    (tmp_path / "ISIC_2019_Training_Input").mkdir()
    for i in keep:
        shutil.copy(src / "ISIC_2019_Training_Input" / f"{i}.jpg", tmp_path / "ISIC_2019_Training_Input")
    raw = formats.read_split(cfg(tmp_path, "isic2019"), "train")
    assert raw.classes == formats.ISIC2019_CLASSES and len(raw.table) == 24
    y = raw.table[[f"y_{c}" for c in raw.classes]].to_numpy()
    assert (y.sum(0) == 3).all() and (y.sum(axis=1) == 1).all()
    assert raw.group_col == "group" and raw.table["group"].str.startswith("HAM_").all()


# --------------------------------------------------------------------------- ISIC 2024
def test_isic2024_real_test_files_hdf5():
    raw = formats.read_split(cfg(ROOT / "input", "isic2024", f"data.test_root={I24}"), "test")
    assert raw.table["lesion_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert all(s.endswith(f"test-image.hdf5::{i}") for s, i in zip(raw.table["src_dermoscopic"], raw.table["lesion_id"]))
    assert len([c for c in raw.num_cols if c.startswith("tbp_lv_")]) >= 30
    img = cache.read_rgb(raw.table["src_dermoscopic"].iloc[0])
    assert img.ndim == 3 and img.shape[2] == 3 and 100 < img.shape[0] < 200


def test_isic2024_train_hdf5_and_patient_groups(tmp_path):
    root = make_isic2024_train(tmp_path / "r")
    raw = formats.read_split(cfg(root, "isic2024"), "train")
    assert raw.task == "binary" and raw.table["y_malignant"].tolist() == [0, 1] * 4
    assert raw.table["group"].nunique() == 4
    assert cache.read_rgb(raw.table["src_dermoscopic"].iloc[5]).shape[2] == 3


@pytest.mark.parametrize("problem", ["hdf5_key", "patient", "target"])
def test_isic2024_bad_input_names_file_and_row(tmp_path, problem):
    root = make_isic2024_train(tmp_path / "r")
    m = pd.read_csv(root / "train-metadata.csv", dtype=str)
    if problem == "hdf5_key":
        m.loc[3, "isic_id"] = "ISIC_0000000"
    elif problem == "patient":
        m.loc[3, "patient_id"] = None
    else:
        m.loc[3, "target"] = "2"
    m.to_csv(root / "train-metadata.csv", index=False)
    with pytest.raises(PipelineError, match=r"train-metadata.csv: line 5"):
        formats.read_split(cfg(root, "isic2024"), "train")


# --------------------------------------------------------------------------- ISIC 2020
def test_isic2020_official_layout(tmp_path):
    root = make_isic2020(tmp_path / "r")
    c = cfg(root, "isic2020")
    tr, te = formats.read_split(c, "train"), formats.read_split(c, "test")
    assert tr.task == "binary" and tr.classes == ["malignant"] and tr.group_col == "group"
    assert tr.table["y_malignant"].sum() == 3 and te.table["lesion_id"].tolist() == ["ISIC_T0", "ISIC_T1"]
    assert "anatom_site_general_challenge" in tr.cat_cols
    (root / "jpeg" / "train" / "ISIC_0000003.jpg").unlink()
    with pytest.raises(PipelineError, match="ISIC_0000003"):
        formats.read_split(c, "train")


# --------------------------------------------------------------------------- SCIN
@needs_shared
def test_scin_real_tables_questionnaire_only(caplog):
    raw = formats.read_split(cfg(SHARED / "scin", "scin", "data.scin.min_cases=100"), "train")
    t = raw.table
    assert len(t) == 3061 and t["lesion_id"].is_unique and raw.modalities == []
    assert raw.classes[:2] == ["Eczema", "Allergic_Contact_Dermatitis"] and raw.classes[-1] == "other"
    y = t[[f"y_{c}" for c in raw.classes]].to_numpy()
    assert (y.sum(1) >= 1).all() and (y.sum(0) >= 100).all()
    assert "condition_duration" in raw.cat_cols and "textures_flat" in raw.num_cols
    assert set(np.unique(t["textures_flat"])) == {0.0, 1.0}
    assert sum("image(s) absent" in r.message for r in caplog.records) <= 1


@needs_shared
def test_scin_real_tables_images_required_is_an_error():
    with pytest.raises(PipelineError, match=r"scin_cases.csv: line \d+ \(case .*image not found"):
        formats.read_split(cfg(SHARED / "scin", "scin", "data.scin.use_images=true"), "train")


LABELS = ["{'Eczema': 0.6, 'Tinea': 0.4}", "{'Eczema': 1.0}", "{'Psoriasis': 0.5, 'Eczema': 0.5}", "{}",
          "{'Rare thing': 0.7, 'Eczema': 0.2}", "{'Tinea': 0.9, 'Acne': 0.1}"]


def test_scin_release_with_images_pools_views_per_case(tmp_path):
    root = make_scin(tmp_path / "r", LABELS)
    raw = formats.read_split(cfg(root, "scin", "data.scin.min_cases=2"), "train")
    t = raw.table.set_index("lesion_id")
    assert raw.modalities == ["image"] and len(t) == 5   # the unlabelled case is not a training row
    assert raw.classes == ["Eczema", "Tinea", "other"]
    assert t.loc["-100", ["y_Eczema", "y_Tinea", "y_other"]].tolist() == [1, 1, 0]
    assert t.loc["-104", ["y_Eczema", "y_Tinea", "y_other"]].tolist() == [0, 0, 1]   # 0.2 < 0.3
    assert [s.count("|") + 1 for s in t["src_image"]] == [1, 2, 3, 2, 3]
    img = cache.read_rgb(t.loc["-102", "src_image"])
    assert img.shape[0] == 30 and img.shape[1] > 60   # three views tiled at the first view's height
    top1 = formats.read_split(cfg(root, "scin", "data.scin.min_cases=1", "data.scin.top_k=1",
                            "data.scin.label_min_weight=0"), "train")
    assert (top1.table[[f"y_{c}" for c in top1.classes]].sum(axis=1) == 1).all()


def test_scin_missing_image_is_said_once_or_an_error(tmp_path, caplog):
    root = make_scin(tmp_path / "r", LABELS)
    (root / "dataset" / "images" / "2_3.png").unlink()
    raw = formats.read_split(cfg(root, "scin", "data.scin.min_cases=2"), "train")
    assert raw.modalities == [] and "src_image" not in raw.table
    assert sum("image(s) absent" in r.message for r in caplog.records) == 1
    with pytest.raises(PipelineError, match=r"scin_cases.csv: line 4 \(case -102\): image not found"):
        formats.read_split(cfg(root, "scin", "data.scin.use_images=true"), "train")


@pytest.mark.parametrize("label, ov, msg", [
    ("{'Eczema': 0.6,", [], r"scin_labels.csv: line 3: weighted_skin_condition_label does not parse"),
    ("['Eczema']", [], r"scin_labels.csv: line 3: .* not a dict"),
    ("{'Lupus': 1.0}", ["data.classes=[Eczema,Tinea]"], r"scin_labels.csv: line 3 \(case -101\): unknown condition 'Lupus'"),
])
def test_scin_bad_labels(tmp_path, label, ov, msg):
    root = make_scin(tmp_path / "r", [LABELS[0], label, *LABELS[2:]])
    with pytest.raises(PipelineError, match=msg):
        formats.read_split(cfg(root, "scin", *ov), "train")
