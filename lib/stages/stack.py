"""Stage 04: join embeddings, MONET, metadata and members' OOF, then the nested stack."""
from __future__ import annotations

import hashlib
import json
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
from lib.core.runtime import resolve_device, seed_for
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
from lib.tabular.stacker_apply import predict_fitted
from lib.tabular.stacker_io import load_fitted, read_header, save_fitted
from lib.tabular.stackers import StackResult, fit_predict_stack

log = logging.getLogger(__name__)


def build_inputs(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, list[str]]]:
    """Join embeddings, MONET, metadata and members' OOF probabilities on lesion_id (asserted), for the
    training rows and (when given) the test rows; the blocks are the training side's."""
    if test is not None and cfg["stack"]["patient_features"]:
        check_patient_columns(info, train, test)
    tr, blocks = side_inputs(cfg, info, train, "train")
    te = None if test is None else side_inputs(cfg, info, test, "test")[0]
    return tr, te, blocks


def _feature_blocks(name: str, columns: list[str], modalities: list[str],
                    blocks: dict[str, list[str]]) -> dict[str, list[str]]:
    """The blocks of 03's features `name`: per-modality embeddings, fold-model logits, the rest."""
    new: dict[str, list[str]] = {}
    for m in modalities:
        cols = [c for c in columns if c.startswith(f"emb_{name}_{m}_")]
        if cols:
            new[f"emb_{name}_{m}"] = cols
    rest = [c for c in columns if c != ID and not any(c in b for b in [*blocks.values(), *new.values()])]
    logits = [c for c in rest if c.startswith(f"logit_{name}_")]   # fold-model logits (features.from_exps)
    if logits:
        new[f"logit_{name}"] = logits
    rest = [c for c in rest if c not in logits]
    if rest:
        new[f"emb_{name}"] = rest
    return new


def side_inputs(cfg: dict, info: dict, src: pd.DataFrame, split: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One side's stacker inputs (split `train`: ids, fold, labels (+ group) and features; `test`: ids and
    features) and the feature blocks. The test side reads no training table: 03's test features, the
    members' test.parquet (`load_member_test`), test-side patient features."""
    s, classes = cfg["stack"], info["classes"]
    keep = [ID] if split == "test" else \
        [ID, "fold", *[f"y_{c}" for c in classes], *(["group"] if info.get("group") == "group" else [])]
    df = src[keep].copy()
    blocks: dict[str, list[str]] = {}
    if s["use_monet"] and info["monet_columns"]:
        blocks["monet"] = list(info["monet_columns"])
    if s["use_meta"] and info["meta_columns"]:
        blocks["meta"] = list(info["meta_columns"])
    for name in [*blocks]:
        df[blocks[name]] = src[blocks[name]].to_numpy()
    for name in s["features"]:
        f = load_features(cfg, [name], split, s["features_exp"])
        if f is None:
            raise PipelineError(f"features {name}: no test embeddings; rerun 03 with the test split")
        df = merge_on_id(df, f, f"features {name} ({split})")
        blocks.update(_feature_blocks(name, list(f.columns), info["modalities"], blocks))
    role = "stack.oof_exps member"
    for exp in s["oof_exps"]:
        if split == "train":
            p, what = load_member(cfg, exp, src, None, info["classes"], role=role)[0], f"OOF of {exp}"
        else:
            p, what = A.load_member_test(cfg, exp, src, classes, role=role), f"test predictions of {exp}"
        ren = {c: f"oof_{exp}_{c}" for c in classes}
        df = merge_on_id(df, p.rename(columns=ren), what)
        blocks[f"oof_{exp}"] = list(ren.values())
    if s["patient_features"]:
        check_patient_columns(info, src if split == "train" else None, src if split == "test" else None)
        df, blocks["patient"] = _patient_side(cfg, src, df, blocks)
    if not blocks:
        raise PipelineError("stack: no inputs (set stack.features, stack.oof_exps, use_monet or use_meta)")
    return df, blocks


def check_patient_columns(info: dict, train: pd.DataFrame | None, test: pd.DataFrame | None) -> None:
    """stack.patient_features needs folds grouped by a patient column and that column in the test table."""
    if info.get("group") != "group" or (train is not None and "group" not in train.columns):
        raise PipelineError("stack.patient_features needs a patient column and folds grouped by it "
                            "(ISIC 2024 patient_id; data.format isic2024, or data.generic.group_col)")
    if test is not None and "group" not in test.columns:
        raise PipelineError("stack.patient_features: the test table has no patient column "
                            "(test-metadata.csv patient_id / the generic test CSV's group_col)")


