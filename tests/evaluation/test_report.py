"""lib.evaluation.report: CV summary and the run report (report.md + PNGs) on synthetic OOF data."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import PipelineError
from lib.evaluation import metrics as M
from lib.evaluation import report as R

CLASSES = ["AKIEC", "BCC", "MEL", "NV"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _case(n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Imbalanced 4-class train table (5 folds) and a noisy but informative OOF table."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASSES), n, p=[0.1, 0.2, 0.2, 0.5])
    Y = M.to_onehot(labels, len(CLASSES))
    logits = 2.0 * Y + rng.normal(0, 1.0, Y.shape)
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ids = [f"L{i:04d}" for i in range(n)]
    train = pd.DataFrame({"lesion_id": ids, "fold": np.arange(n) % 5,
                          **{f"y_{c}": Y[:, i] for i, c in enumerate(CLASSES)}})
    oof = pd.DataFrame({"lesion_id": ids[::-1], **{c: P[::-1, i] for i, c in enumerate(CLASSES)}})
    return train, oof


def _histories() -> dict[str, pd.DataFrame]:
    ep = np.arange(5)
    full = pd.DataFrame({"epoch": ep, "train_loss": 1 / (ep + 1), "val_loss": 1.2 / (ep + 1),
                         "val_macro_f1": 0.1 * ep, "lr": 1e-3 * 0.5 ** ep})
    return {"expA/fold0": full, "expA/fold1": full[["epoch", "train_loss", "val_macro_f1"]]}


def _check_pngs(folder: Path) -> list[Path]:
    from PIL import Image
    pngs = sorted((folder / "report").glob("*.png"))
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
        with Image.open(p) as im:
            im.verify()
    assert not list(folder.rglob("*.tmp")), "temp files left behind"
    return pngs


def test_write_report_full(tmp_path: Path) -> None:
    train, oof = _case()
    cv = R.cv_summary(train, oof, CLASSES)
    members = [{"exp": "expA", "weight": 0.6, "cv": {"macro_f1_argmax": 0.61}},
               {"exp": "expB", "weight": 0.4, "macro_f1_argmax": 0.55}]
    out = R.write_report(tmp_path, train, oof, CLASSES, cv, cv["thresholds"], "thresholds",
                         members, _histories(), "Synthetic run")
    assert out == tmp_path / "report.md" and out.is_file()
    names = {p.name for p in _check_pngs(tmp_path)}
    assert names == {"confusion.png", "f1_per_class.png", "threshold_curves.png",
                     "training_curves.png", "cv_spread.png"}
    md = out.read_text()
    assert md.startswith("# Synthetic run")
    assert "thresholds" in md and "honest" in md and "expB" in md and "0.6100" in md
    for c in CLASSES:
        assert c in md
    for name in names:
        assert f"](report/{name})" in md
    assert f"{cv['macro_dice_tuned_cv']:.4f}" in md


def test_write_report_no_histories_argmax(tmp_path: Path) -> None:
    train, oof = _case(seed=1)
    cv = R.cv_summary(train, oof, CLASSES)
    # a stale figure from an earlier run must not survive when it is not produced again
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "training_curves.png").write_bytes(PNG_MAGIC)
    out = R.write_report(tmp_path, train, oof, CLASSES, cv, {}, "argmax", [], None, "No histories")
    names = {p.name for p in _check_pngs(tmp_path)}
    assert "training_curves.png" not in names and "confusion.png" in names
    md = out.read_text()
    assert "argmax" in md and "training_curves" not in md and "## Stage times" not in md
    assert all(c in md for c in CLASSES)
    # {} behaves as None
    R.write_report(tmp_path, train, oof, CLASSES, cv, cv["thresholds"], "argmax", [], {}, "Empty")
    assert not (tmp_path / "report" / "training_curves.png").exists()


def test_stage_times_table_and_section(tmp_path: Path) -> None:
    rows = [{"number": "01", "stage": "prepare", "exp": "d", "wall_seconds": 2.04},
            {"number": "02", "stage": "train", "exp": "fus", "wall_seconds": 30.0},
            {"number": "02", "stage": "· fold 0", "exp": "fus", "wall_seconds": 12.0, "part": True},
            {"number": "05", "stage": "submit", "exp": "sub", "wall_seconds": None}]
    table = R.stage_times_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| stage | exp | wall seconds |"
    assert lines[2:] == ["| 01 prepare | d | 2.0 |", "| 02 train | fus | 30.0 |", "| 02 · fold 0 | fus | 12.0 |",
                         "| 05 submit | sub | - |",
                         "| **total** |  | 32.0 |"]
    train, oof = _case(seed=2)
    cv = R.cv_summary(train, oof, CLASSES)
    md = R.write_report(tmp_path, train, oof, CLASSES, cv, {}, "argmax", [], None, "T", stage_times=rows).read_text()
    assert "## Stage times\n\n" + table in md


def test_write_report_bad_input(tmp_path: Path) -> None:
    train, oof = _case()
    cv = R.cv_summary(train, oof, CLASSES)
    with pytest.raises(PipelineError, match="decision"):
        R.write_report(tmp_path, train, oof, CLASSES, cv, {}, "auto", [], None, "x")
    with pytest.raises(PipelineError, match="thresholds lack"):
        R.write_report(tmp_path, train, oof, CLASSES, cv, {"AKIEC": 0.3}, "thresholds", [], None, "x")


def test_load_histories(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = _histories()["expA/fold0"]
    for k in (0, 2, 10):
        (tmp_path / "expA" / f"fold{k}").mkdir(parents=True)
        h.to_csv(tmp_path / "expA" / f"fold{k}" / "history.csv", index=False)
    (tmp_path / "expA" / "fold3").mkdir()                      # no history
    (tmp_path / "expA" / "fold4").mkdir()
    (tmp_path / "expA" / "fold4" / "history.csv").write_text("")  # empty file
    with caplog.at_level(logging.WARNING):
        out = R.load_histories(tmp_path, ["expA", "missing_exp"])
    assert list(out) == ["expA/fold0", "expA/fold2", "expA/fold10"]
    pd.testing.assert_frame_equal(out["expA/fold2"], h)
    assert "fold4" in caplog.text


def _binary_case(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(float)
    p = 1 / (1 + np.exp(-(2.5 * y - 2 + rng.normal(0, 1, n))))
    ids = [f"L{i:04d}" for i in range(n)]
    return (pd.DataFrame({"lesion_id": ids, "fold": np.arange(n) % 5, "y_malignant": y}),
            pd.DataFrame({"lesion_id": ids, "malignant": p}))


def test_cv_summary_binary_reports_pauc_not_argmax(tmp_path: Path) -> None:
    train, oof = _binary_case()
    cv = R.cv_summary(train, oof, ["malignant"], "binary")
    y, p = train["y_malignant"].to_numpy(), oof["malignant"].to_numpy()
    assert cv["pauc_80"] == pytest.approx(M.partial_auc(y, p))
    assert 0 < cv["pauc_80"] <= 0.2 and len(cv["per_fold_pauc_80"]) == 5
    assert cv["auc"] == pytest.approx(M.macro_auc(y[:, None], p[:, None]))
    assert "macro_f1_argmax" not in cv  # argmax over one column is meaningless
    out = R.write_report(tmp_path, train, oof, ["malignant"], cv, {}, "raw", [], None, "bin", task="binary")
    text = out.read_text()
    assert "Partial AUC above 80% TPR" in text and not (tmp_path / "report" / "confusion.png").exists()


def test_cv_summary_multilabel_reports_topk() -> None:
    rng = np.random.default_rng(0)
    Y = (rng.random((120, 4)) < 0.3).astype(float)
    Y[Y.sum(1) == 0, 0] = 1
    P = np.clip(0.6 * Y + rng.random(Y.shape) * 0.5, 0, 1)
    ids = [f"L{i}" for i in range(120)]
    train = pd.DataFrame({"lesion_id": ids, "fold": np.arange(120) % 4, **{f"y_{c}": Y[:, i] for i, c in enumerate(CLASSES)}})
    oof = pd.DataFrame({"lesion_id": ids, **{c: P[:, i] for i, c in enumerate(CLASSES)}})
    cv = R.cv_summary(train, oof, CLASSES, "multilabel")
    assert cv["top1_accuracy"] == pytest.approx(M.topk_accuracy(Y, P, 1))
    assert cv["top3_accuracy"] == pytest.approx(M.topk_accuracy(Y, P, 3))
    assert "macro_f1_argmax" not in cv and cv["macro_dice_tuned_pooled"] >= cv["macro_dice_05"] - 1e-9



def test_every_figure_says_what_was_nested_and_only_fully_nested_ones_are_honest(tmp_path: Path) -> None:
    """Issue 27.4: cv.json's `nesting` labels every figure with how its weights, (priors,) thresholds and
    decision were fitted; report.md's headline shows the label; `honest` only where nothing saw the rows."""
    train, oof = _case()
    single = R.cv_summary(train, oof, CLASSES)  # 02 / 04: one model, each figure scores a fixed rule
    assert set(R.FIGURES) & set(single) == set(single["nesting"])
    assert single["nesting"]["macro_dice_tuned_cv"] == \
        "weights fixed, thresholds nested, decision fixed (thresholds): honest"
    assert single["nesting"]["macro_dice_tuned_pooled"].endswith("thresholds not nested, decision fixed "
                                                                  "(thresholds): not honest")
    assert single["nesting"]["per_fold"].endswith(": not honest")  # holds the in-fold column
    blend = R.cv_summary(train, oof, CLASSES, weights="not nested", priors="not nested", rule_chosen=True)
    assert all(v.endswith(": not honest") for v in blend["nesting"].values())
    assert blend["nesting"]["macro_f1_argmax"] == ("weights not nested, priors not nested, thresholds none, "
                                                   "decision per rule (argmax): not honest")
    assert R.nesting("nested", "nested", "nested", "nested").endswith(": honest")
    assert R.nesting("nested", "nested", "per rule (thresholds)").endswith(": not honest")
    md = R.write_report(tmp_path, train, oof, CLASSES, blend, {}, "thresholds", [], None, "T").read_text()
    head = md.split("## Headline (OOF)", 1)[1].split("##", 1)[0]
    rows = [r for r in head.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert rows and all(r.rstrip(" |").endswith("not honest") for r in rows)
    assert "honest CV" not in md and "Fitted how: F1 argmax: weights not nested" in md
