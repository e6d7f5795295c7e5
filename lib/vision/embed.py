"""Frozen-encoder embeddings of image files: the cache key of an encoder (its spec and identity),
the image batches that feed a frozen forward pass (decoded ahead of it) and the batched TTA forward."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lib.core.artifacts import WEIGHTS_SHA256
from lib.core.io import read_json, write_json
from lib.core.progress import progress
from lib.vision import backbones
from lib.vision import keras_convert as K
from lib.vision.checkpoints import dist_version
from lib.vision.transforms import DEFAULT_INTERPOLATION, EvalImages, full_spec
from lib.vision.tta import apply_view
from lib.vision.weights import pypi_weights_path, source_kind

SHA_CHUNK = 1 << 20


def encoder_spec(enc: dict, views: list[str], cache_tag: str, keep_views: bool = False,
                 identity: dict | None = None) -> dict:
    """Everything that determines an encoder's embeddings (its cache key); `embed_paths` builds the
    evaluation view from it. View fields at their defaults (`shortest` with `bicubic`, `squash` with
    `bilinear`; crop_pct is never applied) are left out, so keys made before they existed still hold.
    `identity` (`encoder_identity`: the weights' sha256, hub flag, package versions) enters as is."""
    pre = full_spec(backbones.preprocess_spec(enc["arch"], enc["weights"]), enc["size"])
    spec = {"arch": enc["arch"], "weights": enc["weights"], "size": pre["size"],
            "mean": pre["mean"], "std": pre["std"], "views": views, "image_cache": cache_tag}
    if pre["resize_mode"] != "shortest":
        spec["resize_mode"] = pre["resize_mode"]
    if pre["interpolation"] != DEFAULT_INTERPOLATION[pre["resize_mode"]]:
        spec["interpolation"] = pre["interpolation"]
    if keep_views:  # one column block per view instead of the view average
        spec["keep_views"] = True
    if identity is not None:
        spec["identity"] = identity
    return spec


def spec_key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def file_sha256(path: Path, cache: Path) -> str:
    """sha256 of a file, remembered in `cache` (a JSON map) per resolved path + size + mtime, so a
    big weights file is hashed once, and again only when it changes."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    known = read_json(cache) if cache.exists() else {}
    hit = known.get(str(path))
    if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and hit.get("sha256"):
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(SHA_CHUNK), b""):
            h.update(block)
    known[str(path)] = {**stamp, "sha256": h.hexdigest()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(known, cache)
    return h.hexdigest()


def encoder_identity(arch: str, weights: str | None, hub: bool, sha_cache: Path) -> dict[str, Any]:
    """What the weights ARE, beyond their name: the resolved file's sha256 (local files, packaged
    weights, sklesion's converted cache), the `hub` flag, and for sklesion the package and converter
    versions. A hub tag (downloaded by timm) is named by its tag and the flag only."""
    kind = source_kind(arch, weights, hub)
    ident: dict[str, Any] = {"hub": bool(hub)}
    path: Path | None = None
    if kind.startswith("pypi:"):
        path = pypi_weights_path(str(weights))
    elif weights is not None and Path(weights).is_file():
        path = Path(weights)
    if kind == "pypi:sklesion":
        ident["sklesion"] = dist_version("sklesion", "sklesion", no_deps=True)
        ident["converter"] = getattr(K, "_CONVERTER_VERSION", None)
    if path is not None:
        ident["weights_sha256"] = file_sha256(path, sha_cache)
    return ident


def emb_columns(name: str, modality: str, dim: int) -> list[str]:
    return [f"emb_{name}_{modality}_{i}" for i in range(dim)]


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """`items` produced by a background thread, up to `depth` ahead: image decoding and resizing
    (OpenCV / libjpeg release the GIL) overlap the forward pass of the previous batch."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            put((False, e))

    t = threading.Thread(target=fill, name="prefetch", daemon=True)
    t.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                if x is not None:
                    raise x
                return
            yield x
    finally:
        stop.set()
        t.join(timeout=10)


def image_batches(paths: list[str], spec: dict, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """Batches `[B, 3, S, S]` of the evaluation view of `spec`, in order: decoded by `workers`
    DataLoader processes, or (workers 0) by one prefetch thread beside the forward pass."""
    dl = DataLoader(EvalImages(paths, spec), batch_size=batch_size, shuffle=False, num_workers=workers,
                    persistent_workers=False, prefetch_factor=4 if workers else None)
    return iter(dl) if workers else prefetch(dl)


def first_images(paths: list[str], spec: dict, n: int = 4) -> torch.Tensor:
    """The evaluation view of the first `n` images: the batch a frozen forward is checked on."""
    ds = EvalImages(paths[:n], spec)
    return torch.stack([ds[i] for i in range(len(ds))])


@torch.no_grad()
def embed_paths(model: Callable[[torch.Tensor], torch.Tensor], paths: list[str], spec: dict, device: str,
                batch_size: int, workers: int, desc: str, keep_views: bool = False) -> np.ndarray:
    """[N, F] embeddings averaged over the TTA views ([N, V, F] if keep_views). `model` is the
    encoder or its ONNX Runtime twin (`lib.vision.onnx_trunk`)."""
    out = []
    t0, n = time.time(), 0
    bar = progress(len(paths), desc, unit="img")
    for x in image_batches(paths, spec, batch_size, workers):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        v = torch.stack([model(apply_view(x, view)).float() for view in spec["views"]], 1)
        out.append((v if keep_views else v.mean(1)).cpu().numpy())
        n += len(x)
        bar.update(len(x))
        bar.set_postfix(img_s=f"{n * len(spec['views']) / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    return np.concatenate(out).astype(np.float32)


def weights_sha_cache(prep: str | os.PathLike) -> Path:
    """Where the weights files' sha256 are remembered (`file_sha256`): one JSON file in the prep folder."""
    return Path(prep) / WEIGHTS_SHA256
