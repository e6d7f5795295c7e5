"""Frozen-encoder embeddings per lesion and modality, TTA-averaged, cached by encoder (its identity:
weights sha256, hub flag, package versions) + preprocessing; frozen forward passes in PyTorch or ONNX
Runtime (`features.runtime`, `Frozen`).

Every cache file is keyed by the rows it holds (`Rows`: ids + the bytes of their cached images,
`lib.data.dataset`): embeddings are named by that fingerprint (`rows_file`), trunk activations carry
it in their sidecar, fine-tuned test logits are named by it beside the kept fold models. A new test
release on the same prep folder reuses every train-side cache and recomputes only the test side."""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core import artifacts as A
from lib.core.artifacts import prep_dir, save_config
from lib.core.errors import ConfigError, PipelineError
from lib.core.io import ID, read_json, read_table, write_json, write_parquet
from lib.core.runtime import cpu_count, torch_device
from lib.data.dataset import image_digests, load_dataset, rows_fingerprint
from lib.training.cached_trunk import (
    FineTune,
    cross_fit,
    finetune_key_parts,
    fold_test_logits,
    load_tail_head,
    save_tail_head,
)
from lib.training.inference import (
    f1_scores,
    fold_logit_features,
    fold_logit_test_tables,
    fold_prediction_table,
    prediction_table,
)
from lib.vision import backbones
from lib.vision.embed import (
    emb_columns,
    embed_paths,
    encoder_identity,
    encoder_spec,
    first_images,
    spec_key,
    weights_sha_cache,
)
from lib.vision.onnx_trunk import onnx_forward, resolve_runtime
from lib.vision.trunk import check_split, pooled_from_trunk, split_at, trunk_activations, trunk_cached, trunk_key
from lib.vision.tta import parse_views

log = logging.getLogger(__name__)


class Frozen:
    """How this stage runs an encoder's frozen forward passes: the runtime asked for (`torch` or
    `onnxruntime`, from `features.runtime` and the device), the compute threads (set once), the
    decoding workers and the device."""

    def __init__(self, cfg: dict) -> None:
        self.device = torch_device(cfg)
        self.seed = int(cfg["seed"])   # the random init of an encoder without weights (`_build`)
        self.workers = _workers(cfg)
        self.threads = int(cfg["threads"]) or max(1, cpu_count() - self.workers)
        self.runtime = resolve_runtime(cfg["features"]["runtime"], self.device)
        self.onnx_dir = prep_dir(cfg) / A.ONNX
        self.sha_cache = weights_sha_cache(prep_dir(cfg))

    def forward(self, module: nn.Module, name: str, key_spec: dict, sample: torch.Tensor) -> tuple[Callable, str]:
        """(`module` or its ONNX Runtime twin, the runtime used): ONNX Runtime when asked for and the
        export reproduces PyTorch on `sample`, else the module itself (onnx_forward said why)."""
        if self.runtime != "onnxruntime":
            return module, "torch"
        twin = onnx_forward(module, name, key_spec, self.onnx_dir, sample, self.threads)
        return (twin, "onnxruntime") if twin is not None else (module, "torch")


class Rows:
    """The fingerprint of each split's rows (ids + the bytes of their images, every modality), the key
    of every cache file of this stage; `labelled`: the train rows with their labels too (fine-tunes)."""

    def __init__(self, cfg: dict, info: dict, tables: dict[str, pd.DataFrame], train: pd.DataFrame | None) -> None:
        digests = {split: {m: image_digests(prep_dir(cfg), df[f"path_{m}"]) for m in info["modalities"]}
                   for split, df in tables.items()}
        self.split = {split: rows_fingerprint(df[ID], digests[split]) for split, df in tables.items()}
        ycols = [f"y_{c}" for c in info["classes"]]
        self.labelled = None if train is None else rows_fingerprint(train[ID], digests["train"], train[ycols])


def _spec(cfg: dict, enc: dict, info: dict, frozen: Frozen, keep: bool) -> tuple[dict, list[str]]:
    views = parse_views(enc.get("tta") or cfg["features"]["tta"])
    ident = encoder_identity(enc["arch"], enc["weights"], enc["hub"], frozen.sha_cache)
    spec = encoder_spec(enc, views, info["cache_tag"], keep, identity=ident)
    if enc["weights"] is None:   # random weights: decided by the seed they are drawn with (`_build`)
        spec["random_init_seed"] = frozen.seed
    return spec, views