def _patient_side(cfg: dict, src: pd.DataFrame, df: pd.DataFrame, blocks: dict[str, list[str]]
                  ) -> tuple[pd.DataFrame, list[str]]:
    """`df` + the patient-relative columns of one side (its rows' statistics come from its own rows)."""
    enc = read_json(prep_dir(cfg) / A.META_ENCODERS)
    cols = [f"meta_{c}" for c in enc["num"] if f"meta_{c}" in df.columns]
    cols += [c for name, b in blocks.items() if name.startswith("oof_") for c in b]
    if not cols:
        raise PipelineError("stack.patient_features: no numeric metadata or member OOF columns to relate")
    assert_same_ids(df, src, "patient features: rows vs lesion table")
    groups = src.set_index(ID).loc[df[ID].to_numpy(), "group"].astype(str).to_numpy()
    rel = patient_relative(df[cols].reset_index(drop=True), groups)
    rel.insert(0, ID, df[ID].to_numpy())
    log.info("patient-relative features: %d columns from %d inputs", rel.shape[1] - 1, len(cols))
    return merge_on_id(df, rel, "patient-relative features"), [c for c in rel.columns if c != ID]


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


def _write_outputs(out: Path, res: StackResult, test_only: bool = False) -> None:
    """04's tables; `test_only`: the test side alone (the OOF side is kept from the run that fitted)."""
    if res.test is not None:
        write_parquet(res.test, out / A.TEST)
    for h, df in (res.per_head_test or {}).items():
        if df is not None:
            write_parquet(df, out / A.HEADS / A.head_file("test", h))
    if test_only:
        return
    write_parquet(res.oof, out / A.OOF)
    for h, df in res.per_head_oof.items():
        write_parquet(df, out / A.HEADS / A.head_file("oof", h))
    write_parquet(res.importance, out / A.IMPORTANCE)


def model_settings(cfg: dict, task: str) -> dict:
    """The stacker's settings from the config: the `stack` section, renorm only for a multiclass task, and
    the heads' seeds (tree heads' random states, PCA's) derived from the top-level `seed` and `stack.seeds`."""
    s = cfg["stack"]
    model_cfg = {k: s[k] for k in STACK_DEFAULTS}
    model_cfg["renorm"] = task == "multiclass" and s["renorm"]
    model_cfg["seeds"] = [seed_for(int(cfg["seed"]), int(x)) & 0x7FFFFFFF for x in s["seeds"]]  # LightGBM: int32
    return model_cfg


def fit_fingerprint(cfg: dict, task: str, tr: pd.DataFrame, blocks: dict[str, list[str]]) -> dict:
    """What the stackers are fitted on: sha1 of the training input frame (ids, fold, labels, every feature
    value, the blocks), the `stack` section + top-level seed (`config_fingerprint` scope stack), folds.csv."""
    h = hashlib.sha1(json.dumps({"columns": [str(c) for c in tr.columns], "blocks": blocks, "task": task}).encode())
    h.update(pd.util.hash_pandas_object(tr.reset_index(drop=True), index=False).to_numpy().tobytes())
    return {"train": h.hexdigest(), "config": A.config_fingerprint(cfg, scope="stack"), "folds_sha1": A.folds_sha1(cfg)}


def _reuse(out: Path, fingerprint: dict, tr: pd.DataFrame, te: pd.DataFrame | None,
           by_fold: dict[int, pd.DataFrame] | None) -> StackResult | None:
    """When stacker/ holds stackers fitted on these training inputs (the same fingerprint) and the OOF
    tables of that run are intact: its OOF side + the test predictions of the loaded stackers. Else None
    (nothing reusable, or unreadable: refit)."""
    folder = out / A.STACKER_DIR
    if not (folder / A.STACKER_JSON).exists():
        return None
    try:
        if read_header(folder).get("fingerprint") != fingerprint:
            log.info("stack: the training inputs differ from those of the stackers in %s: refitting", folder)
            return None
        fitted = load_fitted(folder)
        kept = {"oof": read_table(out / A.OOF), "importance": read_table(out / A.IMPORTANCE),
                "heads": {h: read_table(out / A.HEADS / A.head_file("oof", h)) for h in fitted["heads"]}}
    except PipelineError as e:
        log.warning("stack: cannot reuse the fitted stackers in %s (%s): refitting", folder, e)
        return None
    log.info("stack: the stackers in %s were fitted on these training inputs: not refitting, predicting "
             "the test rows only", folder)
    test, per_head_test = None, {}
    if te is not None:
        test, per_head_test = predict_fitted(fitted, by_fold or {k: te for k in range(int(fitted["n_folds"]))})
    return StackResult(
        oof=kept["oof"], test=test, per_head_oof=kept["heads"], per_head_test=per_head_test,
        importance=kept["importance"],
        fold_of=pd.Series(tr["fold"].astype(int).to_numpy(), index=pd.Index(tr[ID].astype(str), name=ID)),
        fitted=fitted)


