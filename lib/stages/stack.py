"""Stage 04: join embeddings, MONET, metadata and members' OOF, then the nested stack."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from lib.config.schema import STACK_DEFAULTS
from lib.core import artifacts as A
from lib.core.artifacts import (
    exp_dir,
    load_features,
    load_member,
    prep_dir,
    save_config,
)
from lib.core.errors import PipelineError
from lib.core.io import (
    ID,
    assert_same_ids,
    merge_on_id,
    read_json,
    read_table,
    write_json,
    write_parquet,
)
from lib.data.dataset import load_dataset
from lib.evaluation import report as R
from lib.tabular.patient import patient_relative
from lib.tabular.stackers import StackResult, fit_predict_stack

log = logging.getLogger(__name__)


def build_inputs(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, list[str]]]:
    """Join embeddings, MONET, metadata and members' OOF probabilities on lesion_id (asserted)."""

    s = cfg["stack"]
    classes = info["classes"]
    keep = [ID, "fold", *[f"y_{c}" for c in classes], *(["group"] if info.get("group") == "group" else [])]
    tr, te = train[keep].copy(), None if test is None else test[[ID]].copy()
    blocks: dict[str, list[str]] = {}
    if s["use_monet"] and info["monet_columns"]:
        blocks["monet"] = list(info["monet_columns"])
    if s["use_meta"] and info["meta_columns"]:
        blocks["meta"] = list(info["meta_columns"])
    for name in [*blocks]:
        tr[blocks[name]] = train[blocks[name]].to_numpy()
        if te is not None:
            te[blocks[name]] = test[blocks[name]].to_numpy()
    for name in s["features"]:
        ftr = load_features(cfg, [name], "train", s["features_exp"])
        tr = merge_on_id(tr, ftr, f"features {name} (train)")
        fte = None if te is None else load_features(cfg, [name], "test", s["features_exp"])
        if te is not None:
            if fte is None:
                raise PipelineError(f"features {name}: no test embeddings; rerun 03 with the test split")
            te = merge_on_id(te, fte, f"features {name} (test)")
        for m in info["modalities"]:
            cols = [c for c in ftr.columns if c.startswith(f"emb_{name}_{m}_")]
            if cols:
                blocks[f"emb_{name}_{m}"] = cols
        rest = [c for c in ftr.columns if c != ID and not any(c in b for b in blocks.values())]
        logits = [c for c in rest if c.startswith(f"logit_{name}_")]   # fold-model logits (features.from_exps)
        if logits:
            blocks[f"logit_{name}"] = logits
        rest = [c for c in rest if c not in logits]
        if rest:
            blocks[f"emb_{name}"] = rest
    for exp in s["oof_exps"]:
        oof, pte = load_member(cfg, exp, train, test, classes, role="stack.oof_exps member")
        ren = {c: f"oof_{exp}_{c}" for c in classes}
        tr = merge_on_id(tr, oof.rename(columns=ren), f"OOF of {exp}")
        if te is not None:
            te = merge_on_id(te, pte.rename(columns=ren), f"test predictions of {exp}")
        blocks[f"oof_{exp}"] = list(ren.values())
    if s["patient_features"]:
        tr, te, blocks["patient"] = add_patient_features(cfg, info, train, test, tr, te, blocks)
    if not blocks:
        raise PipelineError("stack: no inputs (set stack.features, stack.oof_exps, use_monet or use_meta)")
    return tr, te, blocks


def add_patient_features(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None,
                         tr: pd.DataFrame, te: pd.DataFrame | None, blocks: dict[str, list[str]]
                         ) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """Patient-relative copies of the numeric metadata and of the members' OOF scores.

    Needs a group column (`group`: ISIC 2024 patient_id) and folds grouped by it, so each
    patient's rows sit in one fold: a row's statistics then come from rows predicted by the same
    fold model (OOF columns) and never from another fold's labels. Test rows use test rows only."""

    if "group" not in train.columns or info.get("group") != "group":
        raise PipelineError("stack.patient_features needs a patient column and folds grouped by it "
                            "(ISIC 2024 patient_id; data.format isic2024, or data.generic.group_col)")
    if test is not None and "group" not in test.columns:
        raise PipelineError("stack.patient_features: the test table has no patient column "
                            "(test-metadata.csv patient_id / the generic test CSV's group_col)")
    enc = read_json(prep_dir(cfg) / A.META_ENCODERS)
    cols = [f"meta_{c}" for c in enc["num"] if f"meta_{c}" in tr.columns]
    cols += [c for name, b in blocks.items() if name.startswith("oof_") for c in b]
    if not cols:
        raise PipelineError("stack.patient_features: no numeric metadata or member OOF columns to relate")
    out = []
    for df, src in ((tr, train), (te, test)):
        if df is None:
            out.append(None)
            continue
        assert_same_ids(df, src, "patient features: rows vs lesion table")
        groups = src.set_index(ID).loc[df[ID].to_numpy(), "group"].astype(str).to_numpy()
        rel = patient_relative(df[cols].reset_index(drop=True), groups)
        rel.insert(0, ID, df[ID].to_numpy())
        out.append(merge_on_id(df, rel, "patient-relative features"))
    new = [c for c in out[0].columns if c not in tr.columns]
    log.info("patient-relative features: %d columns from %d inputs", len(new), len(cols))
    return out[0], out[1], new


