"""Stage 01: read the data, cache images, encode metadata, assign folds, write the prepared tables."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import artifacts as A
from lib.core.artifacts import prep_dir, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, write_csv, write_json, write_parquet
from lib.data import cache, folds, formats

log = logging.getLogger(__name__)


def _cache_jobs(df: pd.DataFrame, mods: list[str], folder: Path, tag: str) -> tuple[list, dict]:
    jobs, paths = [], {}
    for m in mods:
        rel = [f"{A.IMAGES}/{tag}/{lid}__{m}.jpg" for lid in df[ID]]
        paths[m] = rel
        jobs += [(src, str(folder / r)) for src, r in zip(df[f"src_{m}"], rel)]
    return jobs, paths


def _finish(raw: formats.Raw, enc: dict, paths: dict, split: str, cfg: dict) -> pd.DataFrame:
    df = raw.table.reset_index(drop=True)
    out = pd.DataFrame({ID: df[ID].astype(str)})
    for m in raw.modalities:
        # cached: relative to the prep folder; mode none: the source file, made absolute (a relative
        # data.root would otherwise be read relative to the prep folder)
        out[f"path_{m}"] = paths[m] if cfg["cache"]["mode"] != "none" else [os.path.abspath(p) for p in df[f"src_{m}"]]
        if f"isic_{m}" in df:
            out[f"isic_{m}"] = df[f"isic_{m}"]
    ycols = formats.label_columns(raw.classes)
    if split == "train":
        for c in ycols:
            out[c] = df[c].astype(np.float32)
        y = df[ycols].to_numpy()
        if raw.task == "binary":  # the 0/1 target
            out["label"] = y[:, 0].astype(int)
        else:  # class index; multi-label rows have none
            out["label"] = np.where(y.sum(1) == 1, y.argmax(1), -1) if raw.task == "multiclass" else -1
    else:
        out["label"] = -1
    if raw.group_col:
        out["group"] = df[raw.group_col].astype(str)
    out = pd.concat([out, formats.apply_meta_encoders(df, enc, split)], axis=1)
    for c in formats.monet_columns(df):
        out[c] = df[c].astype(np.float32)
        if out[c].isna().any():
            log.warning("%s: %d rows lack %s (left as NaN)", split, int(out[c].isna().sum()), c)
    return out


def prepare_test(cfg: dict, raw: formats.Raw, enc: dict) -> pd.DataFrame:
    """A test release alone (the predict path of a bundle): its images cached like 01 caches them
    (`cache` settings of `cfg`, under `paths.prep`), its metadata encoded with `enc` (the encoders
    fitted on the training rows, from the bundle); returns the test lesion table (not written)."""
    tag = cache.cache_tag(cfg["cache"])
    jobs, paths = _cache_jobs(raw.table, raw.modalities, prep_dir(cfg), tag)
    cache.build_cache(jobs, cfg["cache"], cfg["cache"]["workers"])
    te = _finish(raw, enc, paths, "test", cfg)
    te["fold"] = -1
    return te


def run(cfg: dict, force_folds: bool = False) -> dict:
    """Run stage 01 and return the dataset description written to `<prep>/dataset.json`."""
    t0 = time.time()
    folder = prep_dir(cfg)
    train = formats.read_split(cfg, "train")
    test = formats.read_split(cfg, "test")
    if len(train.table) == 0:
        raise PipelineError("train split has no rows")
    if test is not None:
        both = set(train.table[ID]) & set(test.table[ID])
        if both:
            raise PipelineError(f"{len(both)} ids are in both train and test, e.g. {sorted(both)[:3]}")
    log.info("train: %d rows, %d classes %s; test: %s rows", len(train.table), len(train.classes),
             train.classes, "no" if test is None else len(test.table))
    tag = cache.cache_tag(cfg["cache"])
    jobs, paths = _cache_jobs(train.table, train.modalities, folder, tag)
    tjobs, tpaths = ([], {}) if test is None else _cache_jobs(test.table, test.modalities, folder, tag)
    cache.build_cache(jobs + tjobs, cfg["cache"], cfg["cache"]["workers"])

    enc = formats.fit_meta_encoders(train.table, train.num_cols, train.cat_cols)
    tr = _finish(train, enc, paths, "train", cfg)
    te = None if test is None else _finish(test, enc, tpaths, "test", cfg)
    for c in formats.label_columns(train.classes):
        if tr[c].sum() == 0:
            log.warning("class %s has no training lesions", c[2:])

    group = cfg["folds"]["group"] or (train.group_col and "group")
    fold_path = folder / A.FOLDS
    new = folds.make_folds(tr, train.classes, cfg["folds"]["n_splits"], cfg["folds"]["seed"], group)
    if fold_path.exists() and not force_folds:
        old = pd.read_csv(fold_path, dtype={ID: str})
        same = set(old[ID]) == set(new[ID]) and old.merge(new, on=ID).eval("fold_x == fold_y").all()
        if not same:
            raise PipelineError(f"{fold_path} exists with a different assignment (other data or fold settings); "
                                "later stages depend on it: pass --force-folds to rewrite it, or use another paths.prep")
    folds.check_folds(tr, new, group)
    summary = folds.fold_summary(tr.merge(new, on=ID), train.classes)
    log.info("lesions per class and fold:\n%s", summary.to_string())

    info = {
        "format": cfg["data"]["format"], "task": train.task, "classes": train.classes,
        "modalities": train.modalities, "n_train": len(tr), "n_test": 0 if te is None else len(te),
        "group": group, "cache_tag": tag, "folds": cfg["folds"],
        "meta_columns": formats.meta_columns(tr), "monet_columns": formats.monet_columns(tr),
    }
    write_parquet(tr, folder / A.PREP_TRAIN)
    if te is not None:
        write_parquet(te, folder / A.PREP_TEST)
    elif (folder / A.PREP_TEST).exists():
        (folder / A.PREP_TEST).unlink()
    write_json(enc, folder / A.META_ENCODERS)
    write_csv(new, fold_path)
    write_csv(summary.reset_index(), folder / A.FOLD_SUMMARY)
    save_config(cfg, folder)
    write_json(info, folder / A.DATASET)
    A.write_manifest(cfg, folder, "prepare", [], time.time() - t0, exp=folder.name,
                     extra={"data_root": str(cfg["data"]["root"])})
    return info


