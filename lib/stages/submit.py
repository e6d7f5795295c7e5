"""Stage 05: blend member experiments, choose decisions on OOF, write submission.csv and the report."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from lib.core.artifacts import exp_dir, load_member, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, write_json, write_parquet
from lib.data.dataset import load_dataset
from lib.evaluation import ensemble
from lib.evaluation import report as R
from lib.evaluation.submission import (
    build_submission,
    choose_decision,
    write_submission,
)

log = logging.getLogger(__name__)


def run(cfg: dict) -> dict:
    """Stage 05: blend members, choose decisions on OOF, bake thresholds in, write the submission."""

    s = cfg["submit"]
    members = s["members"]
    if not members:
        raise PipelineError("submit.members is empty: name the experiments to blend")
    info, train, test = load_dataset(cfg)
    classes, task = info["classes"], info["task"]
    out = exp_dir(cfg)
    loaded = [load_member(cfg, m["exp"], train, test, classes) for m in members]
    oofs, tests = [o for o, _ in loaded], [t for _, t in loaded]
    names = [m["exp"] for m in members]
    weights_info: dict = {}
    fixed = [m["weight"] for m in members]
    if len(members) == 1:
        w = np.array([1.0])
    elif all(x is not None for x in fixed):
        w = np.asarray(fixed, float)
    elif s["optimize_weights"]:
        metric = ensemble.task_blend_metric(s["blend_metric"], task)
        opt = ensemble.optimize_blend_weights(oofs, train, metric=metric, per_fold=True, method=s["blend"])
        w = np.asarray(opt["fold_avg"], float)
        weights_info = {"metric": metric, "pooled": list(map(float, opt["pooled"])),
                        "fold_avg": list(map(float, opt["fold_avg"])),
                        "score_pooled": float(opt["score_pooled"]), "score_fold_avg": float(opt["score_fold_avg"]),
                        "per_fold": pd.DataFrame(opt["per_fold"]).to_dict(orient="records")}
        log.info("blend weights (fold-averaged, used) %s; pooled-tuned %s", dict(zip(names, w.round(3).tolist())),
                 dict(zip(names, np.round(opt["pooled"], 3).tolist())))
    else:
        w = np.ones(len(members))
    w = w / w.sum()
    oof = ensemble.blend(oofs, w, method=s["blend"])
    te = ensemble.blend(tests, w, method=s["blend"]) if test is not None else None
    if s["logit_adjust_tau"] and task != "multiclass":
        log.warning("submit.logit_adjust_tau is for multiclass tasks; ignored for this %s task", task)
    elif s["logit_adjust_tau"]:
        priors = np.clip(train[[f"y_{c}" for c in classes]].to_numpy().mean(0), 1e-4, None)
        oof[classes] = ensemble.logit_adjust(oof[classes].to_numpy(), priors, s["logit_adjust_tau"])
        if te is not None:
            te[classes] = ensemble.logit_adjust(te[classes].to_numpy(), priors, s["logit_adjust_tau"])
    cv = R.cv_summary(train, oof, classes, task)
    decision = choose_decision(s["decision"], task, cv)
    thr = np.array([cv["thresholds"][c] for c in classes])
    if task == "multiclass":
        log.info("decision: %s (OOF macro F1 argmax %.4f vs tuned thresholds honest-CV %.4f)", decision,
                 cv["macro_f1_argmax"], cv["macro_dice_tuned_cv"])
    else:
        log.info("decision: %s (%s task; OOF %s)", decision, task,
                 f"pAUC {cv['pauc_80']:.4f}" if task == "binary" else f"macro F1 tuned honest-CV {cv['macro_dice_tuned_cv']:.4f}")
    expected = {"thresholds": cv["macro_dice_tuned_cv"], "argmax": cv.get("macro_f1_argmax"),
                "raw": cv.get("pauc_80", cv["macro_dice_05"])}[decision]
    summary = {"members": [{"exp": n, "weight": float(x)} for n, x in zip(names, w)], "weights": weights_info,
               "decision": decision, "cv": cv, "expected_score": expected}
    write_parquet(oof, out / "oof.parquet")
    if te is not None:
        write_parquet(te, out / "test_blend.parquet")
        final = te.copy()
        P = te[classes].to_numpy(float)
        if decision == "thresholds":
            final[classes] = ensemble.remap_to_threshold(P, thr)
        elif decision == "argmax":
            final[classes] = ensemble.argmax_remap(P)
        key = cfg["data"]["generic"]["id_col"] if info["format"] == "generic" else None
        sub = build_submission(final, classes, info["format"], task, key)
        write_submission(sub, test[ID].astype(str).tolist(), out / "submission.csv")
        log.info("wrote %s (%d rows)", out / "submission.csv", len(sub))
    else:
        log.warning("no test split: OOF blend and CV only, no submission.csv")
    note = {"thresholds": "submitted probabilities are remapped per class so that the tuned threshold lands at 0.5",
            "argmax": "submitted probabilities are remapped so that only the argmax class is above 0.5",
            "raw": "blended probabilities submitted as they are; thresholds are for reference only"}[decision]
    write_json({"decision": decision, "thresholds": cv["thresholds"], "note": note}, out / "thresholds.json")
    write_json(summary, out / "cv.json")
    save_config(cfg, out)
    if s["report"]:
        R.write_report(out, train, oof, classes, cv, cv["thresholds"], decision, summary["members"],
                       R.load_histories(exp_dir(cfg).parent, names), title=f"{cfg['exp']}: submission report",
                       task=task)
    return summary