def test_by_fold(cfg: dict, te: pd.DataFrame | None, folds: list[int]) -> dict[int, pd.DataFrame] | None:
    """The test table each fold's stacker predicts: `te` with every feature block that has per-fold-model
    test features (03's `<name>_test_by_fold.parquet`: cached-trunk fine-tunes, `features.from_exps`)
    replaced by fold k's model's own, since fold k's validation rows got theirs from fold model k (the
    mean over fold models is a smoother input than any row the stacker was fitted on). None when no
    block has them."""
    if te is None:
        return None
    out = None
    for name in cfg["stack"]["features"]:
        path = A.features_dir(cfg, cfg["stack"]["features_exp"]) / A.features_file(name, A.TEST_BY_FOLD)
        if not path.exists():
            continue
        table = read_table(path)
        cols = [c for c in table.columns if c not in (ID, A.FOLD_MODEL)]
        missing = [c for c in cols if c not in te.columns]
        if missing:
            raise PipelineError(f"{path}: columns {missing[:3]} are not in the test features of '{name}'")
        out = out or {k: te.copy() for k in folds}
        for k in folds:
            part = table[table[A.FOLD_MODEL].astype(int) == k]
            if part.empty:
                raise PipelineError(f"{path}: no rows of fold model {k}; rerun 03_extract_features.py")
            assert_same_ids(part, te, f"{path} (fold model {k}) vs the test rows", ordered=True)
            out[k][cols] = part[cols].to_numpy()
    return out


def _inputs(cfg: dict) -> list[dict]:
    """Manifest records of what 04 read: the prep folder, the features folder, the OOF members."""
    s = cfg["stack"]
    recs = [A.input_record(cfg, prep_dir(cfg), "prep")]
    if s["features"]:
        recs.append(A.input_record(cfg, A.features_dir(cfg, s["features_exp"]), "features"))
    return recs + [A.input_record(cfg, A.exp_folder(cfg, e), "oof_exp") for e in s["oof_exps"]]


def _write_outputs(out: Path, res: StackResult) -> None:
    write_parquet(res.oof, out / A.OOF)
    if res.test is not None:
        write_parquet(res.test, out / A.TEST)
    for h, df in res.per_head_oof.items():
        write_parquet(df, out / A.HEADS / A.head_file("oof", h))
    for h, df in (res.per_head_test or {}).items():
        if df is not None:
            write_parquet(df, out / A.HEADS / A.head_file("test", h))
    write_parquet(res.importance, out / A.IMPORTANCE)


def run(cfg: dict) -> dict:
    """Stage 04: nested stacking on folds.csv; writes oof.parquet, test.parquet, cv.json, manifest.json."""

    t0 = time.time()
    info, train, test = load_dataset(cfg)
    classes, task = info["classes"], info["task"]
    tr, te, blocks = build_inputs(cfg, info, train, test)
    s = cfg["stack"]
    model_cfg = {k: s[k] for k in STACK_DEFAULTS}
    model_cfg["renorm"] = task == "multiclass" and s["renorm"]
    by_fold = test_by_fold(cfg, te, sorted(int(f) for f in train["fold"].unique()))
    res = fit_predict_stack(tr, te, blocks, classes, model_cfg, test_by_fold=by_fold)
    out = exp_dir(cfg)
    _write_outputs(out, res)
    per_head = {h: R.cv_summary(train, df, classes, task) for h, df in res.per_head_oof.items()}
    stack = {"per_head": per_head, "blocks": {k: len(v) for k, v in blocks.items()},
             "test_inputs": "each fold's stacker reads its fold models' test features" if by_fold
             else "the same test features for every fold's stacker",
             "seconds": round(time.time() - t0, 1)}
    cv = A.cv_document("stack", cfg["exp"], task, R.cv_summary(train, res.oof, classes, task), stack=stack)
    write_json(cv, out / A.CV)
    save_config(cfg, out)
    A.write_manifest(cfg, out, "stack", _inputs(cfg), time.time() - t0)
    for h, c in per_head.items():
        R.log_cv(f"head {h}", c)
    R.log_cv("stack", cv)
    return cv