def _onnx_key_spec(spec: dict, cut: str | None) -> dict:
    """What an exported file depends on: the encoder spec without the views / pooling, and the cut."""
    return {**{k: v for k, v in spec.items() if k not in ("views", "keep_views")}, "cut": cut}


def _build(enc: dict, frozen: Frozen) -> nn.Module:
    """The encoder, eval mode, channels_last; without weights its random init is drawn from the config's
    seed (in a forked RNG), so every run and every cache entry sees the same encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(frozen.seed)
        model = backbones.build_backbone(enc["arch"], enc["weights"], hub=enc["hub"]).eval().to(frozen.device)
    return model.to(memory_format=torch.channels_last)


def extract_encoder(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame], frozen: Frozen,
                    rows: Rows) -> dict[str, Path]:
    """Embeddings of one encoder for each split, from the shared cache (the file of exactly these rows)
    or computed (and cached: the json sidecar first, the parquet last, which marks it complete)."""
    keep = bool(cfg["features"]["keep_views"])
    spec, views = _spec(cfg, enc, info, frozen, keep)
    folder = prep_dir(cfg) / A.FEATURES / f"{enc['name']}-{spec_key(spec)}"
    model, runtime = None, "torch"
    paths: dict[str, Path] = {}
    for split, df in tables.items():
        path = folder / A.rows_file(split, rows.split[split])
        paths[split] = path
        if _cached(path, df, enc["name"], split):
            continue
        if model is None:
            files = [str(prep_dir(cfg) / p) for p in df[f"path_{info['modalities'][0]}"]]
            model, runtime = frozen.forward(_build(enc, frozen), enc["name"], _onnx_key_spec(spec, None),
                                            first_images(files, spec))
        per_mod: dict[str, np.ndarray] = {}
        t0 = time.time()
        for m in info["modalities"]:
            files = [str(prep_dir(cfg) / p) for p in df[f"path_{m}"]]
            per_mod[m] = embed_paths(model, files, spec, frozen.device, cfg["features"]["batch_size"],
                                     frozen.workers, f"{enc['name']} {split} {m}", keep_views=keep)
        cols = _embedding_columns(enc["name"], info, per_mod, views, keep)
        n_img, dt = len(df) * len(info["modalities"]), time.time() - t0
        write_json({**spec, "name": enc["name"], "split": split, "rows": rows.split[split], "n_images": n_img,
                    "seconds": round(dt, 1), "images_per_s": round(n_img * len(views) / dt, 2),
                    "device": frozen.device, "runtime": runtime, "threads": frozen.threads}, path.with_suffix(".json"))
        write_parquet(pd.concat([df[[ID]].reset_index(drop=True), pd.DataFrame(cols)], axis=1), path)  # last
        log.info("%s/%s: %d images x %d views in %.0fs (%.1f img/s, %s)", enc["name"], split, n_img,
                 len(views), dt, n_img * len(views) / dt, runtime)
    return paths


def _cached(path: Path, df: pd.DataFrame, name: str, split: str) -> bool:
    """Whether `path` (and its .json, written before it) holds the embeddings of exactly `df`'s lesions,
    in order; a corrupt or foreign file is logged and recomputed, never used."""
    if not (path.exists() and path.with_suffix(".json").exists()):
        return False
    try:
        old = read_table(path, columns=[ID])
        read_json(path.with_suffix(".json"))
    except PipelineError as e:
        log.warning("%s/%s: cached embeddings unreadable, recomputing: %s", name, split, e)
        return False
    if list(old[ID]) != list(df[ID]):
        log.info("%s/%s: cached embeddings are for other lesions; recomputing", name, split)
        return False
    log.info("%s/%s: cached embeddings reused (%s)", name, split, path)
    return True


def _embedding_columns(name: str, info: dict, per_mod: dict[str, np.ndarray], views: list[str],
                       keep: bool) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for m in info["modalities"]:
        e = per_mod[m]
        for tag, arr in ([(f"{m}_{v}", e[:, i]) for i, v in enumerate(views)] if keep else [(m, e)]):
            for j, c in enumerate(emb_columns(name, tag, arr.shape[1])):
                cols[c] = arr[:, j]
    return cols


def _trunk_forward(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame], spec: dict,
                   tfolder: Path, model: nn.Module, frozen: Frozen, rows: Rows) -> tuple[Callable, str]:
    """The trunk's forward for the splits whose activations are not cached yet: the split is checked
    on the first images (`check_split`: trunk + tail + pool must reproduce the encoder), then the
    trunk runs in PyTorch or ONNX Runtime (`Frozen.forward`). (None, '') when all are cached."""
    todo = [(split, m) for split, df in tables.items() for m in info["modalities"]
            if not trunk_cached([str(prep_dir(cfg) / p) for p in df[f"path_{m}"]], tfolder / A.trunk_file(split, m),
                                rows.split[split])]
    if not todo:
        return None, ""
    split, m = todo[0]
    sample = first_images([str(prep_dir(cfg) / p) for p in tables[split][f"path_{m}"]], spec)
    d = check_split(model, enc["cut"], sample.to(frozen.device))
    log.info("%s: trunk + tail at %r reproduce the encoder on %d images (max diff %.1e)", enc["name"],
             enc["cut"], len(sample), d)
    return frozen.forward(split_at(model, enc["cut"])[0], f"{enc['name']}_trunk", _onnx_key_spec(spec, enc["cut"]),
                          sample)


def extract_via_trunk(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame], frozen: Frozen,
                      rows: Rows) -> tuple[dict[str, Path], dict[str, list[np.ndarray]], tuple]:
    """An encoder with `cut`: its trunk activations per split and modality (cached under
    `prep/trunks/<name>-<key>/`), and its embeddings computed from them by the tail + pooling (cached
    like any encoder's, under a key that includes the cut). Returns (embedding paths, activations,
    (tail, pool, n_features))."""
    keep = bool(cfg["features"]["keep_views"])
    spec, views = _spec(cfg, enc, info, frozen, keep)
    folder = prep_dir(cfg) / A.FEATURES / f"{enc['name']}-{spec_key({**spec, 'trunk_cut': enc['cut']})}"
    tfolder = prep_dir(cfg) / A.TRUNKS / f"{enc['name']}-{trunk_key(spec, enc['cut'])}"
    model = _build(enc, frozen)
    _, tail, pool = split_at(model, enc["cut"])
    trunk, runtime = _trunk_forward(cfg, enc, info, tables, spec, tfolder, model, frozen, rows)
    acts: dict[str, list[np.ndarray]] = {}
    paths: dict[str, Path] = {}
    for split, df in tables.items():
        t0 = time.time()
        acts[split] = [trunk_activations(trunk, [str(prep_dir(cfg) / p) for p in df[f"path_{m}"]], spec,
                                         frozen.device, cfg["features"]["batch_size"], frozen.workers,
                                         f"{enc['name']} trunk {split} {m}", tfolder / A.trunk_file(split, m),
                                         rows.split[split])
                       for m in info["modalities"]]
        paths[split] = path = folder / A.rows_file(split, rows.split[split])
        if _cached(path, df, enc["name"], split):
            continue
        per_mod = {m: pooled_from_trunk(tail, pool, a, frozen.device, keep_views=keep)
                   for m, a in zip(info["modalities"], acts[split])}
        cols = _embedding_columns(enc["name"], info, per_mod, views, keep)
        n_img, dt = len(df) * len(info["modalities"]), time.time() - t0
        write_json({**spec, "name": enc["name"], "split": split, "rows": rows.split[split], "n_images": n_img,
                    "seconds": round(dt, 1), "images_per_s": round(n_img * len(views) / dt, 2),
                    "device": frozen.device, "trunk_cut": enc["cut"], "trunk_cache": str(tfolder),
                    "runtime": runtime or "cached", "threads": frozen.threads}, path.with_suffix(".json"))
        write_parquet(pd.concat([df[[ID]].reset_index(drop=True), pd.DataFrame(cols)], axis=1), path)  # last
        log.info("%s/%s: %d images x %d views via the trunk cache in %.0fs", enc["name"], split, n_img,
                 len(views), dt)
    return paths, acts, (tail, pool, int(model.num_features))


def finetune_encoder(cfg: dict, enc: dict, info: dict, tables: dict[str, pd.DataFrame], train: pd.DataFrame,
                     out: Path, acts: dict[str, list[np.ndarray]], tail_pool: tuple, frozen: Frozen,
                     rows: Rows) -> None:
    """Feature block `ft_<name>`: class logits of the encoder's tail + head fine-tuned per fold on the
    trunk cache (fold k's model never trains on fold k's lesions; test = mean of the fold models).
    Cached under `prep/features/ft_<name>-<key>/` (key: trunk cache key, fine-tune settings, seed,
    folds.csv, the train rows' fingerprint, FINETUNE_FORMAT_VERSION): the OOF logits and each fold's
    model (safetensors), then the test logits per test fingerprint, computed by the kept fold models,
    so a new test release is scored without training again."""
    if info.get("task", "multiclass") != "multiclass":
        raise ConfigError(f"features.encoders[{enc['name']}].finetune: cached-trunk fine-tuning is multiclass only")
    classes, name = list(info["classes"]), f"ft_{enc['name']}"
    ft = FineTune(**finetune_settings(cfg, enc), seed=int(cfg["seed"]))
    spec, _ = _spec(cfg, enc, info, frozen, False)
    key = spec_key(finetune_key_parts(trunk_key(spec, enc["cut"]), ft, A.folds_sha1(cfg), classes, rows.labelled))
    folder = prep_dir(cfg) / A.FEATURES / f"{name}-{key}"
    models = None
    if not _cached(folder / A.cache_file("train"), tables["train"], name, "train"):
        models = _finetune(enc, name, classes, ft, train, tables, acts, tail_pool, folder, frozen.device)
    else:
        log.info("%s: cached fine-tuned fold models and OOF logits reused (%s)", name, folder)
    src = {"train": folder / A.cache_file("train")}
    if "test" in tables:
        src["test"] = folder / A.rows_file("test", rows.split["test"])
        src[A.TEST_BY_FOLD] = folder / A.rows_file(A.TEST_BY_FOLD, rows.split["test"])
        folds = sorted(int(f) for f in train["fold"].unique())
        if _cached(src["test"], tables["test"], name, "test") and _by_fold_cached(src[A.TEST_BY_FOLD], folds):
            log.info("%s: cached test logits of these test rows reused (%s)", name, src["test"])
        else:
            models = models or _load_fold_models(folder, folds, len(info["modalities"]), len(classes), ft,
                                                 tail_pool, frozen.device)
            _write_test_logits(name, classes, tables["test"], fold_test_logits(models, acts["test"], frozen.device),
                               folds, {**read_json(folder / A.cache_file("train", "json")), "rows": rows.split["test"]},
                               src)
    for split, path in src.items():
        _link(path, out / A.features_file(name, split))
        _link(path.with_suffix(".json"), out / A.features_file(name, split, "json"))


def _by_fold_cached(path: Path, folds: list[int]) -> bool:
    """Whether `path` (a per-fold-model test table, named by the test rows' fingerprint) reads back
    with rows of every fold model."""
    if not (path.exists() and path.with_suffix(".json").exists()):
        return False
    try:
        return sorted(set(read_table(path, columns=[A.FOLD_MODEL])[A.FOLD_MODEL].astype(int))) == folds
    except PipelineError as e:
        log.warning("%s: unreadable, recomputing: %s", path, e)
        return False


def _write_test_logits(name: str, classes: list[str], test: pd.DataFrame, per_fold: list[np.ndarray],
                       folds: list[int], meta: dict, src: dict[str, Path]) -> None:
    """The fine-tune's test features: the mean of the fold models (`test`) and each fold model's own
    (`test_by_fold`: fold k's stacker reads fold k's, as its validation rows came from fold model k)."""
    cols = [f"logit_{name}_{c}" for c in classes]
    write_json({**meta, "split": A.TEST_BY_FOLD, "source": "each fold model"}, src[A.TEST_BY_FOLD].with_suffix(".json"))
    write_parquet(fold_prediction_table(test[ID], dict(zip(folds, per_fold)), cols), src[A.TEST_BY_FOLD])
    write_json({**meta, "split": "test", "source": "mean of the fold models"}, src["test"].with_suffix(".json"))
    write_parquet(prediction_table(test[ID], np.mean(per_fold, 0), cols), src["test"])
    log.info("%s: test logits of %d lesions from the %d kept fold models", name, len(test), len(per_fold))


def _load_fold_models(folder: Path, folds: list[int], n_mod: int, n_classes: int, ft: FineTune, tail_pool: tuple,
                      device: str) -> list:
    tail, pool, n_feat = tail_pool
    return [load_tail_head(folder / A.finetune_fold_file(k), tail, pool, n_feat, n_mod, n_classes, ft.dropout, device)
            for k in folds]


def _own_finetune(enc: dict) -> dict:
    """The non-null keys of the encoder's `finetune_with` (its own fine-tune settings)."""
    return {k: v for k, v in (enc.get("finetune_with") or {}).items() if v is not None}


def finetune_settings(cfg: dict, enc: dict) -> dict:
    """`features.finetune`, overridden by the encoder's non-null `finetune_with` keys."""
    return {**cfg["features"]["finetune"], **_own_finetune(enc)}


def _finetune(enc: dict, name: str, classes: list[str], ft: FineTune, train: pd.DataFrame,
              tables: dict[str, pd.DataFrame], acts: dict[str, list[np.ndarray]], tail_pool: tuple,
              folder: Path, device: str) -> list:
    """Fit the fold models, keep each (fold{k}.safetensors), write the OOF logits (train.parquet last:
    it marks the cache complete); returns the fold models, in fold order."""
    tail, pool, n_feat = tail_pool
    y = train[[f"y_{c}" for c in classes]].to_numpy(np.float32)
    assert list(train[ID]) == list(tables["train"][ID]), "train rows and trunk cache rows differ"
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    models: list = []

    def keep(k: int, model: nn.Module) -> None:
        save_tail_head(model, folder / A.finetune_fold_file(k))
        models.append(model)
    oof, _, extra = cross_fit(tail, pool, n_feat, acts["train"], y, train["fold"].to_numpy(), None, ft, device,
                              name, on_fold=keep)
    f1, _ = f1_scores(y, oof, "multiclass")
    cols = [f"logit_{name}_{c}" for c in classes]
    meta = {"name": name, "encoder": enc["name"], "cut": enc["cut"], "finetune": vars(ft), "classes": classes,
            "oof_macro_f1_argmax": round(float(f1), 4), "seconds": round(time.time() - t0, 1), **extra}
    write_json({**meta, "split": "train", "source": "own-fold OOF logits"}, folder / A.cache_file("train", "json"))
    write_parquet(prediction_table(train[ID], oof, cols), folder / A.cache_file("train"))  # last: marks complete
    log.info("%s: cached-trunk fine-tune, OOF macro F1 (argmax) %.4f in %.0fs", name, f1, time.time() - t0)
    return models


def _workers(cfg: dict) -> int:
    w = int(cfg["features"]["workers"])
    return w if w >= 0 else max(1, cpu_count() - 1)


def run(cfg: dict) -> None:
    """Stage 03: embeddings of every configured encoder into `output/<exp>/features/` (+ its manifest)."""
    t0 = time.time()
    if not cfg["features"]["encoders"] and not cfg["features"]["from_exps"]:
        if not cfg["stack"]["features"]:  # a metadata-only stack (SCIN questionnaire): nothing to do
            log.info("features: no encoders and no stack.features: nothing to extract")
            return
        raise PipelineError("features.encoders is empty: nothing to extract")
    frozen = Frozen(cfg)
    torch.set_num_threads(frozen.threads)   # once, for PyTorch; ONNX Runtime sessions get the same count
    info, train, test = load_dataset(cfg)
    for e in cfg["features"]["from_exps"]:  # before any compute: a missing or other-folds member stops here
        A.require_same_folds(cfg, A.exp_folder(cfg, e), "features.from_exps", e)
    tables = {"train": train[[ID] + [f"path_{m}" for m in info["modalities"]]]}
    if test is not None:
        tables["test"] = test[[ID] + [f"path_{m}" for m in info["modalities"]]]
    out = A.features_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if test is None:   # no test split now: a test table of an earlier run must not be read as this one's
        for f in [f for split in ("test", A.TEST_BY_FOLD) for ext in ("parquet", "json")
                  for f in out.glob(A.features_file("*", split, ext))]:
            f.unlink()
    rows = Rows(cfg, info, tables, train) if cfg["features"]["encoders"] else None
    parts: dict[str, float] = {}  # wall seconds of this run per encoder / fine-tune (the report's sub-rows)
    for enc in cfg["features"]["encoders"]:
        t_enc = time.time()
        if enc["cut"]:
            paths, acts, tail_pool = extract_via_trunk(cfg, enc, info, tables, frozen, rows)
        else:
            paths = extract_encoder(cfg, enc, info, tables, frozen, rows)
        for split, src in paths.items():
            _link(src, out / A.features_file(enc["name"], split))
            _link(src.with_suffix(".json"), out / A.features_file(enc["name"], split, "json"))
        parts[f"{enc['name']} embeddings"] = round(time.time() - t_enc, 1)
        if enc["finetune"]:
            t_ft = time.time()
            finetune_encoder(cfg, enc, info, tables, train[[ID, "fold", *[f"y_{c}" for c in info["classes"]]]],
                             out, acts, tail_pool, frozen, rows)
            parts[f"ft_{enc['name']} fine-tune"] = round(time.time() - t_ft, 1)
    if cfg["features"]["from_exps"]:
        for e in cfg["features"]["from_exps"]:
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
    if tmp.exists():  # dst was already a link to src: rename() of two links to one file does nothing
        tmp.unlink()


# ----------------------------------------------------------------------------- tabular


# ----------------------------------------------------------------------------- the predict path of a bundle


def check_bundled_encoder(enc: dict, recorded: dict, sha_cache: Path) -> None:
    """The installed weights of `enc` are the ones the bundle's encoder was run with (`recorded`: its
    spec, with `identity`); else one line naming the encoder, the weights and what to install."""
    ident = encoder_identity(enc["arch"], enc["weights"], enc["hub"], sha_cache)
    want = recorded.get("identity") or {}
    if want.get("weights_sha256") and not ident.get("weights_sha256"):
        raise PipelineError(f"encoder '{enc['name']}' ({enc['arch']}): its weights file {enc['weights']} is not there: put "
                            f"the file the bundle was made with (sha256 {want['weights_sha256'][:12]}...) at that path, "
                            "or set paths.weights_cache (docs/offline_weights.md)")
    if ident != want:
        diff = sorted(k for k in set(ident) | set(want) if ident.get(k) != want.get(k))
        raise PipelineError(f"encoder '{enc['name']}' ({enc['arch']}, weights {enc['weights']}): the installed weights "
                            f"differ from the bundle's in {diff} (installed {[ident.get(k) for k in diff]}, bundle "
                            f"{[want.get(k) for k in diff]}): install the weights the bundle was made with "
                            "(docs/offline_weights.md)")


def _bundled_finetune(cfg: dict, enc: dict, info: dict, test: pd.DataFrame, acts: list[np.ndarray],
                      tail_pool: tuple, folder: Path, out: Path, device: str) -> None:
    """`ft_<name>` test logits (mean and per fold model) from the bundle's fine-tuned fold models."""
    name, classes = f"ft_{enc['name']}", list(info["classes"])
    ft = FineTune(**finetune_settings(cfg, enc), seed=int(cfg["seed"]))
    meta = read_json(folder / A.cache_file("train", "json"))
    folds = sorted(int(p.stem.removeprefix(A.fold_name(""))) for p in folder.glob(A.finetune_fold_file("*")))
    models = _load_fold_models(folder, folds, len(info["modalities"]), len(classes), ft, tail_pool, device)
    src = {"test": out / A.features_file(name, "test"), A.TEST_BY_FOLD: out / A.features_file(name, A.TEST_BY_FOLD)}
    _write_test_logits(name, classes, test, fold_test_logits(models, acts, device), folds,
                       {**meta, "rows": None}, src)


def predict_test(cfg: dict, info: dict, test: pd.DataFrame, bundled: Path,
                 fold_logits: dict[str, dict[int, np.ndarray]]) -> None:
    """Stage 03's test side from a bundle (`bundled`: the bundle's `<exp>/features/`): every encoder's
    embeddings of the test rows (cached under `paths.prep` like 03), the fine-tunes' test logits from
    the bundled fold models, and `features.from_exps` logits from `fold_logits` ({exp: {fold: logits}},
    computed from the bundled fold models). Written to `<paths.output>/<exp>/features/` as 03 writes them.
    The caller has checked the installed encoder weights (`check_bundled_encoder`, before any write)."""
    frozen = Frozen(cfg)
    torch.set_num_threads(frozen.threads)
    tables = {"test": test[[ID] + [f"path_{m}" for m in info["modalities"]]]}
    out = A.features_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(cfg, info, tables, None) if cfg["features"]["encoders"] else None
    for enc in cfg["features"]["encoders"]:
        if enc["cut"]:
            paths, acts, tail_pool = extract_via_trunk(cfg, enc, info, tables, frozen, rows)
        else:
            paths = extract_encoder(cfg, enc, info, tables, frozen, rows)
        _link(paths["test"], out / A.features_file(enc["name"], "test"))
        _link(paths["test"].with_suffix(".json"), out / A.features_file(enc["name"], "test", "json"))
        if enc["finetune"]:
            _bundled_finetune(cfg, enc, info, tables["test"], acts["test"], tail_pool,
                              bundled / f"ft_{enc['name']}", out, frozen.device)
    for e in cfg["features"]["from_exps"]:
        mean, by_fold = fold_logit_test_tables(e, list(info["classes"]), test[ID], fold_logits[e])
        write_parquet(mean, out / A.features_file(e, "test"))
        write_parquet(by_fold, out / A.features_file(e, A.TEST_BY_FOLD))

