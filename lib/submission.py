"""Official-format submission files, validated with the official parser's rules before writing."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lib.errors import PipelineError
from lib.io import ID, write_text

log = logging.getLogger(__name__)

ID_COLUMN = {"milk10k": "lesion_id", "ham10000": "image", "isic2019": "image", "isic2024": "isic_id",
             "generic": "lesion_id"}


def id_column(fmt: str) -> str:
    return ID_COLUMN.get(fmt, ID)


def build_submission(probs: pd.DataFrame, classes: list[str], fmt: str, task: str,
                     key: str | None = None) -> pd.DataFrame:
    """`lesion_id` + class columns -> the challenge's layout (ISIC 2024: `isic_id,target`).
    `key`: the id column's name (default: the format's; generic data: its own id column)."""
    key = key or id_column(fmt)
    out = pd.DataFrame({key: probs[ID].astype(str).to_numpy()})
    if task == "binary" and fmt == "isic2024":
        out["target"] = probs[classes[0]].to_numpy(dtype=np.float64)
    else:
        for c in classes:
            out[c] = probs[c].to_numpy(dtype=np.float64)
    return out


def validate_submission(sub: pd.DataFrame, test_ids: list[str], columns: list[str], key: str) -> None:
    """The official parser's rules: key column, unique ids, exactly the test ids, all columns,
    float values in [0, 1], no NaN. Raises PipelineError naming the problem."""
    if list(sub.columns) != [key, *columns]:
        missing = sorted(set(columns) - set(sub.columns))
        extra = sorted(set(sub.columns) - set(columns) - {key})
        raise PipelineError(f"submission columns must be [{key}, {', '.join(columns)}]; "
                            f"missing {missing}, extra {extra}")
    ids = sub[key].astype(str)
    if ids.duplicated().any():
        raise PipelineError(f"submission has duplicate ids {ids[ids.duplicated()].unique()[:5].tolist()}")
    want, got = set(map(str, test_ids)), set(ids)
    if want != got:
        raise PipelineError(f"submission ids differ from the test lesions: missing {sorted(want - got)[:5]}, "
                            f"extra {sorted(got - want)[:5]}")
    vals = sub[columns].to_numpy()
    if not np.issubdtype(vals.dtype, np.floating):
        raise PipelineError("submission values must be floats")
    if np.isnan(vals).any():
        raise PipelineError(f"submission has NaN for ids {ids[np.isnan(vals).any(1)].tolist()[:5]}")
    bad = (vals < 0) | (vals > 1)
    if bad.any():
        raise PipelineError(f"submission values outside [0, 1] for ids {ids[bad.any(1)].tolist()[:5]}")


def to_csv_text(sub: pd.DataFrame) -> str:
    buf = io.StringIO()
    sub.to_csv(buf, index=False)  # full precision: remapped values just above 0.5 must stay above
    return buf.getvalue()


def write_submission(sub: pd.DataFrame, test_ids: list[str], path: str | Path) -> Path:
    """Validate, then write atomically; re-read the written text and validate again."""
    key, cols = sub.columns[0], list(sub.columns[1:])
    validate_submission(sub, test_ids, cols, key)
    text = to_csv_text(sub)
    back = pd.read_csv(io.StringIO(text), dtype={key: str})
    validate_submission(back, test_ids, cols, key)
    return write_text(text, path)


# --------------------------------------------------------------------------- stage 05
DECISIONS = ("auto", "thresholds", "argmax", "raw")


def choose_decision(asked: str, task: str, cv: dict) -> str:
    """The submission rule. `auto`: binary -> raw probabilities (the ISIC 2024 metric ranks them);
    multilabel -> per-class thresholds; multiclass -> the better OOF of argmax and tuned thresholds
    (honest CV). `argmax` is a single-label rule: refused for multilabel and binary tasks."""
    if asked not in DECISIONS:
        raise PipelineError(f"config: submit.decision '{asked}' unknown (one of {DECISIONS})")
    if asked == "argmax" and task != "multiclass":
        raise PipelineError(f"config: submit.decision 'argmax' needs a multiclass task; this one is {task}")
    if asked != "auto":
        return asked
    if task == "binary":
        return "raw"
    if task == "multilabel":
        return "thresholds"
    return "thresholds" if cv["macro_dice_tuned_cv"] >= cv.get("macro_f1_argmax", -1.0) else "argmax"


def load_member(cfg: dict, exp: str, train: pd.DataFrame, test: pd.DataFrame | None,
                classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A member's OOF and test probabilities, rows in train/test order, ids asserted."""
    from lib.config import exp_dir
    from lib.io import assert_same_ids, read_table

    folder = exp_dir(cfg).parent / exp
    oof = read_table(folder / "oof.parquet")
    missing = [c for c in classes if c not in oof.columns]
    if missing:
        raise PipelineError(f"{folder}/oof.parquet lacks class columns {missing}")
    assert_same_ids(train, oof, f"member {exp}: OOF vs train lesions")
    oof = oof.set_index(ID).loc[train[ID].to_numpy()].reset_index()[[ID, *classes]]
    te = None
    if test is not None:
        te = read_table(folder / "test.parquet")
        assert_same_ids(test, te, f"member {exp}: test predictions vs test lesions")
        te = te.set_index(ID).loc[test[ID].to_numpy()].reset_index()[[ID, *classes]]
    return oof, te


def run(cfg: dict) -> dict:
    """Stage 05: blend members, choose decisions on OOF, bake thresholds in, write the submission."""
    from lib import ensemble
    from lib import report as R
    from lib.config import exp_dir, save_config
    from lib.io import write_json, write_parquet
    from lib.prepare import load_dataset

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
