"""Where every artifact lives and how a stage reads another experiment's outputs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import (
    ID,
    assert_same_ids,
    merge_on_id,
    read_json,
    read_table,
    write_yaml,
)


def exp_dir(cfg: dict) -> Path:
    """`<paths.output>/<exp>/`."""
    return Path(cfg["paths"]["output"]) / str(cfg["exp"])


def prep_dir(cfg: dict) -> Path:
    return Path(cfg["paths"]["prep"])


def save_config(cfg: dict, folder: str | Path, name: str = "config.yaml") -> Path:
    """Save the resolved config next to the artifacts it produced."""

    return write_yaml(cfg, Path(folder) / name)


def load_features(cfg: dict, names: list[str], split: str, exp: str | None = None) -> pd.DataFrame | None:
    """Read `output/<exp>/features/<name>_<split>.parquet` for each name and join on lesion_id."""
    folder = (exp_dir(cfg).parent / exp if exp else exp_dir(cfg)) / "features"
    out = None
    for n in names:
        p = folder / f"{n}_{split}.parquet"
        if not p.exists():
            if split == "test":
                return None
            raise PipelineError(f"{p} not found: run 03_extract_features.py for encoder '{n}' first")
        df = pd.read_parquet(p)
        if out is None:
            out = df
        else:

            out = merge_on_id(out, df, f"features {n} {split}")
    return out


def feature_info(cfg: dict, name: str, split: str = "train", exp: str | None = None) -> dict:
    folder = (exp_dir(cfg).parent / exp if exp else exp_dir(cfg)) / "features"
    return read_json(folder / f"{name}_{split}.json")


def load_member(cfg: dict, exp: str, train: pd.DataFrame, test: pd.DataFrame | None,
                classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A member's OOF and test probabilities, rows in train/test order, ids asserted."""

    folder = exp_dir(cfg).parent / exp
    oof = read_table(folder / "oof.parquet")
    missing = [c for c in classes if c not in oof.columns]
    if missing:
        raise PipelineError(f"{folder}/oof.parquet lacks class columns {missing}")
    assert_same_ids(train, oof, f"member {exp}: OOF vs train lesions")
    oof = oof.set_index(ID).loc[train[ID].to_numpy()].reset_index()[[ID, *classes]]
    te = None
    if test is not None:
        te = read_table(folder / "test.parquet")
        assert_same_ids(test, te, f"member {exp}: test predictions vs test lesions")
        te = te.set_index(ID).loc[test[ID].to_numpy()].reset_index()[[ID, *classes]]
    return oof, te


def fold_dir(cfg: dict, k: int, exp: str | None = None) -> Path:
    base = exp_dir(cfg) if exp is None else Path(cfg["paths"]["output"]) / exp
    return base / f"fold{k}"
