"""Reading what stage 01 wrote: the lesion tables, their folds and the dataset description."""
from __future__ import annotations

import pandas as pd

from lib.core.artifacts import DATASET, FOLDS, PREP_TEST, PREP_TRAIN, prep_dir
from lib.core.errors import PipelineError
from lib.core.io import ID, read_json
from lib.data import folds


def load_dataset(cfg: dict) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """(dataset info, train table with `fold` from folds.csv, test table or None) for later stages."""
    folder = prep_dir(cfg)
    if not (folder / DATASET).exists():
        raise PipelineError(f"{folder / DATASET} not found: run 01_preprocess.py with the same data first")
    info = read_json(folder / DATASET)
    tr = pd.read_parquet(folder / PREP_TRAIN)
    fo = pd.read_csv(folder / FOLDS, dtype={ID: str})
    folds.check_folds(tr, fo, info.get("group"))
    tr = tr.merge(fo, on=ID, how="left", validate="one_to_one")
    te = pd.read_parquet(folder / PREP_TEST) if (folder / PREP_TEST).exists() else None
    if te is not None:
        te["fold"] = -1
    return info, tr, te
