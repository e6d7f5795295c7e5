"""ISIC 2024 (SLICE-3D): `train-metadata.csv` / `test-metadata.csv` + image folders or HDF5 crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID
from lib.data.formats.common import (
    Raw,
    check_unique,
    index_images,
    read_csv,
    resolve_images,
    to_numeric,
)

# --------------------------------------------------------------------------- ISIC 2024 (binary)
ISIC2024_NUM = ["age_approx", "clin_size_long_diam_mm", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext",
                "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext",
                "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean", "tbp_lv_deltaA",
                "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity",
                "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color",
                "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt",
                "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]


def hdf5_sources(h5: Path, ids: pd.Series, meta_path: Path) -> list[str]:
    """`<file.hdf5>::<isic_id>` references; a metadata row without its HDF5 key is an error."""
    import h5py  # lazy: only the HDF5 layout needs it
    try:
        with h5py.File(h5, "r") as f:
            keys = set(f.keys())
    except OSError as e:
        raise PipelineError(f"{h5}: not a readable HDF5 file: {e}") from None
    miss = np.flatnonzero(~ids.isin(keys).to_numpy())
    if len(miss):
        i = int(miss[0])
        raise PipelineError(f"{meta_path}: line {i + 2}: isic_id '{ids.iloc[i]}' has no image in {h5} "
                            f"({len(miss)} row(s) without one)")
    return [f"{h5}::{i}" for i in ids]


def image_sources(root: Path, split: str, ids: pd.Series, meta_path: Path) -> list[str]:
    """Images from `<split>-image/image/` (or `<split>-image/`, `images/`), else `<split>-image.hdf5`."""
    for name in (f"{split}-image/image", f"{split}-image", "images"):
        if (root / name).is_dir():
            folder = root / name
            return resolve_images(ids, index_images(folder), folder, f"{meta_path.name}")
    h5 = root / f"{split}-image.hdf5"
    if h5.exists():
        return hdf5_sources(h5, ids, meta_path)
    raise PipelineError(f"ISIC 2024 {split} images: neither {root}/{split}-image/image/ nor {h5} found")


def check_patients(df: pd.DataFrame, col: str, path: Path) -> None:
    """Patient-grouped folds need a patient id on every row."""
    miss = np.flatnonzero(df[col].isna().to_numpy())
    if len(miss):
        i = int(miss[0])
        raise PipelineError(f"{path}: line {i + 2}: empty {col} (patient-grouped folds need one on every row)")


def binary_target(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    to_numeric(df, [col], path)
    t = df[col].to_numpy()
    bad = np.flatnonzero(~np.isin(t, (0, 1)))
    if len(bad):
        i = int(bad[0])
        raise PipelineError(f"{path}: line {i + 2}: {col} must be 0 or 1, got '{t[i]}'")
    return t.astype(float)


def read_isic2024(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """ISIC 2024 SLICE-3D: `train-metadata.csv` (isic_id, patient_id, target, TBP features) + images
    as a folder (`train-image/image/`) or the competition's HDF5 (`train-image.hdf5`, keyed by isic_id)."""
    path = root / ("train-metadata.csv" if split == "train" else "test-metadata.csv")
    df = read_csv(path, "ISIC 2024 metadata", ["isic_id", "patient_id"] + (["target"] if split == "train" else []))
    check_unique(df, "isic_id", path)
    if split == "train":
        check_patients(df, "patient_id", path)
    out = pd.DataFrame({ID: df["isic_id"].astype(str), "group": df["patient_id"].fillna("").astype(str).to_numpy()})
    out["src_dermoscopic"] = image_sources(root, split, out[ID], path)
    num = [c for c in ISIC2024_NUM if c in df.columns]
    to_numeric(df, num, path)
    cats = [c for c in ["sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location"] if c in df.columns]
    for c in num + cats:
        out[c] = df[c].to_numpy()
    if split == "train":
        out["y_malignant"] = binary_target(df, "target", path)
    return Raw(out, ["malignant"], ["dermoscopic"], "binary", num, cats, "group")

def read(root: Path, split: str, d: dict) -> Raw:
    return read_isic2024(root, split, d["classes"])
