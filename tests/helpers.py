"""Builders shared by the data / prepare / cache tests: copies of the shipped MILK10k sample (nested or
flat), tiny HAM10000 / ISIC 2019 / generic-CSV releases made from its images, small synthetic images,
CSV editing that keeps every value exactly as written (strings, blanks stay blank), and the import of
a script by its path (tools/*.py, kaggle/build_notebook.py: `load_file`)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
from PIL import Image

from lib.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "input" / "milk10k_sample"
TRAIN_META = "MILK10k_Training_Metadata.csv"
TRAIN_GT = "MILK10k_Training_GroundTruth.csv"
TEST_META = "MILK10k_Test_Metadata.csv"
TRAIN_IN = "MILK10k_Training_Input"
TEST_IN = "MILK10k_Test_Input"
N_TRAIN, N_TEST = 98, 32
MILK_CLASSES = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
PREP_TABLES = ["train.parquet", "test.parquet", "folds.csv", "dataset.json", "meta_encoders.json"]


# --------------------------------------------------------------------------- CSV editing
def read_raw(path: Path) -> pd.DataFrame:
    """Read a CSV as strings, blanks as NaN (the way lib.data reads it)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def write_raw(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False)


# --------------------------------------------------------------------------- MILK10k sample copies
def copy_sample(dst: Path, flat: bool = False, held_out: bool = True) -> Path:
    """Copy the shipped sample to `dst`. `flat`: images directly in `<Split>_Input/<isic_id>.jpg`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in SAMPLE.glob("*.csv"):
        shutil.copy2(f, dst / f.name)
    if held_out:
        shutil.copytree(SAMPLE / "held_out", dst / "held_out")
    for sub in (TRAIN_IN, TEST_IN):
        if flat:
            (dst / sub).mkdir()
            for img in (SAMPLE / sub).rglob("*.jpg"):
                shutil.copy2(img, dst / sub / img.name)
        else:
            shutil.copytree(SAMPLE / sub, dst / sub)
    return dst


def milk_cfg(root: Path, out: Path, *overrides: str) -> dict:
    """A resolved config reading `root` (MILK10k layout) and writing under `out`; small, single-worker cache."""
    return load_config(None, [f"data.root={root}", f"paths.output={out}", "cache.workers=1", "cache.size=64",
                              *overrides])


def prep_of(cfg: dict) -> Path:
    return Path(cfg["paths"]["prep"])


def image_of(root: Path, isic_id: str, split: str = "train") -> Path:
    hits = list((root / (TRAIN_IN if split == "train" else TEST_IN)).rglob(f"{isic_id}.jpg"))
    assert len(hits) == 1, (isic_id, hits)
    return hits[0]


def sample_derm_images(n: int) -> list[Path]:
    """The first `n` dermoscopic images of the sample's training split (sorted, deterministic)."""
    meta = read_raw(SAMPLE / TRAIN_META)
    ids = sorted(meta.loc[meta["image_type"] == "dermoscopic", "isic_id"])[:n]
    return [image_of(SAMPLE, i) for i in ids]


def other_test_release(dst: Path, drop: int = 3) -> tuple[Path, str]:
    """A second MILK10k test release made from the sample's (for `data.test_root` / `--test-data`): its
    last `drop` lesions dropped and the dermoscopic image of its first lesion replaced by the second
    lesion's (same id, another picture). Returns (release folder, the lesion whose image changed)."""
    meta = read_raw(SAMPLE / TEST_META)
    lesions = list(dict.fromkeys(meta["lesion_id"]))
    keep = lesions[:len(lesions) - drop]
    meta = meta[meta["lesion_id"].isin(keep)]
    dst.mkdir(parents=True, exist_ok=True)
    write_raw(meta, dst / TEST_META)
    for lid in keep:
        shutil.copytree(SAMPLE / TEST_IN / lid, dst / TEST_IN / lid)
    derm = meta[meta["image_type"] == "dermoscopic"].set_index("lesion_id")["isic_id"]
    changed, donor = keep[0], keep[1]
    shutil.copyfile(dst / TEST_IN / donor / f"{derm[donor]}.jpg", dst / TEST_IN / changed / f"{derm[changed]}.jpg")
    return dst, changed


