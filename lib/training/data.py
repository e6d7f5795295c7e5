"""Training data: lesion rows -> tensors (images, metadata, MONET), loaders and the epoch order.

Every augmentation and modality/concept-dropout draw is seeded by (seed, fold, epoch, row), so a
batch does not depend on DataLoader workers, ranks or a resume.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from lib.config.schema import SAMPLERS
from lib.core.errors import PipelineError
from lib.core.runtime import cpu_count, seed_for
from lib.data.cache import read_rgb
from lib.training.losses import class_weights
from lib.vision.augment import TrainTransform
from lib.vision.transforms import build_eval_transform, full_spec


def model_modalities(info: dict, mcfg: dict) -> list[str]:
    if mcfg["kind"] == "single":
        return [mcfg["modality"]]
    return [mcfg["modality"]] + [m for m in info["modalities"] if m != mcfg["modality"]]


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
    """Rows of a lesion table -> dict batches (see lib/vision/models.py). Training items are (row, epoch)
    pairs; evaluation items are row positions.

    Images go through the transforms of one preprocessing `spec` (`lib.vision.backbones.model_spec`,
    saved in model.pt): `build_eval_transform(spec)` for evaluation, `TrainTransform(spec, aug)` for
    training. Older callers may pass `size`, `mean`, `std` instead (= a spec with only those: the
    default short-side + center-crop view)."""

    def __init__(self, df: pd.DataFrame, folder: Path, modalities: list[str], classes: list[str],
                 tab: Tabular, size: int | None = None, mean=None, std=None, train: bool = False,
                 aug: dict | None = None, seed: int = 0, fold: int = 0, modality_dropout: float = 0.0,
                 monet_dropout: float = 0.0, spec: dict | None = None) -> None:
        self.paths = {m: [str(folder / p) for p in df[f"path_{m}"]] for m in modalities}
        self.modalities = modalities
        ycols = [f"y_{c}" for c in classes]
        self.y = df[ycols].to_numpy(np.float32) if all(c in df for c in ycols) else \
            np.zeros((len(df), len(classes)), np.float32)
        self.meta, self.monet, self.mask = tab.arrays(df)
        self.spec = full_spec(dataset_spec(spec, size, mean, std))
        self.train, self.seed, self.fold = train, int(seed), int(fold)
        self.p_mod, self.p_monet = float(modality_dropout), float(monet_dropout)
        self.tf = TrainTransform(self.spec, aug) if train else None
        self.eval_tf = build_eval_transform(self.spec)

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
                out[f"img_{m}"] = self.eval_tf(read_rgb(self.paths[m][i]))
        out.update(meta=torch.tensor(self.meta[i]), monet=torch.tensor(self.monet[i]),
                   monet_mask=torch.tensor(mask), keep=torch.tensor(keep),
                   y=torch.tensor(self.y[i]), idx=torch.tensor(i))
        return out


def dataset_spec(spec: dict | None, size: int | None, mean, std) -> dict:
    """The preprocessing spec of a LesionDataset: `spec`, or one made of `size`/`mean`/`std`."""
    if spec is None:
        if size is None or mean is None or std is None:
            raise ValueError("LesionDataset needs a preprocessing spec (or size, mean and std)")
        return {"size": int(size), "mean": list(mean), "std": list(std)}
    if size is not None or mean is not None or std is not None:
        raise ValueError("LesionDataset: pass either spec or size/mean/std, not both")
    return dict(spec)


def _worker_init(_: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.set_num_threads(1)


def make_loader(ds: Dataset, workers: int, gen_seed: int, **kw) -> DataLoader:
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
    """`train.workers`; -1 = usable cores - 1 (at least 1, at most 8)."""
    return max(1, min(8, cpu_count() - 1)) if n < 0 else n


def epoch_order(y: np.ndarray, sampler: dict, seed: int, fold: int, epoch: int) -> np.ndarray:
    """Row order of one training epoch (same on every rank)."""
    g = torch.Generator()
    g.manual_seed(seed_for(seed, fold, epoch, 101))
    n = len(y)
    if sampler["kind"] == "weighted":
        none = np.asarray(y).max(1) <= 0  # binary / multilabel rows without a positive: their own "class"
        ext = np.concatenate([y, none[:, None]], 1) if none.any() else np.asarray(y)
        w = (ext * class_weights(ext, sampler["power"])[None, :]).max(1)
        return torch.multinomial(torch.from_numpy(w).double(), n, replacement=True, generator=g).numpy()
    if sampler["kind"] not in SAMPLERS:
        raise PipelineError(f"config: train.sampler.kind '{sampler['kind']}' unknown ({' | '.join(SAMPLERS)})")
    return torch.randperm(n, generator=g).numpy()
