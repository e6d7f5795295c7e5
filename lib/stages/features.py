"""Frozen-encoder embeddings per lesion and modality, TTA-averaged, cached by encoder + preprocessing."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.core import artifacts as A
from lib.core.artifacts import prep_dir, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, write_json, write_parquet
from lib.core.runtime import torch_device
from lib.data.dataset import load_dataset
from lib.training.inference import fold_logit_features
from lib.vision import backbones
from lib.vision.embed import emb_columns, embed_paths, encoder_spec, spec_key
from lib.vision.tta import parse_views

log = logging.getLogger(__name__)


def extract_encoder(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Embeddings of one encoder for each split, from the shared cache or computed (and cached)."""
    views = parse_views(enc.get("tta") or cfg["features"]["tta"])
    spec = encoder_spec(enc, views, info["cache_tag"], bool(cfg["features"]["keep_views"]))
    folder = prep_dir(cfg) / A.FEATURES / f"{enc['name']}-{spec_key(spec)}"
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
    """Stage 03: embeddings of every configured encoder into `output/<exp>/features/` (+ its manifest)."""
    t0 = time.time()
    if not cfg["features"]["encoders"] and not cfg["features"]["from_exps"]:
        if not cfg["stack"]["features"]:  # a metadata-only stack (SCIN questionnaire): nothing to do
            log.info("features: no encoders and no stack.features: nothing to extract")
            return
        raise PipelineError("features.encoders is empty: nothing to extract")
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    info, train, test = load_dataset(cfg)
    tables = {"train": train[[ID] + [f"path_{m}" for m in info["modalities"]]]}
    if test is not None:
        tables["test"] = test[[ID] + [f"path_{m}" for m in info["modalities"]]]
    out = A.features_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for enc in cfg["features"]["encoders"]:
        for split, src in extract_encoder(cfg, enc, info, tables).items():
            _link(src, out / A.features_file(enc["name"], split))
            shutil.copyfile(src.with_suffix(".json"), out / A.features_file(enc["name"], split, "json"))
    if cfg["features"]["from_exps"]:
        for e in cfg["features"]["from_exps"]:
            A.require_same_folds(cfg, A.exp_folder(cfg, e), "features.from_exps", e)
            fold_logit_features(cfg, e, info, train, test, out)
    save_config(cfg, out)
    inputs = [A.input_record(cfg, prep_dir(cfg), "prep")]
    inputs += [A.input_record(cfg, A.exp_folder(cfg, e), "from_exp") for e in cfg["features"]["from_exps"]]
    A.write_manifest(cfg, out, "features", inputs, time.time() - t0, exp=f"{cfg['exp']}/{A.FEATURES}")


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------- tabular