def predict_test(cfg: dict, info: dict, test: pd.DataFrame, stacker_dir: Path) -> pd.DataFrame:
    """Test probabilities of 04's fitted stackers in `stacker_dir` from the test side alone (no training
    table): 03's test features, the members' test.parquet, per-fold test features (`test_by_fold`).
    PipelineError when the inputs' columns are not those the stackers were fitted on."""
    te, blocks = side_inputs(cfg, info, test, "test")
    fitted = load_fitted(stacker_dir)
    feats = [c for cols in blocks.values() for c in cols]
    where = Path(stacker_dir) / A.STACKER_JSON
    if feats != fitted["feats"]:
        missing = [c for c in fitted["feats"] if c not in feats]
        extra = [c for c in feats if c not in fitted["feats"]]
        raise PipelineError(f"stack: the test inputs' feature columns differ from those of {where}: missing "
                            f"{missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
                            + ("" if missing or extra else ", same columns in another order"))
    if blocks != fitted["blocks"]:
        raise PipelineError(f"stack: the test inputs' feature blocks {list(blocks)} differ from those of {where} "
                            f"({list(fitted['blocks'])})")
    n = int(fitted["n_folds"])
    by_fold = test_by_fold(cfg, te, list(range(n))) or {k: te for k in range(n)}
    return predict_fitted(fitted, by_fold)[0]


def run(cfg: dict) -> dict:
    """Stage 04: nested stacking on folds.csv; writes oof.parquet, test.parquet, cv.json, stacker/,
    manifest.json. When the fitted stackers in stacker/ were fitted on the same training inputs (a new
    test release), they only predict the test rows."""

    t0 = time.time()
    if "xgb" in cfg["stack"]["heads"]:   # before any work, and the same in a fit and a reuse (the manifest's
        resolve_device(cfg["stack"]["xgb"]["device"], "stack.xgb.device")   # determinism block sees torch)
    info, train, test = load_dataset(cfg)
    classes, task = info["classes"], info["task"]
    tr, te, blocks = build_inputs(cfg, info, train, test)
    model_cfg = model_settings(cfg, task)
    by_fold = test_by_fold(cfg, te, sorted(int(f) for f in train["fold"].unique()))
    out = exp_dir(cfg)
    fingerprint = fit_fingerprint(cfg, task, tr, blocks)
    res = _reuse(out, fingerprint, tr, te, by_fold)
    if res is not None:
        _write_outputs(out, res, test_only=True)
    else:
        (out / A.STACKER_DIR / A.STACKER_JSON).unlink(missing_ok=True)  # never paired with newer OOF tables
        res = fit_predict_stack(tr, te, blocks, classes, model_cfg, test_by_fold=by_fold)
        _write_outputs(out, res)
        save_fitted(res.fitted, out / A.STACKER_DIR, extra={"fingerprint": fingerprint})
    per_head = {h: R.cv_summary(train, df, classes, task) for h, df in res.per_head_oof.items()}
    stack = {"per_head": per_head, "blocks": {k: len(v) for k, v in blocks.items()},
             "test_inputs": "each fold's stacker reads its fold models' test features" if by_fold
             else "the same test features for every fold's stacker",
             "seeds": {"seed": int(cfg["seed"]), "stack_seeds": list(cfg["stack"]["seeds"]),
                       "head_seeds": model_cfg["seeds"], "pca_seed": model_cfg["seeds"][0]},
             "seconds": round(time.time() - t0, 1)}
    cv = A.cv_document("stack", cfg["exp"], task, R.cv_summary(train, res.oof, classes, task), stack=stack)
    write_json(cv, out / A.CV)
    save_config(cfg, out)
    A.write_manifest(cfg, out, "stack", _inputs(cfg), time.time() - t0)
    for h, c in per_head.items():
        R.log_cv(f"head {h}", c)
    R.log_cv("stack", cv)
    return cv
