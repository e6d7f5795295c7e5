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
from lib.core.errors import ConfigError, PipelineError
from lib.core.io import ID, write_json, write_parquet
from lib.core.runtime import torch_device
from lib.data.dataset import load_dataset
from lib.training.cached_trunk import FineTune, cross_fit
from lib.training.inference import f1_scores, fold_logit_features, prediction_table
from lib.vision import backbones
from lib.vision.embed import emb_columns, embed_paths, encoder_spec, spec_key
from lib.vision.trunk import pooled_from_trunk, split_at, trunk_activations, trunk_key
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


def _embedding_columns(name: str, info: dict, per_mod: dict[str, np.ndarray], views: list[str],
                       keep: bool) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for m in info["modalities"]:
        e = per_mod[m]
        for tag, arr in ([(f"{m}_{v}", e[:, i]) for i, v in enumerate(views)] if keep else [(m, e)]):
            for j, c in enumerate(emb_columns(name, tag, arr.shape[1])):
                cols[c] = arr[:, j]
    return cols


def extract_via_trunk(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame]
                      ) -> tuple[dict[str, Path], dict[str, list[np.ndarray]], tuple]:
    """An encoder with `cut`: its trunk activations per split and modality (cached under
    `prep/trunks/<name>-<key>/`), and its embeddings computed from them by the tail + pooling (cached
    like any encoder's, under a key that includes the cut). Returns (embedding paths, activations,
    (tail, pool, n_features))."""
    views = parse_views(enc.get("tta") or cfg["features"]["tta"])
    keep = bool(cfg["features"]["keep_views"])
    spec = encoder_spec(enc, views, info["cache_tag"], keep)
    folder = prep_dir(cfg) / A.FEATURES / f"{enc['name']}-{spec_key({**spec, 'trunk_cut': enc['cut']})}"
    tfolder = prep_dir(cfg) / "trunks" / f"{enc['name']}-{trunk_key(spec, enc['cut'])}"
    device = torch_device(cfg)
    model = backbones.build_backbone(enc["arch"], enc["weights"], hub=enc["hub"]).eval().to(device)
    model = model.to(memory_format=torch.channels_last)
    trunk, tail, pool = split_at(model, enc["cut"])
    acts: dict[str, list[np.ndarray]] = {}
    paths: dict[str, Path] = {}
    for split, df in tables.items():
        t0 = time.time()
        acts[split] = [trunk_activations(trunk, [str(prep_dir(cfg) / p) for p in df[f"path_{m}"]], spec, device,
                                         cfg["features"]["batch_size"], _workers(cfg),
                                         f"{enc['name']} trunk {split} {m}", tfolder / f"{split}_{m}.npy")
                       for m in info["modalities"]]
        paths[split] = path = folder / f"{split}.parquet"
        if path.exists() and list(pd.read_parquet(path, columns=[ID])[ID]) == list(df[ID]):
            log.info("%s/%s: cached embeddings reused (%s)", enc["name"], split, path)
            continue
        per_mod = {m: pooled_from_trunk(tail, pool, a, device, keep_views=keep)
                   for m, a in zip(info["modalities"], acts[split])}
        cols = _embedding_columns(enc["name"], info, per_mod, views, keep)
        write_parquet(pd.concat([df[[ID]].reset_index(drop=True), pd.DataFrame(cols)], axis=1), path)
        n_img, dt = len(df) * len(info["modalities"]), time.time() - t0
        write_json({**spec, "name": enc["name"], "split": split, "n_images": n_img, "seconds": round(dt, 1),
                    "images_per_s": round(n_img * len(views) / dt, 2), "device": device, "trunk_cut": enc["cut"],
                    "trunk_cache": str(tfolder), "threads": torch.get_num_threads()}, folder / f"{split}.json")
        log.info("%s/%s: %d images x %d views via the trunk cache in %.0fs", enc["name"], split, n_img,
                 len(views), dt)
    return paths, acts, (tail, pool, int(model.num_features))


def finetune_encoder(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame], train: pd.DataFrame,
                     out: Path, acts: dict[str, list[np.ndarray]], tail_pool: tuple) -> None:
    """Feature block `ft_<name>`: class logits of the encoder's tail + head fine-tuned per fold on the
    trunk cache (fold k's model never trains on fold k's lesions; test = mean of the fold models).
    Cached under `prep/features/ft_<name>-<key>/` (key: trunk cache key, fine-tune settings, seed,
    folds.csv), so a rerun reuses it."""
    if info.get("task", "multiclass") != "multiclass":
        raise ConfigError(f"features.encoders[{enc['name']}].finetune: cached-trunk fine-tuning is multiclass only")
    classes, name = list(info["classes"]), f"ft_{enc['name']}"
    ft = FineTune(**finetune_settings(cfg, enc), seed=int(cfg["seed"]))
    views = parse_views(enc.get("tta") or cfg["features"]["tta"])
    spec = encoder_spec(enc, views, info["cache_tag"])
    key = spec_key({"trunk": trunk_key(spec, enc["cut"]), "finetune": vars(ft), "folds": A.folds_sha1(cfg),
                    "classes": classes, "test": "test" in tables})
    folder = prep_dir(cfg) / A.FEATURES / f"{name}-{key}"
    if not (folder / "train.parquet").exists():
        _finetune(enc, name, classes, ft, train, tables, acts, tail_pool, folder, torch_device(cfg))
    else:
        log.info("%s: cached fine-tuned logits reused (%s)", name, folder)
    for split in tables:
        _link(folder / f"{split}.parquet", out / A.features_file(name, split))
        shutil.copyfile(folder / f"{split}.json", out / A.features_file(name, split, "json"))


