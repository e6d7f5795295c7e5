"""Stage 05: blend member experiments, evaluate the decision rule nested (lib.evaluation.decision and
ensemble.nested_blend_cv), write submission.csv, cv.json and the report. Orchestration only."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import artifacts as A
from lib.core.artifacts import exp_dir, load_member, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, read_json, write_json, write_parquet, write_text
from lib.data.dataset import load_dataset
from lib.evaluation import decision as D
from lib.evaluation import ensemble
from lib.evaluation import model_card as MC
from lib.evaluation import report as R
from lib.evaluation.bootstrap import bootstrap_ranking, nested_uncertainty
from lib.evaluation.submission import build_submission, write_submission

log = logging.getLogger(__name__)


def _honest(s: dict, task: str, classes: list[str], oofs: list[pd.DataFrame], train: pd.DataFrame,
            w: np.ndarray, per_fold: dict | None, tau: float) -> tuple[dict, dict]:
    """The nested CV of the whole decision: (cv.json's `honest_cv` block: its figures, what each
    nests and their bootstrap uncertainty; the raw `nested_blend_cv` result)."""
    folds = sorted(int(f) for f in train["fold"].unique())
    res = ensemble.nested_blend_cv(oofs, train, per_fold or {f: w for f in folds}, method=s["blend"], tau=tau,
                                   asked=s["decision"], task=task)
    chosen = D.rule_is_chosen(s["decision"], task)
    rule = "nested" if chosen else f"fixed ({D.choose_decision(s['decision'], task)})"
    weights, priors, each = ("nested" if per_fold is not None else "fixed"), ("nested" if tau else None), \
        ("per rule" if chosen else "fixed")
    out = {"weights_nested": per_fold is not None, "priors_nested": bool(tau),
           "macro_dice_nested": res["macro_dice_nested"], "rules_per_fold": res["rules_per_fold"],
           "macro_dice_tuned_cv_nested": res["macro_dice_tuned_nested"],
           "weights_per_fold_used": res["weights_per_fold"]}
    nesting = {"macro_dice_nested": R.nesting(weights, "nested", rule, priors),
               "macro_dice_tuned_cv_nested": R.nesting(weights, "nested", f"{each} (thresholds)", priors)}
    if task == "multiclass":
        out["macro_f1_argmax_nested"] = res["macro_f1_argmax_nested"]
        nesting["macro_f1_argmax_nested"] = R.nesting(weights, "none", f"{each} (argmax)", priors)
        y = train[[f"y_{c}" for c in classes]].to_numpy(np.float64)
        out["bootstrap"] = nested_uncertainty(y, {"argmax": D.argmax_decisions(res["probs"]),
                                                  "thresholds": res["decided_tuned"], "decision": res["decided"]})
    if task == "binary":
        out["pauc_80_nested"] = res["pauc_80_nested"]
        nesting["pauc_80_nested"] = R.nesting(weights, "none", "none (ranks)", priors)
        groups = train["group"].to_numpy() if "group" in train.columns else None
        out["bootstrap"] = bootstrap_ranking(train[f"y_{classes[0]}"].to_numpy(), res["probs"][:, 0], groups)
    out["nesting"] = nesting
    log.info("nested CV (weights%s, thresholds%s fitted without the fold scored): %.4f%s; per rule: "
             "thresholds %.4f%s", " + priors" if tau else "", " + rule" if chosen else "", out["macro_dice_nested"],
             f" (rules per fold {res['rules_per_fold']})" if chosen else "", out["macro_dice_tuned_cv_nested"],
             f", argmax {out['macro_f1_argmax_nested']:.4f}" if task == "multiclass" else "")
    return out, res


def _decide(s: dict, task: str, res: dict, honest: dict) -> dict:
    """The submission's rule, chosen on all OOF rows (the deployment choice), and its expected score:
    the fully nested figure (the rule re-chosen per fold on the other folds)."""
    decision = D.deployment_rule(s["decision"], task, res)
    expected = D.expected_score(decision, task, res)
    key = "pauc_80_nested" if task == "binary" and decision == "raw" else "macro_dice_nested"
    chosen_on = ("all OOF rows (the deployment choice: the nested argmax and thresholds estimates compared); "
                 "expected_score re-chooses it for each fold on the other folds only (honest_cv.rules_per_fold)"
                 if D.rule_is_chosen(s["decision"], task) else f"fixed (submit.decision {s['decision']}, {task} task)")
    log.info("decision: %s, chosen on %s; expected score %.4f (%s)", decision, chosen_on.split(" (")[0], expected,
             honest["nesting"][key])
    return {"decision": decision, "decision_chosen_on": chosen_on, "expected_score": expected,
            "expected_score_nesting": honest["nesting"][key]}


def write_test_submission(cfg: dict, info: dict, test: pd.DataFrame, te: pd.DataFrame, dep: dict, out: Path) -> None:
    """Bake the deployment's decision into the blended test probabilities `te` and write the validated
    submission.csv (05, and the predict path of a bundle)."""
    classes = info["classes"]
    thr = np.array([dep["thresholds"][c] for c in classes])
    final = te.copy()
    final[classes] = D.bake(te[classes].to_numpy(float), dep["decision"], thr)
    key = cfg["data"]["generic"]["id_col"] if info["format"] == "generic" else None
    sub = build_submission(final, classes, info["format"], info["task"], key)
    write_submission(sub, test[ID].astype(str).tolist(), out / A.SUBMISSION)
    log.info("wrote %s (%d rows)", out / A.SUBMISSION, len(sub))


def _headline(metrics: dict, honest: dict, chosen: dict) -> dict:
    """The report's headline: the OOF summary plus the nested figures with their standard errors."""
    b, how = honest.get("bootstrap", {}), honest["nesting"]
    out = {**metrics, "nesting": {**metrics["nesting"], "nested_expected": chosen["expected_score_nesting"]},
           "nested_expected": chosen["expected_score"]}
    for name, key, boot in (("argmax", "macro_f1_argmax_nested", "argmax"),
                            ("thresholds", "macro_dice_tuned_cv_nested", "thresholds")):
        if key in honest:
            out[f"nested_{name}"], out["nesting"][f"nested_{name}"] = honest[key], how[key]
            if boot in b:
                out[f"nested_{name}_se"] = b[boot]["se"]
    for key in ("auc", "pauc_80"):  # binary: the ranking figures' cluster-bootstrap standard errors
        if key in b and key in metrics:
            out[f"{key}_se"] = b[key]["se"]
    if "decision" in b and chosen["expected_score_nesting"] == how["macro_dice_nested"]:
        out["nested_expected_se"] = b["decision"]["se"]
    return out


