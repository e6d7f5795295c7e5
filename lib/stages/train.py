"""Stage 02: train the selected folds of an image model, then write the experiment's tables. A fold
already trained with this config is not trained again; when the test rows changed since (another
test release: `rows_key_of_test`), only its test logits are recomputed from its model.pt."""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from lib.core import artifacts as A
from lib.core.artifacts import exp_dir, fold_dir, save_config
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import ID, assert_same_ids, read_json, read_table, write_json, write_parquet
from lib.core.runtime import torch_device
from lib.data.dataset import load_dataset
from lib.evaluation.report import cv_summary, log_cv
from lib.training import distributed as D
from lib.training.fold import refresh_test_logits, train_fold
from lib.training.inference import fold_test_current, prediction_table, probabilities, rows_key_of_test
from lib.vision.onnx_trunk import resolve_runtime

log = logging.getLogger(__name__)


def fold_done(cfg: dict, k: int, train: pd.DataFrame) -> bool:
    """Fold k's train side finished with this config, on these folds (its OOF rows are fold k's lesions
    of folds.csv) and its tables read back; otherwise (a corrupt file, folds.csv changed since) it is
    trained again. The test side is checked apart (`test_current`): new test rows need no training."""
    folder = fold_dir(cfg, k)
    p = folder / A.FOLD_SUMMARY_JSON
    if not (p.exists() and (folder / A.OOF).exists()):
        return False
    try:
        if read_json(p).get("fingerprint") != A.config_fingerprint(cfg, scope="fold"):
            return False
        oof = read_table(folder / A.OOF, columns=[ID])
    except PipelineError as e:
        log.warning("fold %d is trained again: %s", k, e)
        return False
    if set(oof[ID]) != set(train.loc[train["fold"] == k, ID]):
        log.warning("fold %d is trained again: its rows differ from fold %d of %s (folds.csv changed since)", k, k,
                    A.prep_dir(cfg) / A.FOLDS)
        return False
    return True


def test_current(cfg: dict, k: int, test_rows: str | None) -> bool:
    """Fold k's test logits are of exactly these test rows and read back (True when there is no test)."""
    if test_rows is None:
        return True
    if not fold_test_current(fold_dir(cfg, k), test_rows):
        return False
    try:
        read_table(fold_dir(cfg, k) / A.FOLD_TEST_LOGITS, columns=[ID])
    except PipelineError as e:
        log.warning("fold %d: test logits recomputed: %s", k, e)
        return False
    return True


