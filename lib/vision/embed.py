"""Frozen-encoder embeddings of image files: the cache key of an encoder and the batched TTA forward."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from lib.core.progress import progress
from lib.vision import backbones
from lib.vision.transforms import DEFAULT_INTERPOLATION, EvalImages, full_spec
from lib.vision.tta import apply_view


def encoder_spec(enc: dict, views: list[str], cache_tag: str, keep_views: bool = False) -> dict:
    """Everything that determines an encoder's embeddings (its cache key); `embed_paths` builds the
    evaluation view from it. View fields at their defaults (`shortest` with `bicubic`, `squash` with
    `bilinear`; crop_pct is never applied) are left out, so keys made before they existed still hold."""
    pre = full_spec(backbones.preprocess_spec(enc["arch"], enc["weights"]), enc["size"])
    spec = {"arch": enc["arch"], "weights": enc["weights"], "size": pre["size"],
            "mean": pre["mean"], "std": pre["std"], "views": views, "image_cache": cache_tag}
    if pre["resize_mode"] != "shortest":
        spec["resize_mode"] = pre["resize_mode"]
    if pre["interpolation"] != DEFAULT_INTERPOLATION[pre["resize_mode"]]:
        spec["interpolation"] = pre["interpolation"]
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
    ds = EvalImages(paths, spec)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                    persistent_workers=False, prefetch_factor=4 if workers else None)
    out = []
    t0, n = time.time(), 0
    bar = progress(len(ds), desc, unit="img")
    for x in dl:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        v = torch.stack([model(apply_view(x, view)).float() for view in spec["views"]], 1)
        out.append((v if keep_views else v.mean(1)).cpu().numpy())
        n += len(x)
        bar.update(len(x))
        bar.set_postfix(img_s=f"{n * len(spec['views']) / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    return np.concatenate(out).astype(np.float32)
