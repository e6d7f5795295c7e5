#!/usr/bin/env python
"""Lay out part of an ISIC 2019 training release as a labelled train release + an unlabelled test
release in the official ISIC 2019 layout (split by `lesion_id`, stratified by class, seeded).

    python tools/make_isic2019_split.py --src ../shared/data/isic2019 --out output/isic2019_split --test-frac 0.2 --link

Writes `<out>/ISIC_2019_Training_{GroundTruth,Metadata}.csv` + `ISIC_2019_Training_Input/`,
`<out>/ISIC_2019_Test_Metadata.csv` (image, age_approx, anatom_site_general, sex: the official test
columns) + `ISIC_2019_Test_Input/`, and `<out>/held_out/ISIC_2019_Test_GroundTruth.csv` (official
columns MEL..SCC,UNK) where no reader looks. Images without a lesion_id are their own lesion.

Data: ISIC 2019 (CC-BY-NC 4.0): Tschandl et al. 2018 (HAM10000); Codella et al. 2017; Combalia et al. 2019.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from lib.core.errors import PipelineError  # noqa: E402
from lib.core.io import write_csv  # noqa: E402
from lib.data.formats import read_csv  # noqa: E402
from tools._common import require_empty, run_tool, setup_logging  # noqa: E402
from tools.split_common import place_image, split_parser  # noqa: E402

log = logging.getLogger("make_isic2019_split")
TEST_META = ["image", "age_approx", "anatom_site_general", "sex"]


def lesion_table(gt: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """image, lesion (lesion_id or the image itself), class name of the image."""
    classes = [c for c in gt.columns if c != "image"]
    m = meta.merge(gt, on="image", how="inner", validate="one_to_one")
    if len(m) != len(gt):
        raise PipelineError(f"{len(gt) - len(m)} ground-truth images have no metadata row")
    m["dx"] = m[classes].astype(float).idxmax(axis=1)
    lesion = m["lesion_id"] if "lesion_id" in m else pd.Series(pd.NA, index=m.index)
    m["lesion"] = lesion.fillna(m["image"]).astype(str)
    return m


def split_lesions(m: pd.DataFrame, frac: float, seed: int) -> set[str]:
    les = m.drop_duplicates("lesion")[["lesion", "dx"]]
    counts = les["dx"].value_counts()
    strat = les["dx"].where(les["dx"].map(counts) >= 2, "_rare")
    _, te = train_test_split(les, test_size=frac, stratify=strat, random_state=seed)
    return set(te["lesion"])


def make_split(a: argparse.Namespace) -> None:
    src, out = Path(a.src), Path(a.out)
    gt = read_csv(src / "ISIC_2019_Training_GroundTruth.csv", "ISIC 2019 ground truth", ["image"])
    meta = read_csv(src / "ISIC_2019_Training_Metadata.csv", "ISIC 2019 metadata", ["image"])
    m = lesion_table(gt, meta)
    test = split_lesions(m, a.test_frac, a.seed)
    require_empty(out)
    for split, tag in (("train", "Training"), ("test", "Test")):
        rows = m[m["lesion"].isin(test) == (split == "test")]["image"]
        g, md = gt[gt["image"].isin(rows)], meta[meta["image"].isin(rows)]
        for iid in g["image"]:
            place_image(src / "ISIC_2019_Training_Input" / f"{iid}.jpg",
                        out / f"ISIC_2019_{tag}_Input" / f"{iid}.jpg", None, a.link, 90)
        if split == "train":
            write_csv(g, out / "ISIC_2019_Training_GroundTruth.csv")
            write_csv(md, out / "ISIC_2019_Training_Metadata.csv")
        else:
            write_csv(md[[c for c in TEST_META if c in md]], out / "ISIC_2019_Test_Metadata.csv")
            write_csv(g, out / "held_out" / "ISIC_2019_Test_GroundTruth.csv")
        log.info("%s: %d images", split, len(g))


def main(argv: list[str] | None = None) -> int:
    a = split_parser(__doc__, "ISIC 2019 folder (official training files)").parse_args(argv)
    setup_logging()
    return run_tool(lambda: make_split(a))


if __name__ == "__main__":
    sys.exit(main())
