"""Tiny releases in the official layouts of ISIC 2020, ISIC 2024 (HDF5 crops) and SCIN, for the
reader and end-to-end tests. ISIC 2024 rows and crops come from the real public test sample."""
from __future__ import annotations

from pathlib import Path

import h5py
import pandas as pd

from tests.helpers import ROOT, write_jpeg

I24 = ROOT / "input" / "isic2024_test_sample"


def make_isic2024_train(root: Path, n: int = 8, per_patient: int = 2) -> Path:
    """train-metadata.csv (the real test rows' columns + target) + train-image.hdf5 keyed by isic_id."""
    meta = pd.read_csv(I24 / "test-metadata.csv", dtype=str)
    rows = pd.concat([meta] * (n // len(meta) + 1), ignore_index=True).head(n)
    rows["isic_id"] = [f"ISIC_{9000000 + i}" for i in range(n)]
    rows["patient_id"] = [f"IP_{i // per_patient}" for i in range(n)]
    rows["target"] = [i % 2 for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    rows.to_csv(root / "train-metadata.csv", index=False)
    with h5py.File(I24 / "test-image.hdf5", "r") as f:
        blobs = [f[k][()] for k in f.keys()]
    with h5py.File(root / "train-image.hdf5", "w") as f:
        for i, k in enumerate(rows["isic_id"]):
            f.create_dataset(k, data=blobs[i % len(blobs)])
    return root


def make_isic2020(root: Path, n: int = 6, n_test: int = 2) -> Path:
    """train.csv / test.csv + jpeg/{train,test}/<image_name>.jpg (2 images per patient)."""
    rows = pd.DataFrame({"image_name": [f"ISIC_{i:07d}" for i in range(n)],
                         "patient_id": [f"IP_{i // 2}" for i in range(n)],
                         "sex": ["male", "female"] * (n // 2),
                         "age_approx": (["45.0", "50.0", ""] * n)[:n],
                         "anatom_site_general_challenge": (["torso", "head/neck", ""] * n)[:n],
                         "diagnosis": ["nevus", "melanoma"] * (n // 2),
                         "benign_malignant": ["benign", "malignant"] * (n // 2), "target": [0, 1] * (n // 2)})
    root.mkdir(parents=True)
    rows.to_csv(root / "train.csv", index=False)
    test = rows.iloc[:n_test, :5].assign(image_name=[f"ISIC_T{i}" for i in range(n_test)],
                                         patient_id=[f"IP_T{i}" for i in range(n_test)])
    test.to_csv(root / "test.csv", index=False)
    for i, name in enumerate(rows["image_name"]):
        write_jpeg(root / "jpeg" / "train" / f"{name}.jpg", seed=i)
    for i, name in enumerate(test["image_name"]):
        write_jpeg(root / "jpeg" / "test" / f"{name}.jpg", seed=100 + i)
    return root


def make_scin(root: Path, labels: list[str]) -> Path:
    """A SCIN release: dataset/scin_cases.csv, dataset/scin_labels.csv, dataset/images/ (1-3 per case)."""
    n = len(labels)
    cases = pd.DataFrame({"case_id": [f"-{100 + i}" for i in range(n)], "age_group": ["AGE_18_TO_29"] * n,
                          "textures_flat": ["YES", None] * (n // 2) + ["YES"] * (n % 2),
                          "condition_duration": ["ONE_DAY"] * n})
    for v in (1, 2, 3):
        cases[f"image_{v}_path"] = [f"dataset/images/{i}_{v}.png" if v <= 1 + i % 3 else None for i in range(n)]
    for i, r in cases.iterrows():
        for v in (1, 2, 3):
            if isinstance(r[f"image_{v}_path"], str):
                write_jpeg(root / r[f"image_{v}_path"], h=20 + 10 * v, w=30, seed=i)
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    cases.to_csv(root / "dataset" / "scin_cases.csv", index=False)
    pd.DataFrame({"case_id": cases["case_id"], "weighted_skin_condition_label": labels}).to_csv(
        root / "dataset" / "scin_labels.csv", index=False)
    return root