def _member_rows(cfg: dict, names: list[str], w: np.ndarray) -> list[dict]:
    """Report rows: each member's weight and its own OOF metrics from its cv.json."""
    rows = []
    for n, x in zip(names, w):
        p = A.exp_folder(cfg, n) / A.CV
        mcv = read_json(p) if p.exists() else {}
        rows.append({"exp": n, "weight": float(x), **{k: mcv[k] for k in R.MEMBER_METRICS if k in mcv}})
    return rows


def run(cfg: dict) -> dict:
    """Stage 05: blend members, evaluate the decision nested, choose it on all OOF rows, bake it into the
    test probabilities, write the submission; returns the cv.json document."""

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
    w, weights_info, per_fold = ensemble.blend_weights(oofs, train, names, [m["weight"] for m in s["members"]],
                                                       s["optimize_weights"], s["blend_metric"], task, s["blend"])
    oof = ensemble.blend(oofs, w, method=s["blend"])
    tau = D.adjust_tau(s["logit_adjust_tau"], task)
    y = train[[f"y_{c}" for c in classes]].to_numpy()
    if tau:  # the deployment: priors from all training labels
        oof[classes] = D.logit_adjuster(tau, y)(oof[classes].to_numpy())
    metrics = R.cv_summary(train, oof, classes, task, weights="not nested" if per_fold is not None else "fixed",
                           priors="not nested" if tau else None, rule_chosen=D.rule_is_chosen(s["decision"], task))
    honest, res = _honest(s, task, classes, oofs, train, w, per_fold, tau)
    chosen = _decide(s, task, res, honest)
    decision = chosen["decision"]
    thr = np.array([metrics["thresholds"][c] for c in classes])
    dep = ensemble.deployment(classes, task, names, w, s["blend"], tau, y, decision, metrics["thresholds"])
    te = ensemble.deployed_probs(dep, tests) if test is not None else None
    cv = A.cv_document("submit", cfg["exp"], task, metrics, submit={
        "members": dep["members"], "weights": weights_info, **chosen, "honest_cv": honest})
    write_parquet(oof, out / A.OOF)
    if te is not None:
        write_parquet(te, out / A.TEST)
        cv["submit"]["fold_average_gap"] = ensemble.fold_average_gap(
            oof[classes].to_numpy(), te[classes].to_numpy(), thr, classes)
        write_test_submission(cfg, info, test, te, dep, out)
    else:
        log.warning("no test split: OOF blend and CV only, no submission.csv")
    write_json({"decision": decision, "thresholds": metrics["thresholds"], "note": D.NOTES[decision]},
               out / A.THRESHOLDS)
    write_json(dep, out / A.DEPLOYMENT)
    write_json(cv, out / A.CV)
    enc_path = A.prep_dir(cfg) / A.META_ENCODERS  # the model card: per-class and per-subgroup figures on OOF rows
    _, oof_p, _ = R.oof_arrays(train, oof, classes)
    card = MC.build_model_card(train, oof_p, D.apply_rule(oof_p, decision, thr), classes, task, cv, info,
                               read_json(enc_path) if enc_path.exists() else {}, seed=int(cfg["seed"]))
    write_json(card, out / A.MODEL_CARD_JSON)
    write_text(MC.card_markdown(card), out / A.MODEL_CARD_MD)
    save_config(cfg, out)
    inputs = [A.input_record(cfg, A.prep_dir(cfg), "prep")]
    inputs += [A.input_record(cfg, A.exp_folder(cfg, n), "member") for n in names]
    if s["report"]:
        times = A.stage_times(cfg, inputs) + [{"number": A.STAGES["submit"][0], "stage": "submit",
                                               "exp": f"{cfg['exp']} (until this report)",
                                               "wall_seconds": time.time() - t0}]
        R.write_report(out, train, oof, classes, _headline(metrics, honest, chosen), metrics["thresholds"],
                       decision, _member_rows(cfg, names, w), R.load_histories(Path(cfg["paths"]["output"]), names),
                       title=f"{cfg['exp']}: submission report", task=task, stage_times=times, card=card)
    A.write_manifest(cfg, out, "submit", inputs, time.time() - t0)
    return cv
