"""Readers for MILK10k, HAM10000 / ISIC 2019, ISIC 2024 and generic CSVs -> one lesion table.

A reader returns a `Raw` record: one row per lesion with `lesion_id`, `src_<modality>` (source
image path), `y_<CLASS>` one-hot/multi-hot labels (train only), raw metadata columns and MONET
scores. `encode_metadata` turns raw metadata into `meta_*` features with encoders fitted on train.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID

log = logging.getLogger(__name__)

MILK_CLASSES = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
HAM_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
MILK_MODALITIES = {"dermoscopic": "dermoscopic", "clinical: close-up": "clinical"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Raw:
    """A split read from disk, before encoding."""
    table: pd.DataFrame
    classes: list[str]
    modalities: list[str]
    task: str
    num_cols: list[str] = field(default_factory=list)   # raw numeric metadata
    cat_cols: list[str] = field(default_factory=list)   # raw categorical metadata
    group_col: str | None = None


def read_csv(path: Path, what: str, required: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV with clear errors: missing, empty, unparsable, missing columns."""
    if not path.exists():
        raise PipelineError(f"{what}: file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{what}: {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PipelineError(f"{what}: {path} is not a valid CSV: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise PipelineError(f"{what}: {path} has a header but no rows")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required or [] if c not in df.columns]
    if missing:
        raise PipelineError(f"{what}: {path} lacks columns {missing} (has {list(df.columns)[:12]})")
    return df


def check_unique(df: pd.DataFrame, col: str, path: Path) -> None:
    dup = df[df[col].duplicated(keep=False)]
    if len(dup):
        rows = (dup.index[:4] + 2).tolist()
        raise PipelineError(f"{path}: duplicate {col} '{dup[col].iloc[0]}' (CSV lines {rows})")


