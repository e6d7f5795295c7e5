"""Stage 02's `aggregate` (lib.stages.train) on fabricated finished folds: the experiment tables, the
common cv.json schema and the manifest (wall seconds = the folds' seconds + aggregation)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core import artifacts as A
from lib.core.errors import MissingArtifactError
from lib.core.io import ID, read_json, write_json, write_parquet
from lib.data.dataset import load_dataset
from lib.stages import train as train_stage
from lib.training.inference import rows_key_of_test, write_fold_test_logits
from tests.stages.conftest import stage_cfg


def _fake_folds(cfg: dict, seconds: float = 10.0) -> None:
    """fold{k}/ with oof.parquet logits, test_logits.parquet and summary.json, as train_fold writes them."""
    info, train, test = load_dataset(cfg)
    classes = info["classes"]
    rng = np.random.default_rng(0)
    for k in sorted(train["fold"].unique()):
        d = A.fold_dir(cfg, int(k))
        va = train[train["fold"] == k]
        tab = pd.DataFrame(rng.normal(size=(len(va), len(classes))), columns=classes)
        tab.insert(0, ID, va[ID].to_numpy())
        write_parquet(tab, d / A.OOF)
        write_fold_test_logits(d, test[ID], rng.normal(size=(len(test), len(classes))), classes,
                               rows_key_of_test(cfg, info, test))
        write_json({"fold": int(k), "fingerprint": A.config_fingerprint(cfg, scope="fold"),
                    "early_stopping_used": False, "weights_for_oof": "last", "views": ["id"], "seconds": seconds},
                   d / A.FOLD_SUMMARY_JSON)


def test_aggregate_writes_common_cv_json_and_manifest(preps: Path) -> None:
    cfg = stage_cfg(preps, "t_agg")
    _fake_folds(cfg, seconds=10.0)
    info, train, test = load_dataset(cfg)
    cv = train_stage.aggregate(cfg, info, train, test)
    out = preps / "t_agg"
    assert read_json(out / A.CV) == cv
    assert {"schema_version", "stage", "exp", "task", "n", "macro_dice_tuned_cv", "macro_f1_argmax"} <= set(cv)
    assert cv["stage"] == "train" and cv["exp"] == "t_agg" and cv["n"] == len(train)
    assert cv["training"]["early_stopping_used"] is False and cv["training"]["fold_seconds"] == [10.0] * 5
    oof, te = pd.read_parquet(out / A.OOF), pd.read_parquet(out / A.TEST)
    assert list(oof[ID]) == list(train[ID]) and list(te[ID]) == list(test[ID])
    man = read_json(out / A.MANIFEST)
    assert man["stage"] == "train" and man["exp"] == "t_agg" and man["fingerprint"] == A.config_fingerprint(cfg)
    assert man["folds_sha1"] == A.file_sha1(A.prep_dir(cfg) / A.FOLDS)
    assert 50.0 <= man["wall_seconds"] < 60.0
    assert [(i["role"], i["stage"], i["path"]) for i in man["inputs"]] == [("prep", "prepare", "p42")]
    assert man["inputs"][0]["fingerprint"] == read_json(A.prep_dir(cfg) / A.MANIFEST)["fingerprint"]
    assert "torch" in man["versions"]  # 02 imports torch
    assert man["test_rows"] == rows_key_of_test(cfg, info, test)
    assert man["determinism"]["threads"] >= 1 and man["determinism"]["cpu_capability"]


def test_aggregate_refuses_fold_test_logits_of_other_test_rows(preps: Path) -> None:
    """A fold whose test logits were made for another test release (same ids here: another image or
    value behind one of them) is never averaged into the experiment's test table."""
    cfg = stage_cfg(preps, "t_stale")
    _fake_folds(cfg)
    info, train, test = load_dataset(cfg)
    side = A.fold_dir(cfg, 2) / A.FOLD_TEST_ROWS
    write_json({**read_json(side), "rows": "0" * 40}, side)
    with pytest.raises(MissingArtifactError, match=r"fold2/test_logits.parquet: not made for this prep folder's test"):
        train_stage.aggregate(cfg, info, train, test)
    side.unlink()   # logits of unknown rows (written before the sidecar existed): refused too
    with pytest.raises(MissingArtifactError, match="rerun 02_train_fold.py"):
        train_stage.aggregate(cfg, info, train, test)
    assert not (A.exp_dir(cfg) / A.TEST).exists()