# --------------------------------------------------------------------------- tiny other-format releases
HAM_ROWS = [  # (lesion_id, image_id, dx, age, sex, localization): 3 lesions with several images
    ("HAM_0000001", "ISIC_0024001", "nv", "45", "male", "back"),
    ("HAM_0000001", "ISIC_0024002", "nv", "45", "male", "back"),
    ("HAM_0000001", "ISIC_0024003", "nv", "45", "male", "back"),
    ("HAM_0000002", "ISIC_0024004", "mel", "70", "female", "face"),
    ("HAM_0000002", "ISIC_0024005", "mel", "70", "female", "face"),
    ("HAM_0000003", "ISIC_0024006", "bkl", "", "unknown", "unknown"),
    ("HAM_0000003", "ISIC_0024007", "bkl", "", "unknown", "unknown"),
    ("HAM_0000004", "ISIC_0024008", "nv", "30", "female", "trunk"),
    ("HAM_0000005", "ISIC_0024009", "nv", "35", "male", "lower extremity"),
    ("HAM_0000006", "ISIC_0024010", "mel", "60", "male", "back"),
    ("HAM_0000007", "ISIC_0024011", "bkl", "55", "female", "face"),
    ("HAM_0000008", "ISIC_0024012", "nv", "25", "female", "trunk"),
    ("HAM_0000009", "ISIC_0024013", "mel", "80", "male", "scalp"),
    ("HAM_0000010", "ISIC_0024014", "bkl", "65", "male", "back"),
    ("HAM_0000011", "ISIC_0024015", "bcc", "75", "female", "face"),
    ("HAM_0000012", "ISIC_0024016", "bcc", "72", "male", "face"),
    ("HAM_0000013", "ISIC_0024017", "bcc", "68", "male", "neck"),
]


def make_ham(dst: Path) -> Path:
    """A HAM10000-style release: metadata CSV + images split over two `part` folders."""
    dst.mkdir(parents=True, exist_ok=True)
    imgs = sample_derm_images(len(HAM_ROWS))
    for i, (row, src) in enumerate(zip(HAM_ROWS, imgs)):
        folder = dst / ("HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2")
        folder.mkdir(exist_ok=True)
        shutil.copy2(src, folder / f"{row[1]}.jpg")
    df = pd.DataFrame(HAM_ROWS, columns=["lesion_id", "image_id", "dx", "age", "sex", "localization"])
    df.insert(3, "dx_type", "histo")
    df.to_csv(dst / "HAM10000_metadata.csv", index=False)
    return dst


ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
ISIC2019_ROWS = [  # (image, class, age, site, lesion_id (blank = none), sex)
    ("ISIC_0000001", "MEL", "55.0", "anterior torso", "BCN_0000001", "male"),
    ("ISIC_0000002", "MEL", "55.0", "anterior torso", "BCN_0000001", "male"),
    ("ISIC_0000003", "NV", "30.0", "upper extremity", "", "female"),
    ("ISIC_0000004", "BCC", "", "head/neck", "BCN_0000002", "female"),
    ("ISIC_0000005", "AK", "70.0", "", "", "male"),
    ("ISIC_0000006", "SCC", "80.0", "head/neck", "BCN_0000003", ""),
]


