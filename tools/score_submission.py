#!/usr/bin/env python
"""Score a submission.csv against held-out ground truth with the official ISIC scorer.

    python tools/score_submission.py --truth input/milk10k_sample/held_out/MILK10k_Test_GroundTruth.csv \
        --submission output/sample_submit/submission.csv [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from lib.errors import PipelineError  # noqa: E402
from lib.io import ID, write_json  # noqa: E402
from lib.metrics import official_score, score_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True)
    p.add_argument("--submission", required=True)
    p.add_argument("--json", help="write the scores here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        truth = pd.read_csv(a.truth, dtype=str)
        sub = pd.read_csv(a.submission, dtype={0: str})
        key = sub.columns[0]
        truth = truth.rename(columns={truth.columns[0]: ID})
        sub = sub.rename(columns={key: ID})
        classes = [c for c in truth.columns if c != ID]
        truth[classes] = truth[classes].astype(float)
        ours = score_table(truth, sub, classes, "multiclass")
        res = {"ours": ours}
        try:
            off = official_score(truth, sub, classes)
            res["official"] = {k: v for k, v in off.items() if isinstance(v, float)}
        except PipelineError as e:  # the official scorer cannot score a class with no positives
            res["official_error"] = str(e)
        except ImportError:
            res["official_error"] = "isic-challenge-scoring not installed (pip install -r requirements-dev.txt)"
    except (PipelineError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info("macro Dice (ours) %.4f | official %s", ours["macro_dice"],
                 f"{res['official']['macro_dice']:.4f}" if "official" in res else res.get("official_error"))
    print(json.dumps(res, indent=2, default=float))
    if a.json:
        write_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
