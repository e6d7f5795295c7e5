"""Fitted stackers (`StackResult.fitted`, lib.tabular.stackers) on disk, and applied to new rows.

On disk (no pickle anywhere): `<folder>/stacker.json` (format version, the caller's extras such as the
fingerprint of the training inputs, the layout: classes, feature columns, blocks, heads, weights,
seeds, and per fold the names of its files) + one folder per fold, `fold{k}/`: `arrays.safetensors`
(imputer fill, scaler mean / scale, PCA mean / components, logistic regression arrays), XGBoost
boosters in XGBoost's UBJSON format and LightGBM boosters in LightGBM's text format
(`lib.core.artifacts.stacker_model_file`). Every file is written atomically and stacker.json last
(it is removed first), so a half-written folder has no stacker.json. `load_fitted` reads only the files
stacker.json names, plain names in the fold folders with the expected suffixes.

`lib.tabular.stacker_apply.predict_fitted` applies what `load_fitted` returns to new rows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import xgboost as xgb
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as dump_arrays

from lib.core import artifacts as A
from lib.core.errors import DataError, MissingArtifactError, PipelineError
from lib.core.io import atomic_path, read_json, write_json, write_text
from lib.tabular.stacker_apply import TREE_HEADS

log = logging.getLogger(__name__)

LAYOUT_KEYS = ("classes", "feats", "blocks", "pca_blocks", "heads", "weights", "renorm", "seeds", "n_folds")
PCA_ARRAYS = ("fill", "mean", "scale", "pca_mean", "components")
LR_ARRAYS = ("fill", "mean", "scale", "coef", "intercept")


# ----------------------------------------------------------------------------- save
def save_fitted(fitted: dict, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `fitted` under `folder` (see the module docstring); `extra` (JSON) goes into stacker.json.
    Returns the path of stacker.json."""
    folder = Path(folder)
    (folder / A.STACKER_JSON).unlink(missing_ok=True)   # never a stacker.json naming half-written files
    folds = [_save_fold(fold, folder, k) for k, fold in enumerate(fitted["folds"])]
    doc = {"format_version": A.STACKER_FORMAT_VERSION, **(extra or {}),
           **{key: fitted[key] for key in LAYOUT_KEYS}, "folds": folds}
    return write_json(doc, folder / A.STACKER_JSON)


