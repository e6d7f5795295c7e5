#!/usr/bin/env python
"""Lay out part of a labelled MILK10k training release as an official test release.

Writes `<out>/MILK10k_Training_*` (the rest), `<out>/MILK10k_Test_Input/<lesion_id>/<isic_id>.jpg`,
`<out>/MILK10k_Test_Metadata.csv` and the held-out labels aside in
`<out>/held_out/MILK10k_Test_GroundTruth.csv` (no reader looks there), so the whole route can be
scored end to end with the official scorer. Stratified and seeded.

    python tools/make_test_split.py --src ../shared/data/milk10k --out output/milk10k_split --test-frac 0.2
    # the shipped sample (images re-encoded at 256 px, a fixed number of lesions per class):
    python tools/make_test_split.py --src ../shared/data/milk10k --out input/milk10k_sample \
        --train-per-class BCC=25,NV=10,BKL=10,SCCKA=8,MEL=8,AKIEC=8,DF=6,INF=6,VASC=6,BEN_OTH=6,MAL_OTH=5 \
        --test-per-class BCC=8,NV=3,BKL=3,SCCKA=3,MEL=3,AKIEC=2,DF=2,INF=2,VASC=2,BEN_OTH=2,MAL_OTH=2 --resize 256
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.core.io import write_csv  # noqa: E402
from lib.data.formats import MILK_CLASSES, read_csv  # noqa: E402
from tools._common import require_empty, run_tool, setup_logging  # noqa: E402
from tools.split_common import choose_lesions, place_image, split_parser  # noqa: E402

log = logging.getLogger("make_test_split")


def make_split(a: argparse.Namespace) -> None:
    src, out = Path(a.src), Path(a.out)
    gt = read_csv(src / "MILK10k_Training_GroundTruth.csv", "ground truth", ["lesion_id"])
    meta = read_csv(src / "MILK10k_Training_Metadata.csv", "metadata", ["lesion_id", "isic_id"])
    classes = [c for c in MILK_CLASSES if c in gt.columns]
    gt["dx"] = gt[classes].astype(float).to_numpy().argmax(1)
    gt["dx"] = gt["dx"].map(dict(enumerate(classes)))
    train_ids, test_ids = choose_lesions(gt, a)
    require_empty(out)
    for split, ids in (("Training", sorted(train_ids)), ("Test", sorted(test_ids))):
        m = meta[meta["lesion_id"].isin(ids)].sort_values(["lesion_id", "image_type"])
        for _, r in m.iterrows():
            place_image(src / "MILK10k_Training_Input" / r.lesion_id / f"{r.isic_id}.jpg",
                        out / f"MILK10k_{split}_Input" / r.lesion_id / f"{r.isic_id}.jpg", a.resize, a.link, 85)
        write_csv(m, out / f"MILK10k_{split}_Metadata.csv")
        g = gt[gt["lesion_id"].isin(ids)].drop(columns="dx").sort_values("lesion_id")
        write_csv(g, out / ("MILK10k_Training_GroundTruth.csv" if split == "Training"
                            else "held_out/MILK10k_Test_GroundTruth.csv"))
        sup = src / "MILK10k_Training_Supplement.csv"
        if split == "Training" and sup.exists():
            s = read_csv(sup, "supplement", ["isic_id"])
            write_csv(s[s["isic_id"].isin(m["isic_id"])], out / "MILK10k_Training_Supplement.csv")
        log.info("%s: %d lesions, %d images", split, len(ids), len(m))


def main(argv: list[str] | None = None) -> int:
    a = split_parser(__doc__, "MILK10k training release folder", "CLASS", 85).parse_args(argv)
    setup_logging()
    return run_tool(lambda: make_split(a))


if __name__ == "__main__":
    sys.exit(main())
