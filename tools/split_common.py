"""Helpers shared by the split tools (make_test_split.py, make_ham_split.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from lib.core.errors import PipelineError
from lib.data.cache import read_rgb


def per_class(text: str | None) -> dict[str, int]:
    """'NV=12,MEL=10' -> {'NV': 12, 'MEL': 10}; a malformed item is a PipelineError."""
    out: dict[str, int] = {}
    for kv in (text.split(",") if text else []):
        k, _, v = kv.partition("=")
        if not k.strip() or not v.strip().isdigit():
            raise PipelineError(f"per-class counts: '{kv}' is not CLASS=N (e.g. nv=12,mel=10)")
        out[k.strip()] = int(v)
    return out


def pick(lesions: pd.DataFrame, counts: dict[str, int], rng: np.random.Generator) -> list[str]:
    """`counts[c]` lesion ids drawn without replacement from the rows with `dx == c` (seeded)."""
    ids: list[str] = []
    for c, n in counts.items():
        pool = sorted(lesions.loc[lesions["dx"] == c, "lesion_id"])
        if len(pool) < n:
            raise PipelineError(f"class {c}: asked {n} lesions, only {len(pool)} available")
        ids += list(rng.choice(pool, n, replace=False))
    return ids


def place_image(src: Path, dst: Path, resize: int | None, link: bool, quality: int) -> None:
    """Re-encode with long side `resize` (JPEG `quality`), or symlink, or copy `src` to `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if resize:
        img = read_rgb(src)
        h, w = img.shape[:2]
        s = resize / max(h, w)
        if s < 1:
            img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(dst), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif link:
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        os.symlink(src.resolve(), dst)
    else:
        shutil.copyfile(src, dst)
