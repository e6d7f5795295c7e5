"""MILK10k (ISIC 2025) official layout: one clinical + one dermoscopic image per lesion, MONET scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
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

MILK_CLASSES = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
MILK_MODALITIES = {"dermoscopic": "dermoscopic", "clinical: close-up": "clinical"}

# --------------------------------------------------------------------------- MILK10k
def read_milk10k(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """MILK10k official layout: `MILK10k_<Split>_{Input/,Metadata.csv,GroundTruth.csv}`."""
    tag = "Training" if split == "train" else "Test"
    classes = classes or MILK_CLASSES
    meta_path = root / f"MILK10k_{tag}_Metadata.csv"
    meta = read_csv(meta_path, "MILK10k metadata", [ID, "image_type", "isic_id"])
    check_unique(meta, "isic_id", meta_path)
    monet = [c for c in meta.columns if c.startswith("MONET_")]
    to_numeric(meta, monet + (["age_approx"] if "age_approx" in meta else []), meta_path)
    bad = ~meta["image_type"].isin(list(MILK_MODALITIES))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise PipelineError(f"{meta_path}: line {i + 2}: unknown image_type '{meta['image_type'].iloc[i]}' "
                            f"(expected {list(MILK_MODALITIES)})")
    meta["modality"] = meta["image_type"].map(MILK_MODALITIES)
    per = meta.groupby([ID, "modality"]).size().unstack(fill_value=0)
    for m in MILK_MODALITIES.values():
        if m not in per.columns:
            per[m] = 0
    bad_l = per[(per["dermoscopic"] != 1) | (per["clinical"] != 1)]
    if len(bad_l):
        lid = bad_l.index[0]
        raise PipelineError(f"{meta_path}: lesion {lid} has {int(bad_l.loc[lid, 'dermoscopic'])} dermoscopic and "
                            f"{int(bad_l.loc[lid, 'clinical'])} clinical images; exactly one of each is required")
    folder = find_dir(root, [f"MILK10k_{tag}_Input", "images"], "MILK10k images")
    meta["src"] = resolve_images(meta["isic_id"], index_images(folder), folder, f"MILK10k {split}")
    mods = list(MILK_MODALITIES.values())
    lesions = pd.DataFrame({ID: sorted(meta[ID].unique())})
    for m in ["dermoscopic", "clinical"]:
        sub = meta[meta["modality"] == m].set_index(ID)
        lesions[f"isic_{m}"] = lesions[ID].map(sub["isic_id"])
        lesions[f"src_{m}"] = lesions[ID].map(sub["src"])
        for c in monet:
            lesions[f"monet_{m}_{c[6:]}"] = lesions[ID].map(sub[c])
    derm = meta[meta["modality"] == "dermoscopic"].set_index(ID)
    num_cols, cat_cols = [], []
    for c in ["age_approx", "sex", "skin_tone_class", "site"]:
        if c in derm.columns:
            lesions[c] = lesions[ID].map(derm[c])
            (num_cols if c == "age_approx" else cat_cols).append(c)
    if split == "train":
        gt_path = root / "MILK10k_Training_GroundTruth.csv"
        gt = read_csv(gt_path, "MILK10k ground truth", [ID])
        check_unique(gt, ID, gt_path)
        y, classes = onehot_labels(gt, ID, gt_path, classes)
        only_gt = sorted(set(y[ID]) - set(lesions[ID]))
        only_meta = sorted(set(lesions[ID]) - set(y[ID]))
        if only_gt or only_meta:
            raise PipelineError(f"{gt_path}: {len(only_gt)} lesions without metadata (e.g. {only_gt[:3]}), "
                                f"{len(only_meta)} metadata lesions without ground truth (e.g. {only_meta[:3]})")
        lesions = lesions.merge(y, on=ID, how="left", validate="one_to_one")
    return Raw(lesions, classes, mods, "multiclass", num_cols, cat_cols)


def read(root: Path, split: str, d: dict) -> Raw:
    return read_milk10k(root, split, d["classes"])
