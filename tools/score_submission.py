#!/usr/bin/env python
"""Score a submission.csv against held-out ground truth (ours + the official ISIC scorer).

    python tools/score_submission.py --truth input/milk10k_sample/held_out/MILK10k_Test_GroundTruth.csv \
        --submission output/sample_submit/submission.csv [--json out.json] [--task auto]

Task `auto`: binary when the truth has one label column (ISIC 2024 `isic_id,target`: AUC and
partial AUC above 80% TPR, the Kaggle ISIC 2024 metric), multilabel when a truth row has several
positives, else multiclass (macro Dice = the MILK10k metric, balanced accuracy = ISIC 2018/2019).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from lib.core.errors import PipelineError  # noqa: E402
from lib.core.io import ID, write_json  # noqa: E402
from lib.evaluation.metrics import official_score, score_table  # noqa: E402


def _official(truth: pd.DataFrame, sub: pd.DataFrame, classes: list[str]) -> dict:
    try:
        off = official_score(truth, sub, classes)
        return {"official": {k: v for k, v in off.items() if isinstance(v, float)}}
    except PipelineError as e:  # the official scorer cannot score a class with no positives
        return {"official_error": str(e)}
    except ImportError:
        return {"official_error": "isic-challenge-scoring not installed (pip install -r requirements-dev.txt)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True)
    p.add_argument("--submission", required=True)
    p.add_argument("--json", help="write the scores here")
    p.add_argument("--task", choices=["auto", "multiclass", "multilabel", "binary"], default="auto")
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
        task = a.task
        if task == "auto":
            task = ("binary" if len(classes) == 1 else
                    "multilabel" if (truth[classes].to_numpy() > 0.5).sum(1).max() > 1 else "multiclass")
        ours = score_table(truth, sub, classes, task)
        res = {"task": task, "ours": ours}
        if task == "multiclass":  # the official ISIC scorer installed here is the multiclass one
            res.update(_official(truth, sub, classes))
    except (PipelineError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if task == "binary":
        logging.info("AUC %.4f | pAUC above 80%% TPR %.4f (max 0.2)", ours["auc"], ours["pauc"])
    elif task == "multilabel":
        logging.info("macro F1 %.4f | top-1 %.4f | top-3 %.4f", ours["macro_f1"], ours["top1_accuracy"],
                     ours["top3_accuracy"])
    else:
        logging.info("macro Dice (ours) %.4f | balanced accuracy %.4f | official %s", ours["macro_dice"],
                     ours["balanced_accuracy"], f"macro Dice {res['official']['macro_dice']:.4f}, balanced accuracy "
                     f"{res['official']['balanced_accuracy']:.4f}" if "official" in res else res.get("official_error"))
    print(json.dumps(res, indent=2, default=float))
    if a.json:
        write_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