def aggregate(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None,
              test_rows: str | None = None) -> dict | None:
    """Write `<exp>/oof.parquet`, `test.parquet` (probabilities), cv.json and manifest.json once every
    fold is done (the manifest's wall seconds: the folds' training seconds + this aggregation). Every
    fold's test logits must be for exactly these test rows (`test_rows`, computed when None)."""

    t0 = time.time()
    folds = sorted(int(f) for f in train["fold"].unique())
    missing = [k for k in folds if not fold_done(cfg, k, train)]
    if missing:
        log.info("folds %s not done yet: experiment tables not written", missing)
        return None
    classes, task = list(info["classes"]), info.get("task", "multiclass")
    test_rows = test_rows or rows_key_of_test(cfg, info, test)
    parts, tests, sums = [], [], []
    for k in folds:
        o = read_table(fold_dir(cfg, k) / A.OOF)
        assert_same_ids(o, train[train["fold"] == k], f"fold {k} OOF vs fold rows")
        parts.append(o)
        sums.append(read_json(fold_dir(cfg, k) / A.FOLD_SUMMARY_JSON))
        if test is not None:
            if not fold_test_current(fold_dir(cfg, k), test_rows):
                raise MissingArtifactError(f"{fold_dir(cfg, k) / A.FOLD_TEST_LOGITS}: not made for this prep folder's "
                                           "test rows (another test release, or missing): rerun 02_train_fold.py")
            t = read_table(fold_dir(cfg, k) / A.FOLD_TEST_LOGITS)
            assert_same_ids(t, test, f"fold {k} test logits vs test", ordered=True)
            tests.append(probabilities(t[classes].to_numpy(), task))
    oof = pd.concat(parts, ignore_index=True).set_index(ID).loc[train[ID].to_numpy()].reset_index()
    assert_same_ids(oof, train, "OOF vs train", ordered=True)
    oof_p = prediction_table(oof[ID], probabilities(oof[classes].to_numpy(), task), classes)
    root = exp_dir(cfg)
    write_parquet(oof_p, root / A.OOF)
    if test is not None:
        write_parquet(prediction_table(test[ID], np.mean(tests, 0), classes), root / A.TEST)
    else:   # no test split now: an earlier run's test table must not be read as this one's
        (root / A.TEST).unlink(missing_ok=True)
    es_used = any(s["early_stopping_used"] for s in sums)
    training = {"model": cfg["train"]["model"]["kind"], "fusion": cfg["train"]["model"]["fusion"],
                "epochs": cfg["train"]["epochs"], "img_size": cfg["train"]["img_size"],
                "early_stopping_used": es_used,
                "note": "OOF taken at the best validation epoch: optimistic" if es_used else
                "fixed epochs; OOF from the last/EMA weights",
                "weights_for_oof": sorted({s["weights_for_oof"] for s in sums}),
                "views": sums[0]["views"], "fold_seconds": [s["seconds"] for s in sums]}
    cv = A.cv_document("train", cfg["exp"], task, cv_summary(train, oof_p, classes, task), training=training)
    write_json(cv, root / A.CV)
    save_config(cfg, root)
    wall = sum(float(s["seconds"]) for s in sums) + time.time() - t0
    A.write_manifest(cfg, root, "train", [A.input_record(cfg, A.prep_dir(cfg), "prep")], wall,
                     extra={"wall_seconds_note": "sum of the folds' training seconds + aggregation",
                            "test_rows": test_rows})
    log_cv(str(cfg["exp"]), cv)
    return cv


def selected_folds(cfg: dict, train: pd.DataFrame, fold: int | None) -> list[int]:
    present = sorted(int(f) for f in train["fold"].unique())
    sel = cfg["train"]["folds"]
    ks = [fold] if fold is not None else (present if sel == "all" else [int(f) for f in
                                                                     ([sel] if isinstance(sel, int) else sel)])
    bad = [f for f in ks if f not in present]
    if bad:
        raise PipelineError(f"fold(s) {bad} do not exist: folds.csv has folds {present}")
    return ks


def run(cfg: dict, fold: int | None = None, resume: bool = False, stop_after: int | None = None) -> None:
    """Stage 02: train the selected folds (one process, or all ranks of a torchrun group), then write
    the experiment tables when every fold is done."""

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = torch_device(cfg)
    if not D.launched():   # the finished folds' OOF/test engine: bad value -> stop now (torchrun ranks keep PyTorch)
        resolve_runtime(cfg["features"]["runtime"], device)
    info, train, test = load_dataset(cfg)
    ks = selected_folds(cfg, train, fold)
    test_rows = rows_key_of_test(cfg, info, test)
    d = D.setup(device)
    ok = False
    try:
        for k in ks:
            if not fold_done(cfg, k, train):
                if train_fold(cfg, info, train, test, k, resume=resume, d=d, stop_after=stop_after,
                              test_rows=test_rows) is None:
                    return
            elif not test_current(cfg, k, test_rows):
                log.info("fold %d already trained with this config (%s): test logits of these test rows from its "
                         "model.pt", k, fold_dir(cfg, k))
                refresh_test_logits(cfg, info, train, test, k, test_rows, d)
            else:
                log.info("fold %d already done with this config (%s): skipped", k, fold_dir(cfg, k))
        if d.main:
            aggregate(cfg, info, train, test, test_rows)
            save_config(cfg, exp_dir(cfg))
        ok = True
    finally:
        D.cleanup(d, ok)
