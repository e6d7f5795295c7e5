"""Helpers shared by the split tools (make_test_split.py, make_ham_split.py, make_isic2019_split.py):
their argument parser, the choice of test / train lesions, placing an image."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from sklearn.model_selection import train_test_split

from lib.core.errors import PipelineError
from lib.data.cache import read_rgb


def split_parser(doc: str, src_help: str, class_word: str | None = None,
                 jpeg_quality: int | None = None) -> argparse.ArgumentParser:
    """--src --out --test-frac --seed [--train-per-class --test-per-class] [--resize] --link; the
    per-class counts name classes as `class_word` (e.g. CLASS, dx), --resize re-encodes at `jpeg_quality`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help=src_help)
    p.add_argument("--out", required=True)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=2025)
    if class_word:
        p.add_argument("--train-per-class", help=f"{class_word}=N,... lesions kept for train (instead of the rest)")
        p.add_argument("--test-per-class", help=f"{class_word}=N,... lesions for test (instead of --test-frac)")
    if jpeg_quality:
        p.add_argument("--resize", type=int, help=f"re-encode images with this long side (JPEG q{jpeg_quality})")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying")
    return p


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


def choose_lesions(lesions: pd.DataFrame, a: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of `lesions` (lesion_id, dx): the test set by --test-per-class counts or a
    stratified --test-frac, then the train set by --train-per-class counts or the rest (seeded)."""
    rng = np.random.default_rng(a.seed)
    if a.test_per_class:
        test_ids = pick(lesions, per_class(a.test_per_class), rng)
    else:
        _, te = train_test_split(lesions, test_size=a.test_frac, stratify=lesions["dx"], random_state=a.seed)
        test_ids = te["lesion_id"].tolist()
    rest = lesions[~lesions["lesion_id"].isin(test_ids)]
    train_ids = pick(rest, per_class(a.train_per_class), rng) if a.train_per_class else rest["lesion_id"].tolist()
    return train_ids, test_ids


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
