#!/usr/bin/env python
"""Score a submission.csv against held-out ground truth (ours + the official ISIC scorer).

    python tools/score_submission.py --truth input/milk10k_sample/held_out/MILK10k_Test_GroundTruth.csv \
        --submission output/sample_submit/submission.csv [--json out.json] [--task auto] \
        [--bootstrap 2000 [--against output/other_submit/submission.csv]]

`--bootstrap N` (multiclass): the standard error and 95% interval of the macro Dice over N
class-stratified bootstrap draws of the held-out lesions (`lib.evaluation.bootstrap`); with
`--against` also the paired difference to another submission on the same draws: is a change real
or within the noise of this many held-out lesions?

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
from lib.evaluation.bootstrap import bootstrap_macro_dice  # noqa: E402
from lib.evaluation.metrics import align_to_truth, official_score, score_table  # noqa: E402
from tools._common import USER_ERRORS, run_tool  # noqa: E402


def _official(truth: pd.DataFrame, sub: pd.DataFrame, classes: list[str]) -> dict:
    try:
        off = official_score(truth, sub, classes)
        return {"official": {k: v for k, v in off.items() if isinstance(v, float)}}
    except PipelineError as e:  # the official scorer cannot score a class with no positives
        return {"official_error": str(e)}
    except ImportError:
        return {"official_error": "isic-challenge-scoring not installed (pip install -r requirements-dev.txt)"}


def _read_sub(path: str) -> pd.DataFrame:
    sub = pd.read_csv(path, dtype={0: str})
    return sub.rename(columns={sub.columns[0]: ID})


def _bootstrap(truth: pd.DataFrame, sub: pd.DataFrame, classes: list[str], task: str, a: argparse.Namespace) -> dict:
    if task != "multiclass":
        raise PipelineError(f"--bootstrap is for multiclass truth (macro Dice), not {task}")
    _, y, probs = align_to_truth(truth, sub, classes)
    other = None
    if a.against:
        try:
            other = align_to_truth(truth, _read_sub(a.against), classes)[2]
        except PipelineError as e:
            raise PipelineError(f"--against {a.against}: {e}") from None
    b = bootstrap_macro_dice(y, probs, other, n_boot=a.bootstrap, seed=a.seed)
    msg = f"bootstrap ({a.bootstrap} class-stratified draws): macro Dice {b['macro_dice']:.4f}, SE {b['se']:.4f}, " \
          f"95% [{b['ci_low']:.4f}, {b['ci_high']:.4f}]"
    if other is not None:
        msg += f"; vs {a.against}: {b['diff']:+.4f} (SE {b['diff_se']:.4f}, 95% [{b['diff_ci_low']:+.4f}, " \
               f"{b['diff_ci_high']:+.4f}], not better in {b['p_not_better']:.1%} of draws)"
    logging.info(msg)
    return b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True)
    p.add_argument("--submission", required=True)
    p.add_argument("--json", help="write the scores here")
    p.add_argument("--task", choices=["auto", "multiclass", "multilabel", "binary"], default="auto")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="class-stratified bootstrap draws for the macro Dice's SE / 95%% interval (multiclass)")
    p.add_argument("--against", help="a second submission: paired bootstrap difference (needs --bootstrap)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    a = p.parse_args(argv)
    if a.against and not a.bootstrap:
        p.error("--against needs --bootstrap N")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res: dict = {}
    code = run_tool(lambda: res.update(score(a)), errors=(*USER_ERRORS, OSError, KeyError, ValueError))
    if code == 0:
        report(res, a)
    return code


def score(a: argparse.Namespace) -> dict:
    """{task, ours, official (multiclass), bootstrap (when asked)} of the submission against the truth."""
    truth = pd.read_csv(a.truth, dtype=str)
    sub = _read_sub(a.submission)
    truth = truth.rename(columns={truth.columns[0]: ID})
    classes = [c for c in truth.columns if c != ID]
    truth[classes] = truth[classes].astype(float)
    task = a.task
    if task == "auto":
        task = ("binary" if len(classes) == 1 else
                "multilabel" if (truth[classes].to_numpy() > 0.5).sum(1).max() > 1 else "multiclass")
    res = {"task": task, "ours": score_table(truth, sub, classes, task)}
    if task == "multiclass":  # the official ISIC scorer installed here is the multiclass one
        res.update(_official(truth, sub, classes))
    if a.bootstrap:
        res["bootstrap"] = _bootstrap(truth, sub, classes, task, a)
    return res


def report(res: dict, a: argparse.Namespace) -> None:
    """The headline as a log line, the scores as JSON on stdout (and in --json)."""
    task, ours = res["task"], res["ours"]
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


if __name__ == "__main__":
    sys.exit(main())
