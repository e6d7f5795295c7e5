"""Reading what stage 01 wrote: the lesion tables, their folds and the dataset description."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.artifacts import prep_dir
from lib.core.errors import PipelineError
from lib.core.io import ID, read_json, read_table
from lib.data import folds


def load_dataset(cfg: dict) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """(dataset info, train table with `fold` from folds.csv, test table or None) for later stages."""
    folder = prep_dir(cfg)
    if not (folder / "dataset.json").exists():
        raise PipelineError(f"{folder}/dataset.json not found: run 01_preprocess.py with the same data first")
    info = read_json(folder / "dataset.json")
    tr = read_table(folder / "train.parquet")
    fo = read_table(folder / "folds.csv")
    folds.check_folds(tr, fo, info.get("group"))
    tr = tr.merge(fo, on=ID, how="left", validate="one_to_one")
    te = read_table(folder / "test.parquet") if (folder / "test.parquet").exists() else None
    if te is not None:
        te["fold"] = -1
    return info, tr, te


def image_path(cfg: dict, rel: str) -> Path:
    """Absolute path of a cached image stored relative to the prep folder."""
    return prep_dir(cfg) / rel