def to_numeric(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    """Convert columns in place; non-numeric entries are an error naming row and column."""
    for c in cols:
        vals = pd.to_numeric(df[c], errors="coerce")
        bad = vals.isna() & df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise PipelineError(f"{path}: column {c} line {i + 2}: '{df[c].iloc[i]}' is not a number")
        df[c] = vals


def onehot_labels(gt: pd.DataFrame, id_col: str, path: Path, known: list[str] | None,
                  multilabel: bool = False, allow_none: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Validate a one-hot ground-truth table -> (`lesion_id` + `y_<CLASS>`, classes).

    `allow_none`: rows without a positive are valid (binary: the negatives)."""
    classes = [c for c in gt.columns if c != id_col]
    if known is not None:
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise PipelineError(f"{path}: unknown class columns {unknown}; expected {known}")
        classes = [c for c in known if c in classes]
    to_numeric(gt, classes, path)
    y = gt[classes].fillna(0).to_numpy(dtype=float)
    if not np.isin(y, (0.0, 1.0)).all():
        i = int(np.flatnonzero(~np.isin(y, (0.0, 1.0)).all(1))[0])
        raise PipelineError(f"{path}: line {i + 2} ({gt[id_col].iloc[i]}): labels must be 0 or 1")
    n = y.sum(1)
    empty = (n == 0) & (not allow_none)
    bad = np.flatnonzero(empty if multilabel else empty | (n > 1))
    if len(bad):
        i = int(bad[0])
        what = "no label" if n[i] == 0 else f"{int(n[i])} labels"
        raise PipelineError(f"{path}: line {i + 2} ({gt[id_col].iloc[i]}) has {what}; "
                            f"{'at least' if multilabel else 'exactly'} one is required")
    out = pd.DataFrame({ID: gt[id_col].astype(str).to_numpy()})
    for j, c in enumerate(classes):
        out[f"y_{c}"] = y[:, j]
    return out, classes


def labels_from_names(df: pd.DataFrame, col: str, classes: list[str] | None, path: Path,
                      upper: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """A single string label column -> one-hot `y_<CLASS>` columns."""
    names = df[col].astype(str).str.strip()
    names = names.str.upper() if upper else names
    if df[col].isna().any():
        i = int(np.flatnonzero(df[col].isna().to_numpy())[0])
        raise PipelineError(f"{path}: line {i + 2}: empty label in column {col}")
    classes = classes or sorted(names.unique())
    unknown = sorted(set(names) - set(classes))
    if unknown:
        i = int(np.flatnonzero(names.isin(unknown).to_numpy())[0])
        raise PipelineError(f"{path}: line {i + 2}: unknown class '{names.iloc[i]}' (known: {classes})")
    out = pd.DataFrame(index=df.index)
    for c in classes:
        out[f"y_{c}"] = (names == c).astype(float)
    return out, classes


def index_images(folder: Path) -> dict[str, Path]:
    """Map image file stem -> path for every image below `folder` (nested or flat layouts)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def resolve_images(ids: pd.Series, index: dict[str, Path], folder: Path, what: str) -> list[str]:
    """Look up each image id; error naming the first missing ones."""
    missing = [i for i in ids if i not in index]
    if missing:
        raise PipelineError(f"{what}: {len(missing)} image(s) missing under {folder}, e.g. "
                            f"{missing[:3]} (expected e.g. {folder}/<lesion_id>/{missing[0]}.jpg)")
    return [str(index[i]) for i in ids]


def find_dir(root: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise PipelineError(f"{what}: none of {names} found in {root}")


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


# --------------------------------------------------------------------------- ISIC 2024 (binary)
ISIC2024_NUM = ["age_approx", "clin_size_long_diam_mm", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext",
                "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext",
                "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean", "tbp_lv_deltaA",
                "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity",
                "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color",
                "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt",
                "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]


def read_isic2024(root: Path, split: str, classes: list[str] | None = None) -> Raw:
    """ISIC 2024 SLICE-3D: `train-metadata.csv` (isic_id, patient_id, target, TBP features) + images."""
    path = root / ("train-metadata.csv" if split == "train" else "test-metadata.csv")
    df = read_csv(path, "ISIC 2024 metadata", ["isic_id", "patient_id"] + (["target"] if split == "train" else []))
    check_unique(df, "isic_id", path)
    out = pd.DataFrame({ID: df["isic_id"].astype(str), "group": df["patient_id"].astype(str).to_numpy()})
    folder = find_dir(root, [f"{'train' if split == 'train' else 'test'}-image/image", "train-image", "images"],
                      "ISIC 2024 images")
    out["src_dermoscopic"] = resolve_images(out[ID], index_images(folder), folder, f"ISIC 2024 {split}")
    num = [c for c in ISIC2024_NUM if c in df.columns]
    to_numeric(df, num, path)
    cats = [c for c in ["sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location"] if c in df.columns]
    for c in num + cats:
        out[c] = df[c].to_numpy()
    if split == "train":
        to_numeric(df, ["target"], path)
        t = df["target"].to_numpy()
        if not np.isin(t, (0, 1)).all():
            raise PipelineError(f"{path}: target must be 0 or 1")
        out["y_malignant"] = t.astype(float)
    return Raw(out, ["malignant"], ["dermoscopic"], "binary", num, cats, "group")


# --------------------------------------------------------------------------- generic CSV
def read_generic(root: Path, split: str, g: dict, classes: list[str] | None, task: str | None) -> Raw:
    """A CSV with an id column, image column(s) per modality, a label column or label columns."""
    csv = g["train_csv" if split == "train" else "test_csv"]
    if not csv:
        raise PipelineError(f"data.generic.{split}_csv is not set")
    path = root / csv
    img_cols = dict(g["image_cols"])
    need = [g["id_col"], *img_cols.values(), *g["meta_num_cols"], *g["meta_cat_cols"]]
    if split == "train":
        need += list(g["label_cols"] or ([g["label_col"]] if g["label_col"] else []))
        need += [g["group_col"]] if g["group_col"] else []
    df = read_csv(path, "generic CSV", need)
    check_unique(df, g["id_col"], path)
    out = pd.DataFrame({ID: df[g["id_col"]].astype(str).to_numpy()})
    folder = root / (g["image_dir"] or "")
    for mod, col in img_cols.items():
        srcs = []
        for i, v in enumerate(df[col]):
            p = Path(str(v))
            p = p if p.is_absolute() else folder / p
            if not p.suffix:
                p = p.with_suffix(".jpg")
            if pd.isna(v) or not p.exists():
                raise PipelineError(f"{path}: line {i + 2}: image for {mod} not found: {p}")
            srcs.append(str(p))
        out[f"src_{mod}"] = srcs
    task = task or ("multilabel" if g["label_cols"] and len(g["label_cols"]) > 1 else "multiclass")
    if split == "train":
        if g["label_cols"]:
            if task == "binary" and len(g["label_cols"]) != 1:
                raise PipelineError(f"data.generic.label_cols: a binary task takes one 0/1 column (the positive "
                                    f"class), got {list(g['label_cols'])}")
            y, classes = onehot_labels(df[[g["id_col"], *g["label_cols"]]].copy(), g["id_col"], path,
                                       classes or list(g["label_cols"]), multilabel=task == "multilabel",
                                       allow_none=task == "binary")
            out = out.merge(y, on=ID, how="left", validate="one_to_one")
        elif g["label_col"]:
            if task == "binary":
                raise PipelineError("data.generic: a binary task takes label_cols: [<positive class>] "
                                    "(one 0/1 column), not label_col")
            y, classes = labels_from_names(df, g["label_col"], classes, path, upper=False)
            out = pd.concat([out, y.reset_index(drop=True)], axis=1)
        else:
            raise PipelineError("data.generic: set label_col (class names) or label_cols (one-hot / multi-hot)")
    elif not classes:
        raise PipelineError("data.classes must be set for a generic test split")
    to_numeric(df, list(g["meta_num_cols"]), path)
    for c in [*g["meta_num_cols"], *g["meta_cat_cols"]]:
        out[c] = df[c].to_numpy()
    group = None
    if g["group_col"] and g["group_col"] in df.columns:  # required for train; optional in a test CSV
        out["group"] = df[g["group_col"]].astype(str).to_numpy()
        group = "group"
    return Raw(out, list(classes), list(img_cols), task, list(g["meta_num_cols"]), list(g["meta_cat_cols"]), group)


def read_split(cfg: dict, split: str) -> Raw | None:
    """Read the train split (required) or the test split (None when absent)."""
    d = cfg["data"]
    root = Path(d["root"] if split == "train" else (d["test_root"] or d["root"]))
    if not root.is_dir():
        raise PipelineError(f"data folder not found: {root}")
    fmt = d["format"]
    if split == "test" and not _has_test(root, fmt, d):
        return None
    if fmt == "milk10k":
        raw = read_milk10k(root, split, d["classes"])
    elif fmt == "ham10000":
        raw = read_ham10000(root, split, d["classes"])
    elif fmt == "isic2019":
        raw = read_isic2019(root, split, d["classes"])
    elif fmt == "isic2024":
        raw = read_isic2024(root, split, d["classes"])
    else:
        raw = read_generic(root, split, d["generic"], d["classes"], d["task"])
    if d["task"]:
        raw.task = d["task"]
    if raw.task == "binary" and len(raw.classes) != 1:
        raise PipelineError(f"data.task binary needs exactly one class (the positive one), got {raw.classes}")
    return raw


def _has_test(root: Path, fmt: str, d: dict) -> bool:
    names = {"milk10k": "MILK10k_Test_Metadata.csv", "ham10000": "HAM10000_test_metadata.csv",
             "isic2019": "ISIC_2019_Test_Metadata.csv", "isic2024": "test-metadata.csv"}
    if fmt == "generic":
        return bool(d["generic"]["test_csv"])
    return (root / names[fmt]).exists()


# --------------------------------------------------------------------------- metadata encoding
def fit_meta_encoders(train: pd.DataFrame, num_cols: list[str], cat_cols: list[str]) -> dict:
    """Numeric: mean/std on train; categorical: train levels (+ 'unknown'). Fitted on train only."""
    enc: dict = {"num": {}, "cat": {}}
    for c in num_cols:
        v = pd.to_numeric(train[c], errors="coerce")
        std = float(v.std()) if v.notna().sum() > 1 else 1.0
        enc["num"][c] = {"mean": float(v.mean()) if v.notna().any() else 0.0, "std": std if std > 0 else 1.0}
    for c in cat_cols:  # a literal 'unknown' level (HAM10000) is the unknown column, not a level of its own
        enc["cat"][c] = sorted(set(train[c].dropna().astype(str).unique().tolist()) - {"unknown"})
    return enc


def apply_meta_encoders(df: pd.DataFrame, enc: dict, split: str) -> pd.DataFrame:
    """Raw metadata -> `meta_*` columns (scaled numbers + missing flags, one-hot with unknown)."""
    cols: dict[str, np.ndarray] = {}
    for c, s in enc["num"].items():
        v = pd.to_numeric(df[c], errors="coerce")
        miss = v.isna()
        if miss.any():
            log.warning("%s: %d of %d rows lack '%s' (encoded as mean + missing flag)", split, int(miss.sum()), len(v), c)
        cols[f"meta_{c}"] = ((v.fillna(s["mean"]) - s["mean"]) / s["std"]).to_numpy(dtype=np.float32)
        cols[f"meta_{c}_missing"] = miss.to_numpy(dtype=np.float32)
    for c, levels in enc["cat"].items():
        v = df[c].astype("string")
        miss = v.isna()
        if miss.any():
            log.warning("%s: %d of %d rows lack '%s' (encoded as unknown)", split, int(miss.sum()), len(v), c)
        v = v.fillna("unknown").astype(str)
        levels = [lv for lv in levels if lv != "unknown"]
        for lv in levels:
            cols[f"meta_{c}_{lv}"] = (v == lv).to_numpy(dtype=np.float32)
        cols[f"meta_{c}_unknown"] = (~v.isin(levels)).to_numpy(dtype=np.float32)
    return pd.DataFrame(cols, index=df.index)


# --------------------------------------------------------------------------- loading prepared tables
def meta_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("meta_")]


def monet_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("monet_")]


def label_columns(classes: list[str]) -> list[str]:
    return [f"y_{c}" for c in classes]
