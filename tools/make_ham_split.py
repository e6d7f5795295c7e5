#!/usr/bin/env python
"""Lay out part of HAM10000 as a labelled train release + an unlabelled test release.

Two layouts (the split is by HAM `lesion_id`, stratified by diagnosis, seeded, so no lesion has
images on both sides; the held-out labels go to `<out>/held_out/`, where no reader looks):

* `--format ham10000` (single-image multiclass, ISIC 2018/2019 style): `HAM10000_metadata.csv`,
  `HAM10000_test_metadata.csv` (image_id, age, sex, localization), `images/`, and
  `held_out/ISIC2018_Test_GroundTruth.csv` (`image` + one-hot MEL NV BCC AKIEC BKL DF VASC).
* `--format isic2024` (binary triage, ISIC 2024 SLICE-3D file layout): `train-metadata.csv`
  (isic_id, patient_id, target, age_approx, sex, anatom_site_general + lesion colour/shape
  columns named like the TBP `tbp_lv_*` features), `test-metadata.csv`, `train-image/image/`,
  `test-image/image/`, `held_out/isic2024_test_truth.csv` (isic_id, target).
  HAM10000 is not ISIC 2024: target = malignant (mel, bcc, akiec), patient_id = HAM lesion_id
  (HAM has no patient id), and the `tbp_lv_*` columns are measured by this tool on the
  dermoscopic image (Otsu lesion mask; LAB colour inside and around it, area, eccentricity,
  border irregularity), not by a 3D total-body photography system. It exercises the ISIC 2024
  code path (group folds, tabular GBDT, patient-relative features, pAUC) on real images.

    python tools/make_ham_split.py --src ../shared/data/ham10000 --out output/ham10000_split --test-frac 0.2 --link
    python tools/make_ham_split.py --src ../shared/data/ham10000 --out output/isic2024_ham --format isic2024 --link
    # the shipped samples (a fixed number of lesions per class):
    python tools/make_ham_split.py --src ../shared/data/ham10000 --out input/ham10000_sample \
        --train-per-class nv=12,mel=10,bkl=10,bcc=10,akiec=8,df=6,vasc=6 \
        --test-per-class nv=4,mel=3,bkl=3,bcc=3,akiec=2,df=2,vasc=2

Data: HAM10000, CC BY-NC-SA 4.0, Tschandl P., Rosendahl C., Kittler H., "The HAM10000 dataset",
Sci. Data 5, 180161 (2018).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lib.core.io import write_csv  # noqa: E402
from lib.data.cache import read_rgb  # noqa: E402
from lib.data.formats import HAM_CLASSES, read_csv  # noqa: E402
from tools._common import require_empty, run_tool, setup_logging  # noqa: E402
from tools.split_common import choose_lesions, place_image, split_parser  # noqa: E402

log = logging.getLogger("make_ham_split")
MALIGNANT = ("mel", "bcc", "akiec")
SITE_2024 = {  # HAM localization -> ISIC 2024 anatom_site_general
    "scalp": "head/neck", "ear": "head/neck", "face": "head/neck", "neck": "head/neck",
    "back": "posterior torso", "trunk": "anterior torso", "chest": "anterior torso",
    "abdomen": "anterior torso", "upper extremity": "upper extremity", "hand": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity", "acral": "lower extremity",
    "genital": "anterior torso", "unknown": None}


def lesion_features(img: np.ndarray) -> dict[str, float]:
    """Colour and shape of the lesion in a dermoscopic RGB image, named like ISIC 2024 TBP columns.

    Lesion mask: Otsu on the blurred LAB lightness (darker side), the largest connected component;
    falls back to the central ellipse when the mask is degenerate. `*ext` = a ring around it."""
    h, w = img.shape[:2]
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    L = lab[..., 0] * (100 / 255)
    A, B = lab[..., 1] - 128, lab[..., 2] - 128
    blur = cv2.GaussianBlur(lab[..., 0].astype(np.uint8), (0, 0), 3)
    _, th = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    n, lab_cc, stats, _ = cv2.connectedComponentsWithStats(th)
    mask = np.zeros((h, w), np.uint8)
    if n > 1:
        big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask[lab_cc == big] = 1
    if not 0.01 < mask.mean() < 0.95:
        mask[:] = 0
        cv2.ellipse(mask, (w // 2, h // 2), (w // 4, h // 4), 0, 0, 360, 1, -1)
    ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)) - mask
    if ring.sum() == 0:
        ring = 1 - mask
    inside, outside = mask.astype(bool), ring.astype(bool)
    cnts, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cnts, key=cv2.contourArea)
    area, perim = float(mask.sum()), float(cv2.arcLength(c, True))
    m = cv2.moments(mask, binaryImage=True)
    cov = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / max(m["m00"], 1.0)
    ev = np.sort(np.linalg.eigvalsh(cov))
    ecc = float(np.sqrt(1 - ev[0] / ev[1])) if ev[1] > 0 else 0.0
    hull = cv2.convexHull(c)
    f = {"tbp_lv_L": L[inside].mean(), "tbp_lv_A": A[inside].mean(), "tbp_lv_B": B[inside].mean(),
         "tbp_lv_Lext": L[outside].mean(), "tbp_lv_Aext": A[outside].mean(), "tbp_lv_Bext": B[outside].mean(),
         "tbp_lv_stdL": L[inside].std(), "tbp_lv_stdLExt": L[outside].std(),
         "tbp_lv_areaMM2": area / (h * w), "tbp_lv_perimeterMM": perim / np.sqrt(h * w),
         "tbp_lv_area_perim_ratio": perim ** 2 / max(area, 1.0), "tbp_lv_eccentricity": ecc,
         "tbp_lv_norm_border": float(cv2.contourArea(hull)) / max(area, 1.0),
         "tbp_lv_color_std_mean": float(np.mean([A[inside].std(), B[inside].std(), L[inside].std()]))}
    f["tbp_lv_deltaL"] = f["tbp_lv_L"] - f["tbp_lv_Lext"]
    f["tbp_lv_deltaA"] = f["tbp_lv_A"] - f["tbp_lv_Aext"]
    f["tbp_lv_deltaB"] = f["tbp_lv_B"] - f["tbp_lv_Bext"]
    f["tbp_lv_deltaLB"] = float(np.hypot(f["tbp_lv_deltaL"], f["tbp_lv_deltaB"]))
    f["tbp_lv_C"] = float(np.hypot(f["tbp_lv_A"], f["tbp_lv_B"]))
    f["tbp_lv_H"] = float(np.degrees(np.arctan2(f["tbp_lv_B"], f["tbp_lv_A"])))
    return {k: round(float(v), 4) for k, v in f.items()}


def write_ham10000(m: pd.DataFrame, split: str, src: Path, out: Path, a: argparse.Namespace) -> None:
    """One side of the `ham10000` layout: images/, the metadata CSV, the held-out one-hot labels (test)."""
    for iid in tqdm(m["image_id"], desc=f"{split} images", leave=False):
        place_image(src / "images" / f"{iid}.jpg", out / "images" / f"{iid}.jpg", a.resize, a.link, 90)
    if split == "train":
        write_csv(m, out / "HAM10000_metadata.csv")
        return
    write_csv(m[["image_id", "age", "sex", "localization"]], out / "HAM10000_test_metadata.csv")
    gt = pd.DataFrame({"image": m["image_id"]})
    for c in HAM_CLASSES:
        gt[c] = (m["dx"].str.upper() == c).astype(float)
    write_csv(gt, out / "held_out" / "ISIC2018_Test_GroundTruth.csv")


def write_isic2024(m: pd.DataFrame, split: str, src: Path, out: Path, a: argparse.Namespace) -> None:
    """One side of the `isic2024` layout: <split>-image/image/, the metadata with the measured `tbp_lv_*`
    columns, the held-out targets (test)."""
    folder, rows = out / f"{split}-image" / "image", []
    for r in tqdm(m.itertuples(), total=len(m), desc=f"{split} images + lesion features", leave=False):
        place_image(src / "images" / f"{r.image_id}.jpg", folder / f"{r.image_id}.jpg", a.resize, a.link, 90)
        rows.append(lesion_features(read_rgb(src / "images" / f"{r.image_id}.jpg")))
    t = pd.DataFrame({"isic_id": m["image_id"], "patient_id": m["lesion_id"],
                      "target": m["dx"].isin(MALIGNANT).astype(int),
                      "age_approx": m["age"], "sex": m["sex"],
                      "anatom_site_general": m["localization"].map(SITE_2024)})
    t = pd.concat([t, pd.DataFrame(rows)], axis=1)
    if split == "train":
        write_csv(t, out / "train-metadata.csv")
    else:
        write_csv(t.drop(columns="target"), out / "test-metadata.csv")
        write_csv(t[["isic_id", "target"]], out / "held_out" / "isic2024_test_truth.csv")


def make_split(a: argparse.Namespace) -> None:
    src, out = Path(a.src), Path(a.out)
    meta = read_csv(src / "HAM10000_metadata.csv", "HAM10000 metadata", ["lesion_id", "image_id", "dx"])
    train_ids, test_ids = choose_lesions(meta.drop_duplicates("lesion_id")[["lesion_id", "dx"]], a)
    require_empty(out)
    write = write_ham10000 if a.format == "ham10000" else write_isic2024
    for split, ids in (("train", set(train_ids)), ("test", set(test_ids))):
        m = meta[meta["lesion_id"].isin(ids)].sort_values(["lesion_id", "image_id"]).reset_index(drop=True)
        write(m, split, src, out, a)
        log.info("%s: %d lesions, %d images", split, len(ids), len(m))


def main(argv: list[str] | None = None) -> int:
    p = split_parser(__doc__, "HAM10000 folder (HAM10000_metadata.csv + images)", "dx", 90)
    p.add_argument("--format", choices=["ham10000", "isic2024"], default="ham10000")
    a = p.parse_args(argv)
    setup_logging()
    return run_tool(lambda: make_split(a))


if __name__ == "__main__":
    sys.exit(main())