def _own_finetune(enc: dict) -> dict:
    """The non-null keys of the encoder's `finetune_with` (its own fine-tune settings)."""
    return {k: v for k, v in (enc.get("finetune_with") or {}).items() if v is not None}


def finetune_settings(cfg: dict, enc: dict) -> dict:
    """`features.finetune`, overridden by the encoder's non-null `finetune_with` keys."""
    return {**cfg["features"]["finetune"], **_own_finetune(enc)}


def _finetune(enc: dict, name: str, classes: list[str], ft: FineTune, train: pd.DataFrame,
              tables: dict[str, pd.DataFrame], acts: dict[str, list[np.ndarray]], tail_pool: tuple,
              folder: Path, device: str) -> None:
    tail, pool, n_feat = tail_pool
    y = train[[f"y_{c}" for c in classes]].to_numpy(np.float32)
    assert list(train[ID]) == list(tables["train"][ID]), "train rows and trunk cache rows differ"
    t0 = time.time()
    oof, test_logits, extra = cross_fit(tail, pool, n_feat, acts["train"], y, train["fold"].to_numpy(),
                                        acts.get("test"), ft, device, name)
    f1, _ = f1_scores(y, oof, "multiclass")
    cols = [f"logit_{name}_{c}" for c in classes]
    meta = {"name": name, "encoder": enc["name"], "cut": enc["cut"], "finetune": vars(ft), "classes": classes,
            "oof_macro_f1_argmax": round(float(f1), 4), "seconds": round(time.time() - t0, 1), **extra}
    if test_logits is not None:
        write_parquet(prediction_table(tables["test"][ID], test_logits, cols), folder / "test.parquet")
        write_json({**meta, "split": "test", "source": "mean of the fold models"}, folder / "test.json")
    write_json({**meta, "split": "train", "source": "own-fold OOF logits"}, folder / "train.json")
    write_parquet(prediction_table(train[ID], oof, cols), folder / "train.parquet")  # last: marks complete
    log.info("%s: cached-trunk fine-tune, OOF macro F1 (argmax) %.4f in %.0fs", name, f1, time.time() - t0)


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
    parts: dict[str, float] = {}  # wall seconds of this run per encoder / fine-tune (the report's sub-rows)
    for enc in cfg["features"]["encoders"]:
        if enc["finetune"] and not enc["cut"]:
            raise ConfigError(f"features.encoders[{enc['name']}]: finetune needs cut (the module the trunk ends at)")
        if not enc["finetune"] and _own_finetune(enc):
            raise ConfigError(f"features.encoders[{enc['name']}]: finetune_with is set but finetune is false "
                              "(set finetune: true, or drop finetune_with)")
        t_enc = time.time()
        if enc["cut"]:
            paths, acts, tail_pool = extract_via_trunk(cfg, enc, info, tables)
        else:
            paths = extract_encoder(cfg, enc, info, tables)
        for split, src in paths.items():
            _link(src, out / A.features_file(enc["name"], split))
            shutil.copyfile(src.with_suffix(".json"), out / A.features_file(enc["name"], split, "json"))
        parts[f"{enc['name']} embeddings"] = round(time.time() - t_enc, 1)
        if enc["finetune"]:
            t_ft = time.time()
            finetune_encoder(cfg, enc, info, tables, train[[ID, "fold", *[f"y_{c}" for c in info["classes"]]]],
                             out, acts, tail_pool)
            parts[f"ft_{enc['name']} fine-tune"] = round(time.time() - t_ft, 1)
    if cfg["features"]["from_exps"]:
        for e in cfg["features"]["from_exps"]:
            A.require_same_folds(cfg, A.exp_folder(cfg, e), "features.from_exps", e)
            fold_logit_features(cfg, e, info, train, test, out)
    save_config(cfg, out)
    inputs = [A.input_record(cfg, prep_dir(cfg), "prep")]
    inputs += [A.input_record(cfg, A.exp_folder(cfg, e), "from_exp") for e in cfg["features"]["from_exps"]]
    A.write_manifest(cfg, out, "features", inputs, time.time() - t0, exp=f"{cfg['exp']}/{A.FEATURES}",
                     extra={"parts": parts})


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
