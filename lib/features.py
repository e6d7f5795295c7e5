"""Frozen-encoder embeddings per lesion and modality, TTA-averaged, cached by encoder + preprocessing."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lib import backbones
from lib.config import exp_dir, prep_dir, save_config, torch_device
from lib.errors import PipelineError
from lib.images import EvalImages
from lib.io import ID, read_json, write_json, write_parquet
from lib.prepare import load_dataset
from lib.tta import apply_view, parse_views

log = logging.getLogger(__name__)


def encoder_spec(enc: dict, views: list[str], cache_tag: str, keep_views: bool = False) -> dict:
    """Everything that determines an encoder's embeddings (its cache key)."""
    pre = backbones.preprocess_spec(enc["arch"], enc["weights"])
    size = int(enc["size"] or pre["size"])
    spec = {"arch": enc["arch"], "weights": enc["weights"], "size": size,
            "mean": [float(v) for v in pre["mean"]], "std": [float(v) for v in pre["std"]],
            "views": views, "image_cache": cache_tag}
    if pre.get("resize_mode") == "squash":  # default (short side + center crop) is left out of the key
        spec["resize_mode"] = "squash"
    if keep_views:  # one column block per view instead of the view average
        spec["keep_views"] = True
    return spec


def spec_key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def emb_columns(name: str, modality: str, dim: int) -> list[str]:
    return [f"emb_{name}_{modality}_{i}" for i in range(dim)]


