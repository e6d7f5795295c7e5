"""Stage 05: blend member experiments, choose decisions on OOF, write submission.csv and the report."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import artifacts as A
from lib.core.artifacts import exp_dir, load_member, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, read_json, write_json, write_parquet
from lib.data.dataset import load_dataset
from lib.evaluation import ensemble
from lib.evaluation import metrics as M
from lib.evaluation import report as R
from lib.evaluation.bootstrap import bootstrap_macro_dice
from lib.evaluation.submission import (
    build_submission,
    choose_decision,
    write_submission,
)

log = logging.getLogger(__name__)


def _weights(s: dict, names: list[str], oofs: list[pd.DataFrame], train: pd.DataFrame, task: str
             ) -> tuple[np.ndarray, dict, dict | None]:
    """Blend weights (fixed, equal, or tuned per fold on OOF and averaged), normalized; + tuning info;
    + the per-fold tuned weights ({fold: weights}, None when nothing was tuned)."""
    fixed = [m["weight"] for m in s["members"]]
    info: dict = {}
    per_fold = None
    if len(names) == 1:
        w = np.array([1.0])
    elif all(x is not None for x in fixed):
        w = np.asarray(fixed, float)
    elif s["optimize_weights"]:
        metric = ensemble.task_blend_metric(s["blend_metric"], task)
        opt = ensemble.optimize_blend_weights(oofs, train, metric=metric, per_fold=True, method=s["blend"])
        w = np.asarray(opt["fold_avg"], float)
        per_fold = {int(k): row.to_numpy(float) for k, row in pd.DataFrame(opt["per_fold"]).iterrows()}
        info = {"metric": metric, "pooled": list(map(float, opt["pooled"])),
                "fold_avg": list(map(float, opt["fold_avg"])),
                "score_pooled": float(opt["score_pooled"]), "score_fold_avg": float(opt["score_fold_avg"]),
                "per_fold": pd.DataFrame(opt["per_fold"]).to_dict(orient="records")}
        log.info("blend weights (fold-averaged, used) %s; pooled-tuned %s", dict(zip(names, w.round(3).tolist())),
                 dict(zip(names, np.round(opt["pooled"], 3).tolist())))
    else:
        w = np.ones(len(names))
    return w / w.sum(), info, per_fold


def _nested(s: dict, task: str, classes: list[str], oofs: list[pd.DataFrame], train: pd.DataFrame,
            w: np.ndarray, per_fold: dict | None, metrics: dict, adjust=None) -> dict:
    """Old vs new honest estimate: thresholds nested (old) vs blend weights and thresholds nested (new)."""
    folds = sorted(int(f) for f in train["fold"].unique())
    res = ensemble.nested_blend_cv(oofs, train, per_fold or {f: w for f in folds}, method=s["blend"], post=adjust)
    out = {"weights_nested": per_fold is not None,
           "macro_dice_tuned_cv_old": metrics["macro_dice_tuned_cv"],
           "macro_dice_tuned_cv_nested": res["macro_dice_tuned_nested"],
           "weights_per_fold_used": res["weights_per_fold"]}
    if task == "multiclass":
        out.update(macro_f1_argmax_old=metrics["macro_f1_argmax"], macro_f1_argmax_nested=res["macro_f1_argmax_nested"])
        out["bootstrap"] = _bootstrap_se(train, classes, res)
    if task == "binary":
        out.update(pauc_80_old=metrics["pauc_80"],
                   pauc_80_nested=float(M.partial_auc(train[f"y_{classes[0]}"].to_numpy(), res["probs"][:, 0])))
    log.info("honest CV with the blend weights nested too: tuned %.4f (thresholds only nested: %.4f)%s",
             out["macro_dice_tuned_cv_nested"], out["macro_dice_tuned_cv_old"],
             f"; argmax {out['macro_f1_argmax_nested']:.4f} (was {out['macro_f1_argmax_old']:.4f})"
             if task == "multiclass" else "")
    return out


def _bootstrap_se(train: pd.DataFrame, classes: list[str], res: dict, n_boot: int = 1000) -> dict:
    """Standard error / 95% interval of the two nested estimates (argmax, tuned thresholds) over
    class-stratified bootstrap draws of the OOF lesions (`lib.evaluation.bootstrap`)."""
    y = train[[f"y_{c}" for c in classes]].to_numpy(np.float64)
    out = {"n_boot": n_boot, "draws": "class-stratified"}
    for name, dec in (("argmax", ensemble.argmax_decisions(res["probs"])), ("thresholds", res["decided_tuned"])):
        b = bootstrap_macro_dice(y, dec, n_boot=n_boot, seed=0)
        out[name] = {k: round(b[k], 4) for k in ("macro_dice", "se", "ci_low", "ci_high")}
    log.info("honest CV uncertainty (%d class-stratified bootstrap draws of the OOF lesions): argmax %.4f +- %.4f, "
             "tuned thresholds %.4f +- %.4f (SE)", n_boot, out["argmax"]["macro_dice"], out["argmax"]["se"],
             out["thresholds"]["macro_dice"], out["thresholds"]["se"])
    return out


def _adjuster(s: dict, task: str, classes: list[str], train: pd.DataFrame):
    """The logit adjustment `P -> P * prior ** -tau` (renormalized) of `submit.logit_adjust_tau`, or
    None (tau 0, or not a multiclass task)."""
    if s["logit_adjust_tau"] and task != "multiclass":
        log.warning("submit.logit_adjust_tau is for multiclass tasks; ignored for this %s task", task)
    if not s["logit_adjust_tau"] or task != "multiclass":
        return None
    priors = np.clip(train[[f"y_{c}" for c in classes]].to_numpy().mean(0), 1e-4, None)
    return lambda P: ensemble.logit_adjust(P, priors, s["logit_adjust_tau"])


def _logit_adjust(adjust, classes: list[str], oof: pd.DataFrame, te: pd.DataFrame | None) -> None:
    if adjust is not None:
        oof[classes] = adjust(oof[classes].to_numpy())
        if te is not None:
            te[classes] = adjust(te[classes].to_numpy())


def _submission(cfg: dict, info: dict, test: pd.DataFrame, te: pd.DataFrame, decision: str, thr: np.ndarray,
                out: Path) -> None:
    """Bake the decision into the blended test probabilities and write the validated submission.csv."""
    classes, task = info["classes"], info["task"]
    final = te.copy()
    P = te[classes].to_numpy(float)
    if decision == "thresholds":
        final[classes] = ensemble.remap_to_threshold(P, thr)
    elif decision == "argmax":
        final[classes] = ensemble.argmax_remap(P)
    key = cfg["data"]["generic"]["id_col"] if info["format"] == "generic" else None
    sub = build_submission(final, classes, info["format"], task, key)
    write_submission(sub, test[ID].astype(str).tolist(), out / A.SUBMISSION)
    log.info("wrote %s (%d rows)", out / A.SUBMISSION, len(sub))


def _decide(s: dict, task: str, cv: dict, honest: dict) -> tuple[str, float]:
    """The decision (thresholds / argmax / raw) and its expected score: the nested honest estimate."""
    # compare the two rules on the fully nested estimates (blend weights nested too), as they are reported
    nested = {**cv, "macro_dice_tuned_cv": honest["macro_dice_tuned_cv_nested"]}
    if "macro_f1_argmax_nested" in honest:
        nested["macro_f1_argmax"] = honest["macro_f1_argmax_nested"]
    decision = choose_decision(s["decision"], task, nested)
    if task == "multiclass":
        log.info("decision: %s (honest CV, blend weights nested: argmax %.4f vs tuned thresholds %.4f)", decision,
                 nested["macro_f1_argmax"], nested["macro_dice_tuned_cv"])
    else:
        log.info("decision: %s (%s task; OOF %s)", decision, task,
                 f"pAUC {cv['pauc_80']:.4f}" if task == "binary" else f"macro F1 tuned honest-CV {cv['macro_dice_tuned_cv']:.4f}")
    expected = {"thresholds": honest["macro_dice_tuned_cv_nested"], "argmax": honest.get("macro_f1_argmax_nested"),
                "raw": honest.get("pauc_80_nested", cv["macro_dice_05"])}[decision]
    return decision, expected


def _member_rows(cfg: dict, names: list[str], w: np.ndarray) -> list[dict]:
    """Report rows: each member's weight and its own OOF metrics from its cv.json."""
    rows = []
    for n, x in zip(names, w):
        p = A.exp_folder(cfg, n) / A.CV
        mcv = read_json(p) if p.exists() else {}
        rows.append({"exp": n, "weight": float(x), **{k: mcv[k] for k in R.MEMBER_METRICS if k in mcv}})
    return rows


