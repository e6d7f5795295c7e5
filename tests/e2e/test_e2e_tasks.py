"""End to end for the other tasks, by configuration only: the numbered scripts 01 -> 05 and the
scorer on HAM10000 single-image multiclass (ISIC 2019 submission format), ISIC 2024-style binary
triage (built from HAM10000) and the SCIN-style multi-label fixture, with tiny models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lib.stages.plan import recipe_plan
from tests.data.task_builders import I24, make_isic2020, make_isic2024_train

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TINY_ENC = "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64}]"
TINY_TRAIN = ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64",
              "train.epochs=1", "train.batch_size=16"]
FAST = ["cache.size=96", "threads=2", "folds.n_splits=3"]
TINY = {"train": TINY_TRAIN, "features": [TINY_ENC],  # per kind of step of the recipe plan
        "stack": [TINY_ENC, "stack.xgb.n_estimators=20", "stack.lgbm.n_estimators=20", "stack.pca_components=4"]}


def _run(args: list[str], out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args, "--output", str(out), *FAST, *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def _run_plan(d: str, out: Path, extra: list[str], per_kind: dict[str, list[str]]) -> list[str]:
    """Every step of the recipe's plan (lib.stages.plan: what run_all.sh runs) in order; returns their kinds."""
    steps = recipe_plan(ROOT / d)
    for step in steps:
        _run(step.argv(per_kind.get(step.kind, [])), out, extra)
    return [s.kind for s in steps]


def _pipeline(recipe: str, out: Path, extra: list[str]) -> dict:
    """01 -> 05 + scorer; returns the scorer's JSON."""
    d = f"configs/{recipe}"
    assert _run_plan(d, out, extra, TINY) == ["prepare", "train", "features", "stack", "submit"]
    truth, exp, *task = Path(ROOT, d, "score.txt").read_text().split()
    if extra and extra[0] == "--data":  # fixture made in tmp: its held-out labels sit beside it
        truth = str(Path(extra[1]) / "held_out" / Path(truth).name)
    sub = out / exp / "submission.csv"
    p = subprocess.run([sys.executable, "tools/score_submission.py", "--truth", truth, "--submission", str(sub),
                        "--task", task[0] if task else "auto"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return {"score": json.loads(p.stdout), "sub": pd.read_csv(sub, dtype=str), "truth": pd.read_csv(truth, dtype=str),
            "cv": json.loads((out / exp / "cv.json").read_text())}


def test_ham10000_multiclass_isic2019_format(tmp_path: Path) -> None:
    r = _pipeline("ham10000_sample", tmp_path, [])
    sub, truth = r["sub"], r["truth"]
    assert list(sub.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert set(sub["image"]) == set(truth["image"])
    assert r["score"]["task"] == "multiclass" and 0 <= r["score"]["ours"]["balanced_accuracy"] <= 1
    assert r["cv"]["submit"]["decision"] == "argmax"
    assert (sub.iloc[:, 1:].astype(float).gt(0.5).sum(axis=1) == 1).all()  # argmax baked in: one class above 0.5
    folds = pd.read_csv(tmp_path / "prep" / "ham10000_sample" / "folds.csv")
    meta = pd.read_csv(ROOT / "input/ham10000_sample/HAM10000_metadata.csv")
    m = meta.merge(folds, left_on="image_id", right_on="lesion_id", suffixes=("_ham", ""))
    assert (m.groupby("lesion_id_ham")["fold"].nunique() == 1).all()  # a lesion's images share a fold


def test_isic2024_binary_triage_from_ham(tmp_path: Path) -> None:
    r = _pipeline("isic2024_ham_sample", tmp_path, [])
    sub, truth = r["sub"], r["truth"]
    assert list(sub.columns) == ["isic_id", "target"] and set(sub["isic_id"]) == set(truth["isic_id"])
    assert r["score"]["task"] == "binary" and 0 <= r["score"]["ours"]["pauc"] <= 0.2
    assert r["cv"]["submit"]["decision"] == "raw" and "pauc_80" in r["cv"]
    cols = pd.read_parquet(tmp_path / "isic24_sample_stack" / "importance.parquet")["feature"].unique()
    assert any(c.startswith("pat_z_meta_tbp_lv_") for c in cols)
    assert any(c.startswith("pat_rank_oof_isic24_sample_image") for c in cols)
    folds = pd.read_csv(tmp_path / "prep" / "isic2024_ham_sample" / "folds.csv")
    meta = pd.read_csv(ROOT / "input/isic2024_ham_sample/train-metadata.csv")
    m = meta.merge(folds, left_on="isic_id", right_on="lesion_id")
    assert (m.groupby("patient_id")["fold"].nunique() == 1).all()  # patients never cross folds


def test_multilabel_fixture_scin_style(tmp_path: Path) -> None:
    data = tmp_path / "fixture"
    p = subprocess.run([sys.executable, "tools/make_multilabel_fixture.py", "--out", str(data), "--n-train", "60",
                        "--n-test", "15", "--size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = _pipeline("multilabel_fixture", tmp_path / "out", ["--data", str(data)])
    sub = r["sub"]
    assert list(sub.columns) == ["case_id", "eczema", "psoriasis", "acne", "tinea", "urticaria"]
    assert r["cv"]["submit"]["decision"] == "thresholds"
    s = r["score"]["ours"]
    assert r["score"]["task"] == "multilabel" and {"macro_f1", "top1_accuracy", "top3_accuracy"} <= set(s)
    assert "top3_accuracy" in r["cv"]


def _stack_pipeline(recipe: str, out: Path, data: Path) -> pd.DataFrame:
    """01 -> 03 -> 04 -> 05 of a stack-only recipe on a release made in tmp; returns the submission."""
    d, extra = f"configs/{recipe}", ["--data", str(data), "stack.patient_features=false"]
    kinds = _run_plan(d, out, extra, {**TINY, "prepare": ["cache.size=64"]})
    assert kinds == ["prepare", "features", "stack", "submit"]
    exp = next(ln.split(":")[1].strip() for ln in Path(ROOT, d, "submit.yaml").read_text().splitlines()
               if ln.startswith("exp:"))
    return pd.read_csv(out / exp / "submission.csv", dtype={0: str})


def test_isic2024_real_layout_hdf5(tmp_path: Path) -> None:
    """Training rows in train-metadata.csv + train-image.hdf5; the real public test files as the test."""
    data = make_isic2024_train(tmp_path / "isic2024", n=36, per_patient=3)
    for f in ("test-metadata.csv", "test-image.hdf5"):
        (data / f).write_bytes((I24 / f).read_bytes())
    sub = _stack_pipeline("isic2024_dev", tmp_path / "out", data)
    assert list(sub.columns) == ["isic_id", "target"]
    assert sub["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert sub["target"].between(0, 1).all()
    folds = pd.read_csv(tmp_path / "out" / "prep" / "isic2024" / "folds.csv")
    m = pd.read_csv(data / "train-metadata.csv").merge(folds, left_on="isic_id", right_on="lesion_id")
    assert (m.groupby("patient_id")["fold"].nunique() == 1).all()


def test_isic2020_official_layout(tmp_path: Path) -> None:
    data = make_isic2020(tmp_path / "isic2020", n=24, n_test=4)
    sub = _stack_pipeline("isic2020_dev", tmp_path / "out", data)
    assert list(sub.columns) == ["image_name", "target"] and len(sub) == 4
