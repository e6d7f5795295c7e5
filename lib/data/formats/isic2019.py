"""ISIC 2019 official training / test files: one-hot ground truth (8 classes + UNK) + metadata."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID
from lib.data.formats.common import (
    Raw,
    check_unique,
    find_dir,
    index_images,
    onehot_labels,
    read_csv,
    resolve_images,
    to_numeric,
)

ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]

def read_isic2019(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """ISIC 2019: `ISIC_2019_<Split>_GroundTruth.csv` (one-hot, `image`) + `_Metadata.csv`."""
    tag = "Training" if split == "train" else "Test"
    meta_path = root / f"ISIC_2019_{tag}_Metadata.csv"
    meta = read_csv(meta_path, "ISIC 2019 metadata", ["image"])
    check_unique(meta, "image", meta_path)
    out = pd.DataFrame({ID: meta["image"].astype(str)})
    folder = find_dir(root, [f"ISIC_2019_{tag}_Input", "images"], "ISIC 2019 images")
    out["src_dermoscopic"] = resolve_images(out[ID], index_images(folder), folder, f"ISIC 2019 {split}")
    if split == "train":
        gt_path = root / "ISIC_2019_Training_GroundTruth.csv"
        gt = read_csv(gt_path, "ISIC 2019 ground truth", ["image"])
        check_unique(gt, "image", gt_path)
        if "UNK" in gt.columns:
            gt = gt.drop(columns="UNK")
        y, classes = onehot_labels(gt, "image", gt_path, classes or ISIC2019_CLASSES)
        out = out.merge(y, on=ID, how="left", validate="one_to_one")
        if out[[f"y_{c}" for c in classes]].isna().any().any():
            raise PipelineError(f"{gt_path}: some metadata images have no ground truth row")
    if "age_approx" in meta:
        to_numeric(meta, ["age_approx"], meta_path)
    cats = [c for c in ["sex", "anatom_site_general"] if c in meta]
    for c in ["age_approx", *cats]:
        if c in meta:
            out[c] = meta[c].to_numpy()
    group = None
    if "lesion_id" in meta and meta["lesion_id"].notna().any():
        out["group"] = meta["lesion_id"].fillna(meta["image"]).astype(str).to_numpy()
        group = "group"
    return Raw(out, classes or ISIC2019_CLASSES, ["dermoscopic"], "multiclass",
               [c for c in ["age_approx"] if c in meta], cats, group)


def read(root: Path, split: str, d: dict) -> Raw:
    return read_isic2019(root, split, d["classes"])
