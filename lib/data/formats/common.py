"""Shared reader helpers: the `Raw` record, CSV reading with clear errors, label checks, image lookup."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID

log = logging.getLogger(__name__)

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
        missing = [c for c in known if c not in classes]
        if missing:  # named here: left to the row check, it would read as a row with no label
            raise PipelineError(f"{path} lacks class column{'s' if len(missing) > 1 else ''} {missing} "
                                f"(expected {known}; has {list(gt.columns)[:14]})")
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
