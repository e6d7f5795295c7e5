"""HAM10000 (ISIC 2018 task 3): `HAM10000_metadata.csv` (`dx`), one row per image, grouped by lesion."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.io import ID
from lib.data.formats.common import (
    Raw,
    check_unique,
    index_images,
    labels_from_names,
    read_csv,
    resolve_images,
    to_numeric,
)

HAM_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]

# --------------------------------------------------------------------------- HAM10000 / ISIC 2019
def read_ham10000(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """HAM10000: `HAM10000_metadata.csv` (one row per image, `dx`), images anywhere below root.

    The table's `lesion_id` is the image id (one row per image); HAM's own lesion id is kept as
    `group` so folds never split one lesion's images.
    """
    name = "HAM10000_metadata.csv" if split == "train" else "HAM10000_test_metadata.csv"
    path = root / name
    need = ["image_id"] + (["dx", "lesion_id"] if split == "train" else [])
    df = read_csv(path, "HAM10000 metadata", need)
    check_unique(df, "image_id", path)
    out = pd.DataFrame({ID: df["image_id"].astype(str)})
    out["src_dermoscopic"] = resolve_images(out[ID], index_images(root), root, f"HAM10000 {split}")
    if "lesion_id" in df:
        out["group"] = df["lesion_id"].astype(str).to_numpy()
    if split == "train":
        y, classes = labels_from_names(df, "dx", classes or HAM_CLASSES, path)
        out = pd.concat([out, y.reset_index(drop=True)], axis=1)
    if "age" in df:
        to_numeric(df, ["age"], path)
    for c in ["age", "sex", "localization"]:
        if c in df:
            out[c] = df[c].to_numpy()
    return Raw(out, classes or HAM_CLASSES, ["dermoscopic"], "multiclass",
               [c for c in ["age"] if c in df], [c for c in ["sex", "localization"] if c in df],
               "group" if "group" in out else None)


def read(root: Path, split: str, d: dict) -> Raw:
    return read_ham10000(root, split, d["classes"])
