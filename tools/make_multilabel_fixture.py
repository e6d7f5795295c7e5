#!/usr/bin/env python
"""Write a small synthetic multi-label data set in the generic CSV layout (SCIN style).

SCIN (Google's Skin Condition Image Network) cases carry several possible conditions each; this
fixture mimics that shape without its images: every case is a picture of skin-toned background
with 0-3 "findings" drawn on it (one colour and shape per condition), so the labels are learnable
from the pixels, and age / sex / Fitzpatrick type metadata. Labels are multi-hot columns.

    python tools/make_multilabel_fixture.py --out output/multilabel_fixture --n-train 120 --n-test 40

Layout: `train.csv` (case_id, image, age, sex, fitzpatrick, one 0/1 column per condition),
`test.csv` (no label columns), `images/<case_id>.jpg`, `held_out/test_truth.csv`
(case_id + condition columns) for scoring only. Seeded: the same arguments give the same files.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lib.core.io import write_csv  # noqa: E402
from tools._common import require_empty, run_tool, setup_logging  # noqa: E402

log = logging.getLogger("make_multilabel_fixture")
# condition -> (BGR colour, shape); prevalence differs per condition (some are rare)
CONDITIONS = {"eczema": ((40, 40, 200), "blob", 0.45), "psoriasis": ((200, 200, 230), "plaque", 0.30),
              "acne": ((60, 60, 160), "dots", 0.30), "tinea": ((60, 140, 190), "ring", 0.20),
              "urticaria": ((150, 120, 230), "wheal", 0.12)}


def _draw(img: np.ndarray, colour: tuple[int, int, int], shape: str, rng: np.random.Generator) -> None:
    s = img.shape[0]
    cx, cy = (int(v) for v in rng.integers(s // 5, 4 * s // 5, 2))
    r = int(rng.integers(s // 10, s // 5))
    if shape == "blob":
        cv2.ellipse(img, (cx, cy), (r, int(r * 0.6)), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    elif shape == "plaque":
        cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, -1)
    elif shape == "dots":
        for _ in range(6):
            p = rng.integers(s // 8, 7 * s // 8, 2)
            cv2.circle(img, (int(p[0]), int(p[1])), max(2, s // 30), colour, -1)
    elif shape == "ring":
        cv2.circle(img, (cx, cy), r, colour, max(2, s // 40))
    else:
        pts = (np.array([cx, cy]) + rng.normal(0, r * 0.6, (7, 2))).astype(np.int32)
        cv2.fillPoly(img, [cv2.convexHull(pts)], colour)


def make_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, int], dict]:
    fitz = int(rng.integers(1, 7))
    tone = np.array([200, 170, 140]) * (1.15 - 0.12 * fitz)  # lighter to darker skin
    img = np.clip(rng.normal(tone, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    labels = {c: int(rng.random() < p) for c, (_, _, p) in CONDITIONS.items()}
    if not any(labels.values()):  # every case has at least one condition (as SCIN's labelled cases)
        labels[str(rng.choice(list(CONDITIONS)))] = 1
    for c, (colour, shape, _) in CONDITIONS.items():
        if labels[c]:
            _draw(img, colour, shape, rng)
    img = cv2.GaussianBlur(img, (3, 3), 0)
    meta = {"age": int(rng.integers(5, 90)), "sex": str(rng.choice(["female", "male"])), "fitzpatrick": f"FST{fitz}"}
    return img, labels, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    setup_logging()
    return run_tool(lambda: make_fixture(a))


def make_fixture(a: argparse.Namespace) -> None:
    out = require_empty(Path(a.out))
    rng = np.random.default_rng(a.seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.n_train + a.n_test):
        img, labels, meta = make_case(rng, a.size)
        cid = f"case_{i:05d}"
        cv2.imwrite(str(out / "images" / f"{cid}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append({"case_id": cid, "image": f"{cid}.jpg", **meta, **labels})
    df = pd.DataFrame(rows)
    tr, te = df.iloc[:a.n_train], df.iloc[a.n_train:]
    write_csv(tr, out / "train.csv")
    write_csv(te.drop(columns=list(CONDITIONS)), out / "test.csv")
    write_csv(te[["case_id", *CONDITIONS]], out / "held_out" / "test_truth.csv")
    log.info("train %d cases (positives per condition %s), test %d cases", len(tr),
             tr[list(CONDITIONS)].sum().to_dict(), len(te))


if __name__ == "__main__":
    sys.exit(main())