def run(cfg: dict) -> dict:
    """Stage 05: blend members, choose decisions on OOF, bake thresholds in, write the submission;
    returns the cv.json document."""

    t0 = time.time()
    s = cfg["submit"]
    if not s["members"]:
        raise PipelineError("submit.members is empty: name the experiments to blend")
    info, train, test = load_dataset(cfg)
    classes, task = info["classes"], info["task"]
    out = exp_dir(cfg)
    names = [m["exp"] for m in s["members"]]
    loaded = [load_member(cfg, n, train, test, classes, role="submit.members member") for n in names]
    oofs, tests = [o for o, _ in loaded], [t for _, t in loaded]
    w, weights_info, per_fold = _weights(s, names, oofs, train, task)
    oof = ensemble.blend(oofs, w, method=s["blend"])
    te = ensemble.blend(tests, w, method=s["blend"]) if test is not None else None
    adjust = _adjuster(s, task, classes, train)
    _logit_adjust(adjust, classes, oof, te)
    metrics = R.cv_summary(train, oof, classes, task)
    honest = _nested(s, task, classes, oofs, train, w, per_fold, metrics, adjust)
    decision, expected = _decide(s, task, metrics, honest)
    thr = np.array([metrics["thresholds"][c] for c in classes])
    members = [{"exp": n, "weight": float(x)} for n, x in zip(names, w)]
    cv = A.cv_document("submit", cfg["exp"], task, metrics, submit={
        "members": members, "weights": weights_info, "decision": decision, "expected_score": expected,
        "honest_cv": honest})
    write_parquet(oof, out / A.OOF)
    if te is not None:
        write_parquet(te, out / A.TEST)
        cv["submit"]["fold_average_gap"] = ensemble.fold_average_gap(
            oof[classes].to_numpy(), te[classes].to_numpy(), thr, classes)
        _submission(cfg, info, test, te, decision, thr, out)
    else:
        log.warning("no test split: OOF blend and CV only, no submission.csv")
    note = {"thresholds": "submitted probabilities are remapped per class so that the tuned threshold lands at 0.5",
            "argmax": "submitted probabilities are remapped so that only the argmax class is above 0.5",
            "raw": "blended probabilities submitted as they are; thresholds are for reference only"}[decision]
    write_json({"decision": decision, "thresholds": metrics["thresholds"], "note": note}, out / A.THRESHOLDS)
    write_json(cv, out / A.CV)
    save_config(cfg, out)
    inputs = [A.input_record(cfg, A.prep_dir(cfg), "prep")]
    inputs += [A.input_record(cfg, A.exp_folder(cfg, n), "member") for n in names]
    if s["report"]:
        times = A.stage_times(cfg, inputs) + [{"number": A.STAGES["submit"][0], "stage": "submit",
                                               "exp": f"{cfg['exp']} (until this report)",
                                               "wall_seconds": time.time() - t0}]
        b = honest.get("bootstrap", {})
        headline = {**metrics, **{f"honest_{r}{k}": b[r][v] for r in ("argmax", "thresholds") if r in b
                                  for k, v in (("", "macro_dice"), ("_se", "se"))}}
        R.write_report(out, train, oof, classes, headline, metrics["thresholds"], decision,
                       _member_rows(cfg, names, w), R.load_histories(Path(cfg["paths"]["output"]), names),
                       title=f"{cfg['exp']}: submission report", task=task, stage_times=times)
    A.write_manifest(cfg, out, "submit", inputs, time.time() - t0)
    return cv