def make_isic2019(dst: Path) -> Path:
    """An ISIC 2019-style release: one-hot GroundTruth (with UNK) + Metadata + image folder."""
    folder = dst / "ISIC_2019_Training_Input"
    folder.mkdir(parents=True)
    for (img, *_), src in zip(ISIC2019_ROWS, sample_derm_images(len(ISIC2019_ROWS))):
        shutil.copy2(src, folder / f"{img}.jpg")
    gt = pd.DataFrame({"image": [r[0] for r in ISIC2019_ROWS]})
    for c in [*ISIC2019_CLASSES, "UNK"]:
        gt[c] = [1.0 if r[1] == c else 0.0 for r in ISIC2019_ROWS]
    gt.to_csv(dst / "ISIC_2019_Training_GroundTruth.csv", index=False)
    meta = pd.DataFrame({"image": [r[0] for r in ISIC2019_ROWS], "age_approx": [r[2] for r in ISIC2019_ROWS],
                         "anatom_site_general": [r[3] for r in ISIC2019_ROWS],
                         "lesion_id": [r[4] for r in ISIC2019_ROWS], "sex": [r[5] for r in ISIC2019_ROWS]})
    meta.to_csv(dst / "ISIC_2019_Training_Metadata.csv", index=False)
    return dst


def make_generic(dst: Path, n: int = 12) -> Path:
    """A generic release: `imgs/<name>.jpg` + train.csv (id, image without extension, diagnosis,
    multi-hot columns, meta, patient) + test.csv."""
    (dst / "imgs").mkdir(parents=True)
    srcs = sample_derm_images(n + 4)
    for i, src in enumerate(srcs):
        shutil.copy2(src, dst / "imgs" / f"img{i:03d}.jpg")
    rng = np.random.default_rng(0)
    dx = np.array(["benign", "malignant", "other"])[np.arange(n) % 3]
    tr = pd.DataFrame({"case": [f"C{i:03d}" for i in range(n)], "image": [f"img{i:03d}" for i in range(n)],
                       "diagnosis": dx, "ulcer": (np.arange(n) % 2).astype(float),
                       "pigment": ((np.arange(n) + 1) % 2).astype(float),
                       "bleeding": (np.arange(n) % 3 == 0).astype(float),
                       "age": rng.integers(20, 80, n).astype(str), "site": np.array(["arm", "leg"])[np.arange(n) % 2],
                       "patient": [f"P{i // 2}" for i in range(n)]})
    tr.to_csv(dst / "train.csv", index=False)
    te = pd.DataFrame({"case": [f"T{i:03d}" for i in range(4)], "image": [f"img{n + i:03d}.jpg" for i in range(4)],
                       "age": ["50", "", "40", "90"], "site": ["arm", "foot", "leg", "arm"],
                       "patient": [f"Q{i}" for i in range(4)]})
    te.to_csv(dst / "test.csv", index=False)
    return dst


def generic_cfg(root: Path, out: Path, *overrides: str) -> dict:
    return load_config(None, [
        "data.format=generic", f"data.root={root}", f"paths.output={out}", "cache.workers=1", "cache.size=64",
        "data.generic.train_csv=train.csv", "data.generic.test_csv=test.csv", "data.generic.image_dir=imgs",
        "data.generic.id_col=case", "data.generic.meta_num_cols=[age]", "data.generic.meta_cat_cols=[site]",
        *overrides])


# --------------------------------------------------------------------------- synthetic images
def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random-ish but smooth RGB uint8 image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb(h, w, seed)).save(path, quality=95)
    return path


def write_truncated_jpeg(path: Path, src: Path) -> Path:
    """The first half of a real JPEG (a download cut short)."""
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------- scripts
def load_file(path: Path, name: str | None = None) -> ModuleType:
    """Import a script that is not a package module (tools/*.py, kaggle/build_notebook.py) from its path."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shifted_case(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot truth, probabilities) of a 3-class case whose good per-class cuts are far from 0.5
    (class 0 low, class 2 high): the threshold, remap and decision tests' shared data."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.2, 0.5, 0.3])
    truth = np.eye(3)[labels]
    centre = np.array([[0.15, 0.35], [0.35, 0.65], [0.6, 0.85]])  # (negative, positive) means
    probs = np.clip(centre[:, 0] + truth * (centre[:, 1] - centre[:, 0]) + rng.normal(0, 0.1, (n, 3)), 0, 1)
    return truth, probs