def _write_bytes(data: bytes, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _save_model(head: str, model: Any, folder: Path, si: int, ci: int) -> dict:
    """One booster as its library's own file ({"file"}), or a constant prior ({"prior"})."""
    if isinstance(model, (float, int, np.floating)):
        return {"prior": float(model)}
    name = A.stacker_model_file(head, si, ci)
    if head == "xgb":
        _write_bytes(bytes(model.save_raw(raw_format="ubj")), folder / name)
    else:
        write_text(model.model_to_string(), folder / name)
    return {"file": name}


def _save_fold(fold: dict, root: Path, k: int) -> dict:
    """fold{k}/: the arrays in one safetensors file, one file per booster; returns its JSON part."""
    d = root / A.fold_name(k)
    arrays: dict[str, np.ndarray] = {}
    blocks = {}
    for i, (name, p) in enumerate(fold["blocks"].items()):
        blocks[name] = {"pca": bool(p["pca"]), "names": list(p["names"])}
        if p["pca"]:
            arrays.update({f"block{i}.{key}": np.ascontiguousarray(p[key], np.float64) for key in PCA_ARRAYS})
            blocks[name]["arrays"] = f"block{i}"
    heads: dict[str, Any] = {}
    for h, part in fold["heads"].items():
        if h in TREE_HEADS:
            heads[h] = [[_save_model(h, m, d, si, ci) for ci, m in enumerate(row)] for si, row in enumerate(part)]
            continue
        targets = []
        for t, tp in enumerate(part["targets"]):
            if "prior" in tp:
                targets.append({"prior": tp["prior"]})
                continue
            arrays.update({f"lr{t}.{key}": np.ascontiguousarray(tp[key], np.float64) for key in LR_ARRAYS})
            targets.append({"arrays": f"lr{t}", "classes": [int(c) for c in tp["classes"]]})
        heads[h] = {"multinomial": bool(part["multinomial"]), "targets": targets}
    _write_bytes(dump_arrays(arrays), d / A.STACKER_ARRAYS)
    return {"dir": A.fold_name(k), "arrays": A.STACKER_ARRAYS, "names": list(fold["names"]),
            "blocks": blocks, "heads": heads}


# ----------------------------------------------------------------------------- load
def read_header(folder: str | Path) -> dict:
    """stacker.json of a fitted-stacker folder: MissingArtifactError when absent, PipelineError naming the
    file when it has another format version."""
    p = Path(folder) / A.STACKER_JSON
    if not p.exists():
        raise MissingArtifactError(f"{p} not found: run 04_stack.py first (it writes the fitted stackers)")
    doc = read_json(p)
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != A.STACKER_FORMAT_VERSION:
        raise PipelineError(f"{p}: fitted-stacker format version {version!r}, this code reads "
                            f"{A.STACKER_FORMAT_VERSION}: rerun 04_stack.py")
    return doc


def load_fitted(folder: str | Path) -> dict:
    """The fitted stackers saved by `save_fitted` (the layout of `StackResult.fitted`, plus stacker.json's
    extras). Reads stacker.json and only the files it names."""
    folder = Path(folder)
    doc = read_header(folder)
    try:
        folds = [_load_fold(folder, k, fd) for k, fd in enumerate(doc["folds"])]
        if len(folds) != doc["n_folds"]:
            raise ValueError(f"{len(folds)} folds listed, n_folds {doc['n_folds']}")
    except (KeyError, TypeError, ValueError, IndexError, SafetensorError, xgb.core.XGBoostError,
            lgb.basic.LightGBMError) as e:
        raise DataError(f"{folder / A.STACKER_JSON}: malformed fitted stacker ({type(e).__name__}: {e}): "
                        "rerun 04_stack.py") from None
    return {**{key: v for key, v in doc.items() if key not in ("folds", "format_version")}, "folds": folds}


def _named(folder: Path, name: Any, suffixes: tuple[str, ...]) -> Path:
    """`folder/name` for a plain file name with one of `suffixes` (never a path, never another file)."""
    ok = isinstance(name, str) and name == Path(name).name and not name.startswith(".") and name.endswith(suffixes)
    if not ok:
        raise PipelineError(f"{folder.parent / A.STACKER_JSON}: names {name!r} in {folder.name}/, not a fitted-stacker "
                            f"file ({', '.join(suffixes)})")
    p = folder / name
    if not p.is_file():
        raise MissingArtifactError(f"{p} not found (named by {folder.parent / A.STACKER_JSON}): rerun 04_stack.py")
    return p


def _load_model(head: str, part: dict, folder: Path) -> Any:
    if "prior" in part:
        return float(part["prior"])
    p = _named(folder, part["file"], (f".{A.STACKER_MODEL_EXT[head]}",))
    if head == "xgb":
        booster = xgb.Booster()
        booster.load_model(bytearray(p.read_bytes()))
        booster.set_param({"device": "cpu"})
        return booster
    return lgb.Booster(model_str=p.read_text())


def _load_fold(root: Path, k: int, fd: dict) -> dict:
    if fd["dir"] != A.fold_name(k):
        raise ValueError(f"fold {k} is in {fd['dir']!r}")
    d = root / fd["dir"]
    arrays = load_arrays(_named(d, fd["arrays"], (".safetensors",)).read_bytes())
    blocks = {}
    for name, b in fd["blocks"].items():
        blocks[name] = {"pca": bool(b["pca"]), "names": list(b["names"])}
        if b["pca"]:
            blocks[name].update({key: arrays[f"{b['arrays']}.{key}"] for key in PCA_ARRAYS})
    heads: dict[str, Any] = {}
    for h, part in fd["heads"].items():
        if h in TREE_HEADS:
            heads[h] = [[_load_model(h, m, d) for m in row] for row in part]
            continue
        targets = [t if "prior" in t else {**{key: arrays[f"{t['arrays']}.{key}"] for key in LR_ARRAYS},
                                           "classes": [int(c) for c in t["classes"]]} for t in part["targets"]]
        heads[h] = {"multinomial": bool(part["multinomial"]), "targets": targets}
    return {"blocks": blocks, "names": list(fd["names"]), "heads": heads}
