#!/usr/bin/env python
"""A full-size MILK10k timing release: all lesions of a training release as `MILK10k_Training_*`, plus
the test release of a split made by tools/make_test_split.py under new ids (`IL_T...`, `ISIC_T...`),
images linked. The test lesions are training lesions with new names, so the run is a timing run only
(no score); 01 would refuse shared ids.

    python tools/make_test_split.py --src ../shared/data/milk10k --out output/milk10k_split25 --test-frac 0.25 --link
    python tools/make_timing_release.py --src ../shared/data/milk10k --split output/milk10k_split25 \
        --out output/milk10k_timing
    bash run_all.sh configs/milk10k_dev --data output/milk10k_timing
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from lib.core.errors import DataError  # noqa: E402
from lib.core.io import write_csv  # noqa: E402
from tools._common import require_empty, run_tool  # noqa: E402

TRAINING = ("MILK10k_Training_GroundTruth.csv", "MILK10k_Training_Metadata.csv", "MILK10k_Training_Input")
TEST_META, TEST_INPUT = "MILK10k_Test_Metadata.csv", "MILK10k_Test_Input"


def renamed(meta: pd.DataFrame) -> pd.DataFrame:
    """The test metadata under new ids: IL_x -> IL_Tx, ISIC_y -> ISIC_Ty."""
    return meta.assign(lesion_id=meta["lesion_id"].str.replace(r"^IL_", "IL_T", regex=True),
                       isic_id=meta["isic_id"].str.replace(r"^ISIC_", "ISIC_T", regex=True))


def build(src: Path, split: Path, out: Path) -> int:
    missing = [str(p) for p in [*(src / n for n in TRAINING), split / TEST_META, split / TEST_INPUT] if not p.exists()]
    if missing:
        raise DataError(f"not found: {missing[0]} (--src: a MILK10k training release; --split: a "
                        "tools/make_test_split.py output)")
    require_empty(out)
    out.mkdir(parents=True, exist_ok=True)
    for n in TRAINING:
        os.symlink((src / n).resolve(), out / n)
    meta = pd.read_csv(split / TEST_META)
    new = renamed(meta)
    for (lesion, isic), (new_lesion, new_isic) in zip(meta[["lesion_id", "isic_id"]].itertuples(index=False),
                                                      new[["lesion_id", "isic_id"]].itertuples(index=False)):
        image = split / TEST_INPUT / lesion / f"{isic}.jpg"
        if not image.exists():
            raise DataError(f"{image} not found (listed in {split / TEST_META})")
        (out / TEST_INPUT / new_lesion).mkdir(parents=True, exist_ok=True)
        os.symlink(image.resolve(), out / TEST_INPUT / new_lesion / f"{new_isic}.jpg")
    write_csv(new, out / TEST_META)
    print(f"{out}: {new['lesion_id'].nunique()} test lesions, {len(new)} images; training -> {src}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="a MILK10k training release")
    ap.add_argument("--split", type=Path, required=True, help="a tools/make_test_split.py output")
    ap.add_argument("--out", type=Path, required=True, help="a new folder")
    a = ap.parse_args(argv)
    return run_tool(lambda: build(a.src, a.split, a.out))


if __name__ == "__main__":
    sys.exit(main())
