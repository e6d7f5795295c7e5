"""Reading what stage 01 wrote: the lesion tables, their folds and the dataset description; and the
fingerprint of a table's rows (ids + image contents + chosen columns) that keys every test-side cache."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from lib.core.artifacts import DATASET, FOLDS, PREP_TEST, PREP_TRAIN, prep_dir
from lib.core.errors import PipelineError
from lib.core.io import ID, read_json, read_table
from lib.data import folds
from lib.data.cache import image_sha1

MODEL_INPUTS = ("meta_", "monet_")   # column prefixes a model reads besides the images


def load_dataset(cfg: dict) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """(dataset info, train table with `fold` from folds.csv, test table or None) for later stages."""
    folder = prep_dir(cfg)
    if not (folder / DATASET).exists():
        raise PipelineError(f"{folder / DATASET} not found: run 01_preprocess.py with the same data first")
    info = read_json(folder / DATASET)
    tr = read_table(folder / PREP_TRAIN)
    fo = read_table(folder / FOLDS)
    folds.check_folds(tr, fo, info.get("group"))
    tr = tr.merge(fo, on=ID, how="left", validate="one_to_one")
    te = read_table(folder / PREP_TEST) if (folder / PREP_TEST).exists() else None
    if te is not None:
        te["fold"] = -1
    return info, tr, te


def image_digests(folder: str | Path, paths: Iterable[str]) -> list[str]:
    """sha1 of each image file (`paths` relative to the prep folder, or absolute), in order."""
    return [image_sha1(str(Path(folder) / p)) for p in paths]


def rows_fingerprint(ids: Iterable[str], digests: dict[str, list[str]], values: pd.DataFrame | None = None) -> str:
    """sha1 (40 hex) of a table's rows in order: each row's id and its images' digests (one list per
    modality, `image_digests`), then the values of `values`' columns (None: images only). Changes when an
    id, the row order, an image's bytes or one of the values changes."""
    ids = [str(i) for i in ids]
    mods = list(digests)
    bad = [m for m in mods if len(digests[m]) != len(ids)]
    if bad:
        raise ValueError(f"rows_fingerprint: {len(ids)} ids but other counts of digests for {bad}")
    cols = [] if values is None else [str(c) for c in values.columns]
    h = hashlib.sha1(json.dumps({"modalities": mods, "columns": cols}).encode())
    for row in zip(ids, *(digests[m] for m in mods)):
        h.update(("\t".join(row) + "\n").encode())
    if cols:
        if len(values) != len(ids):
            raise ValueError(f"rows_fingerprint: {len(ids)} ids but {len(values)} rows of values")
        h.update(pd.util.hash_pandas_object(values.reset_index(drop=True), index=False).to_numpy().tobytes())
    return h.hexdigest()


def model_inputs(df: pd.DataFrame) -> list[str]:
    """The columns of a lesion table a model reads besides its images (`meta_*`, `monet_*`)."""
    return [c for c in df.columns if str(c).startswith(MODEL_INPUTS)]


def table_fingerprint(cfg: dict, info: dict, df: pd.DataFrame, columns: Iterable[str] = ()) -> str:
    """`rows_fingerprint` of a lesion table read by `load_dataset`: its ids, the cached images of every
    modality (files under the prep folder) and the values of `columns` (e.g. `model_inputs(df)`)."""
    folder = prep_dir(cfg)
    digests = {m: image_digests(folder, df[f"path_{m}"]) for m in info["modalities"]}
    cols = list(columns)
    return rows_fingerprint(df[ID], digests, df[cols] if cols else None)
