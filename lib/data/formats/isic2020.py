"""ISIC 2020 (SIIM-ISIC melanoma) official layout: `train.csv` / `test.csv` + `jpeg/{train,test}/`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.io import ID
from lib.data.formats.common import (
    Raw,
    check_unique,
    index_images,
    read_csv,
    resolve_images,
    to_numeric,
)
from lib.data.formats.isic2024 import binary_target, check_patients

ISIC2020_CATS = ["sex", "anatom_site_general_challenge"]


def read_isic2020(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """`train.csv`: image_name, patient_id, sex, age_approx, anatom_site_general_challenge,
    diagnosis, benign_malignant, target; `jpeg/train/<image_name>.jpg`. Binary, patient-grouped."""
    path = root / f"{split}.csv"
    need = ["image_name", "patient_id"] + (["target"] if split == "train" else [])
    df = read_csv(path, f"ISIC 2020 {split} table", need)
    check_unique(df, "image_name", path)
    if split == "train":
        check_patients(df, "patient_id", path)
    out = pd.DataFrame({ID: df["image_name"].astype(str).to_numpy(),
                        "group": df["patient_id"].fillna("").astype(str).to_numpy()})
    folder = root / "jpeg" / split
    out["src_dermoscopic"] = resolve_images(out[ID], index_images(folder), folder, f"ISIC 2020 {split} ({path.name})")
    num = [c for c in ["age_approx"] if c in df.columns]
    to_numeric(df, num, path)
    cats = [c for c in ISIC2020_CATS if c in df.columns]
    for c in num + cats:
        out[c] = df[c].to_numpy()
    if split == "train":
        out["y_malignant"] = binary_target(df, "target", path)
    return Raw(out, ["malignant"], ["dermoscopic"], "binary", num, cats, "group")


def read(root: Path, split: str, d: dict) -> Raw:
    return read_isic2020(root, split, d["classes"])
