"""Cached-trunk fine-tuning, the vision half: split an encoder at a named module into a frozen trunk
(run once per image and view; its activations are cached on disk) and a tail (the modules after the
cut, then the encoder's own global pooling) that is cheap enough to train many epochs on a CPU.

`split_at(model, cut)` walks the encoder's top-level children in order, opening only the containers
on the path to `cut` (`blocks.6`, `conv4.pointwise`), so it applies to encoders whose
`forward_features` runs their children in sequence (timm's Xception, EfficientNet / lite and most
CNNs). `check_split` proves it on a batch: `pool(tail(trunk(x)))` must equal `model(x)`.

`lib.stages.features` runs `check_split` on the first images of every run before the trunk pass.

The cache (`trunk_activations`) is keyed by everything that decides its values (`trunk_key`):
encoder arch, weights and their identity (sha256, hub flag, package versions), the preprocessing
spec (size, resize mode, interpolation, mean/std, the image cache tag), the views, the cut and
`TRUNK_FORMAT_VERSION` (not `keep_views`: it changes how embeddings are pooled, not the
activations); it holds float16 `[N, V, C, H, W]` per split and modality, written through a memory
map into a temp file and moved into place when complete. Its json sidecar names the rows it holds:
the image paths and their fingerprint (ids + image contents, `lib.data.dataset.table_fingerprint`),
so the activations of another test release (same ids, another image) are never reused; the sidecar
is removed before the .npy is replaced and written after it, so a kill in between leaves no
sidecar that vouches for the wrong activations. The trunk may be the PyTorch module or its
ONNX Runtime twin (`lib.vision.onnx_trunk`): both take and give tensors.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.core.io import write_json
from lib.core.progress import progress
from lib.vision.embed import image_batches, spec_key
from lib.vision.tta import apply_view

log = logging.getLogger(__name__)

HEAD_MODULES = ("global_pool", "fc", "classifier", "head", "head_drop")
TRUNK_FORMAT_VERSION = 2   # bump when the cached activations change meaning (2: identity in the key)


def _stages(module: nn.Module, prefix: str, cut: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if not prefix and name in HEAD_MODULES:
            continue
        if cut.startswith(full + "."):
            out += _stages(child, full + ".", cut)
        else:
            out.append((full, child))
    return out


def split_at(model: nn.Module, cut: str) -> tuple[nn.Sequential, nn.Sequential, nn.Module]:
    """(trunk, tail, pool): the modules up to and including `cut`, those after it (before the head),
    and the encoder's global pooling (flattening to `[B, F]`). The modules are shared, not copied."""
    stages = _stages(model, "", cut)
    names = [n for n, _ in stages]
    if cut not in names:
        raise PipelineError(f"cut {cut!r} is not a module of {type(model).__name__} in forward order; "
                            f"candidates: {names}")
    pool = getattr(model, "global_pool", None)
    if pool is None:
        raise PipelineError(f"{type(model).__name__} has no global_pool: cached-trunk needs a timm CNN")
    i = names.index(cut) + 1
    seq = [(n.replace(".", "_"), m) for n, m in stages]
    return nn.Sequential(OrderedDict(seq[:i])), nn.Sequential(OrderedDict(seq[i:])), pool


@torch.no_grad()
def check_split(model: nn.Module, cut: str, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Max abs difference of `pool(tail(trunk(x)))` vs `model(x)` (eval mode); raises if above atol."""
    trunk, tail, pool = split_at(model.eval(), cut)
    d = float((pool(tail(trunk(x))).flatten(1) - model(x)).abs().max())
    if d > atol:
        raise PipelineError(f"{type(model).__name__} split at {cut!r} does not reproduce the encoder "
                            f"(max diff {d:.2e}): its forward is not a sequence of its children")
    return d


def trunk_key(enc_spec: dict, cut: str) -> str:
    """Cache key of trunk activations: the encoder's embedding spec (arch, weights and identity,
    preprocessing, views, image cache) without `keep_views`, plus the cut and the format version."""
    spec = {k: v for k, v in enc_spec.items() if k != "keep_views"}
    return spec_key({**spec, "trunk_cut": cut, "trunk_format": TRUNK_FORMAT_VERSION})


def trunk_cached(paths: list[str], out: Path, rows: str) -> bool:
    """Whether `out` holds the activations of exactly these images (in this order) with these contents
    (`rows`: the fingerprint of the rows, ids + image bytes): its .json sidecar names them and the .npy
    reads back with one row per image. A truncated or corrupt cache is logged and recomputed, never used."""
    meta = out.with_suffix(".json")
    if not (out.exists() and meta.exists()):
        return False
    try:
        m = json.loads(meta.read_text())
        if m.get("paths") != list(paths) or m.get("rows") != rows:
            return False
        n = len(np.load(out, mmap_mode="r"))
    except (OSError, ValueError, EOFError, AttributeError) as e:  # JSONDecodeError is a ValueError
        log.warning("%s: trunk cache unreadable, recomputing (%s)", out, str(e).splitlines()[0][:200])
        return False
    if n != len(paths):
        log.warning("%s: trunk cache holds %d rows for %d images, recomputing", out, n, len(paths))
        return False
    return True


@torch.no_grad()
def trunk_activations(trunk: Callable[[torch.Tensor], torch.Tensor], paths: list[str], spec: dict, device: str,
                      batch_size: int, workers: int, desc: str, out: Path, rows: str) -> np.ndarray:
    """`[N, V, C, H, W]` float16 activations at the cut for each image and view of `spec["views"]`,
    cached at `out` (.npy + .json sidecar with the paths and `rows`, their fingerprint); returns a
    read-only memory map."""
    if trunk_cached(paths, out, rows):
        return np.load(out, mmap_mode="r")
    meta = out.with_suffix(".json")
    meta.unlink(missing_ok=True)   # from here on the old sidecar may no longer vouch for out
    views = spec["views"]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npy", dir=out.parent)
    os.close(fd)
    try:
        arr, i, t0 = None, 0, time.time()
        bar = progress(len(paths), desc, unit="img")
        for x in image_batches(paths, spec, batch_size, workers):
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            a = torch.stack([trunk(apply_view(x, v)) for v in views], 1).to(torch.float16).cpu().numpy()
            if arr is None:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(paths), *a.shape[1:]))
            arr[i:i + len(a)] = a
            i += len(a)
            bar.update(len(a))
            bar.set_postfix(img_s=f"{i * len(views) / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        if arr is None:
            raise PipelineError(f"{desc}: no images to run the trunk on")
        arr.flush()
        del arr
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_json({"paths": list(paths), "rows": rows, "views": views, "seconds": round(time.time() - t0, 1)}, meta)
    return np.load(out, mmap_mode="r")


@torch.no_grad()
def pooled_from_trunk(tail: nn.Module, pool: nn.Module, acts: np.ndarray, device: str,
                      batch_size: int = 64, keep_views: bool = False) -> np.ndarray:
    """Embeddings `[N, F]` (view-averaged; `[N, V, F]` if keep_views) from cached activations."""
    tail.eval()
    out = []
    for s in range(0, len(acts), batch_size):
        a = torch.from_numpy(np.asarray(acts[s:s + batch_size], dtype=np.float32)).to(device)
        f = pool(tail(a.flatten(0, 1))).flatten(1).view(a.shape[0], a.shape[1], -1)
        out.append((f if keep_views else f.mean(1)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)