@torch.no_grad()
def embed_paths(model: torch.nn.Module, paths: list[str], spec: dict, device: str, batch_size: int,
                workers: int, desc: str, keep_views: bool = False) -> np.ndarray:
    """[N, F] embeddings averaged over the TTA views ([N, V, F] if keep_views)."""
    ds = EvalImages(paths, spec["size"], spec["mean"], spec["std"], spec.get("resize_mode", "shortest"))
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                    persistent_workers=False, prefetch_factor=4 if workers else None)
    out = []
    t0, n = time.time(), 0
    bar = tqdm(total=len(ds), desc=desc, unit="img", mininterval=2.0)
    for x in dl:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        v = torch.stack([model(apply_view(x, view)).float() for view in spec["views"]], 1)
        out.append((v if keep_views else v.mean(1)).cpu().numpy())
        n += len(x)
        bar.update(len(x))
        bar.set_postfix(img_s=f"{n * len(spec['views']) / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    return np.concatenate(out).astype(np.float32)


def extract_encoder(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Embeddings of one encoder for each split, from the shared cache or computed (and cached)."""
    views = parse_views(enc.get("tta") or cfg["features"]["tta"])
    spec = encoder_spec(enc, views, info["cache_tag"], bool(cfg["features"]["keep_views"]))
    folder = prep_dir(cfg) / "features" / f"{enc['name']}-{spec_key(spec)}"
    device = torch_device(cfg)
    model = None
    paths: dict[str, Path] = {}
    for split, df in tables.items():
        path = folder / f"{split}.parquet"
        paths[split] = path
        if path.exists():
            old = pd.read_parquet(path, columns=[ID])
            if list(old[ID]) == list(df[ID]):
                log.info("%s/%s: cached embeddings reused (%s)", enc["name"], split, path)
                continue
            log.info("%s/%s: cached embeddings are for other lesions; recomputing", enc["name"], split)
        if model is None:
            model = backbones.build_backbone(enc["arch"], enc["weights"], hub=enc["hub"]).eval().to(device)
            model = model.to(memory_format=torch.channels_last)
        cols: dict[str, np.ndarray] = {}
        t0 = time.time()
        for m in info["modalities"]:
            files = [str(prep_dir(cfg) / p) for p in df[f"path_{m}"]]
            keep = bool(cfg["features"]["keep_views"])
            e = embed_paths(model, files, spec, device, cfg["features"]["batch_size"],
                            _workers(cfg), f"{enc['name']} {split} {m}", keep_views=keep)
            per_view = [(f"{m}_{v}", e[:, i]) for i, v in enumerate(views)] if keep else [(m, e)]
            for tag, arr in per_view:
                for j, c in enumerate(emb_columns(enc["name"], tag, arr.shape[1])):
                    cols[c] = arr[:, j]
        n_img = len(df) * len(info["modalities"])
        dt = time.time() - t0
        out = pd.concat([df[[ID]].reset_index(drop=True), pd.DataFrame(cols)], axis=1)
        write_parquet(out, path)
        write_json({**spec, "name": enc["name"], "split": split, "n_images": n_img, "seconds": round(dt, 1),
                    "images_per_s": round(n_img * len(views) / dt, 2), "device": device,
                    "threads": torch.get_num_threads()}, folder / f"{split}.json")
        log.info("%s/%s: %d images x %d views in %.0fs (%.1f img/s)", enc["name"], split, n_img,
                 len(views), dt, n_img * len(views) / dt)
    return paths


def _workers(cfg: dict) -> int:
    w = int(cfg["features"]["workers"])
    return w if w >= 0 else max(1, (os.cpu_count() or 2) - 1)


def run(cfg: dict) -> None:
    """Stage 03: embeddings of every configured encoder into `output/<exp>/features/`."""
    if not cfg["features"]["encoders"] and not cfg["features"]["from_exps"]:
        raise PipelineError("features.encoders is empty: nothing to extract")
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    info, train, test = load_dataset(cfg)
    tables = {"train": train[[ID] + [f"path_{m}" for m in info["modalities"]]]}
    if test is not None:
        tables["test"] = test[[ID] + [f"path_{m}" for m in info["modalities"]]]
    out = exp_dir(cfg) / "features"
    out.mkdir(parents=True, exist_ok=True)
    for enc in cfg["features"]["encoders"]:
        for split, src in extract_encoder(cfg, enc, info, tables).items():
            _link(src, out / f"{enc['name']}_{split}.parquet")
            shutil.copyfile(src.with_suffix(".json"), out / f"{enc['name']}_{split}.json")
    if cfg["features"]["from_exps"]:
        from lib.train import extract_fold_features  # trained fold models: penultimate features

        for e in cfg["features"]["from_exps"]:
            extract_fold_features(cfg, e, info, train, test, out)
    save_config(cfg, out)


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
            from lib.io import merge_on_id

            out = merge_on_id(out, df, f"features {n} {split}")
    return out


def feature_info(cfg: dict, name: str, split: str = "train", exp: str | None = None) -> dict:
    folder = (exp_dir(cfg).parent / exp if exp else exp_dir(cfg)) / "features"
    return read_json(folder / f"{name}_{split}.json")


# ----------------------------------------------------------------------------- tabular
def patient_relative(x: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    """ISIC 2024-style "ugly duckling" features: each numeric column relative to the other rows of
    the same group (patient): `pat_diff_<c>` (value - patient mean), `pat_z_<c>` (z-score within the
    patient, 0 when the patient has one row or no spread), `pat_rank_<c>` (percentile rank within
    the patient), plus `pat_count` (rows of the patient). Uses no labels; NaN stays NaN.

    Rows of one group must come from one split and one fold (grouped folds) for these to be
    leak-free: statistics are computed over exactly the rows passed in."""
    if len(x) != len(groups):
        raise PipelineError(f"patient_relative: {len(x)} rows but {len(groups)} group ids")
    x = x.reset_index(drop=True).astype(np.float64)
    g = pd.Series(np.asarray(groups).astype(str))
    by = x.groupby(g.to_numpy())
    mean, std = by.transform("mean"), by.transform("std", ddof=0)
    cols: dict[str, np.ndarray] = {}
    for c in x.columns:
        d = (x[c] - mean[c]).to_numpy()
        s = std[c].to_numpy()
        cols[f"pat_diff_{c}"] = d
        cols[f"pat_z_{c}"] = np.where(s > 1e-12, d / np.where(s > 1e-12, s, 1.0), np.where(np.isnan(d), np.nan, 0.0))
        cols[f"pat_rank_{c}"] = by[c].rank(pct=True).to_numpy()
    cols["pat_count"] = g.map(g.value_counts()).to_numpy(dtype=np.float64)
    return pd.DataFrame(cols).astype(np.float32)
