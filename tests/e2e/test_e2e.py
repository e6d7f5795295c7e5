"""End to end: the numbered scripts 01 -> 05 on the shipped sample (tiny models), then the official
scorer on the held-out labels; and a bad run that must stop cleanly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lib.stages.plan import recipe_plan

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "configs/milk10k_sample"
TINY_ENC = "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64}]"
TINY_TRAIN = ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64",
              "train.epochs=1", "train.batch_size=16"]


def _run(args: list[str], out: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args, "--output", str(out), "cache.size=96", "threads=2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def _run_plan(recipe: str, out: Path, per_kind: dict[str, list[str]], common: tuple[str, ...] = ()) -> list[str]:
    """Every step of the recipe's plan (lib.stages.plan: what run_all.sh runs), in order, with `common` and
    the tiny settings of its kind; returns the steps' names."""
    steps = recipe_plan(ROOT / recipe)
    for step in steps:
        _run(step.argv([*common, *per_kind.get(step.kind, [])]), out)
    return [s.name for s in steps]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    ran = _run_plan(SAMPLE, out, {"train": TINY_TRAIN, "features": [TINY_ENC],
                                  "stack": [TINY_ENC, "stack.xgb.n_estimators=20", "stack.pca_components=8"]})
    assert ran == ["01_preprocess", "02_train train_fusion", "03_features stack", "04_stack stack", "05_submit"]
    return out


def test_submission_is_official_format_for_every_test_lesion(pipeline: Path) -> None:
    sub = pd.read_csv(pipeline / "sample_submit/submission.csv", dtype={"lesion_id": str})
    test_ids = pd.read_csv(ROOT / "input/milk10k_sample/MILK10k_Test_Metadata.csv")["lesion_id"].unique()
    classes = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
    assert list(sub.columns) == ["lesion_id", *classes]
    assert sorted(sub["lesion_id"]) == sorted(test_ids)
    v = sub[classes].to_numpy()
    assert ((v >= 0) & (v <= 1)).all()
    thr = json.loads((pipeline / "sample_submit/thresholds.json").read_text())
    assert thr["decision"] in ("argmax", "thresholds")
    if thr["decision"] == "argmax":  # exactly one class above 0.5 per lesion
        assert ((v > 0.5).sum(1) == 1).all()


def test_every_stage_left_its_artifacts_and_config(pipeline: Path) -> None:
    for f in ["prep/milk10k_sample/folds.csv", "sample_fusion/oof.parquet", "sample_fusion/test.parquet",
              "sample_fusion/fold0/history.csv", "sample_fusion/cv.json", "sample_stack/features/lite0_train.parquet",
              "sample_stack/oof.parquet", "sample_stack/test.parquet", "sample_stack/cv.json",
              "sample_stack/config.yaml", "sample_submit/report.md", "sample_submit/config.yaml",
              "sample_submit/cv.json", "sample_submit/test.parquet"]:
        assert (pipeline / f).exists(), f
    cv = json.loads((pipeline / "sample_stack/cv.json").read_text())
    assert "oof_sample_fusion" in cv["stack"]["blocks"] and 0 <= cv["macro_f1_argmax"] <= 1


def test_one_cv_schema_and_a_manifest_per_stage_folder(pipeline: Path) -> None:
    for exp, stage, extra in (("sample_fusion", "train", "training"), ("sample_stack", "stack", "stack"),
                              ("sample_submit", "submit", "submit")):
        cv = json.loads((pipeline / exp / "cv.json").read_text())
        assert (cv["schema_version"], cv["stage"], cv["exp"], cv["task"]) == (1, stage, exp, "multiclass")
        assert {"n", "macro_dice_tuned_cv", "macro_f1_argmax", extra} <= set(cv)
    folds_sha = None
    for folder, stage in (("prep/milk10k_sample", "prepare"), ("sample_fusion", "train"),
                          ("sample_stack/features", "features"), ("sample_stack", "stack"),
                          ("sample_submit", "submit")):
        m = json.loads((pipeline / folder / "manifest.json").read_text())
        assert m["stage"] == stage and m["wall_seconds"] > 0 and m["created_utc"], folder
        folds_sha = folds_sha or m["folds_sha1"]
        assert m["folds_sha1"] == folds_sha, folder
    md = (pipeline / "sample_submit/report.md").read_text()
    times = md.split("## Stage times", 1)[1].split("\n## ", 1)[0]
    for row in ("| 01 prepare | milk10k_sample |", "| 02 train | sample_fusion |",
                "| 03 features | sample_stack/features |", "| 04 stack | sample_stack |", "| 05 submit |"):
        assert row in times, (row, times)


def test_official_scorer_accepts_the_submission(pipeline: Path) -> None:
    pytest.importorskip("isic_challenge_scoring")
    p = subprocess.run([sys.executable, "tools/score_submission.py", "--truth",
                        "input/milk10k_sample/held_out/MILK10k_Test_GroundTruth.csv", "--submission",
                        str(pipeline / "sample_submit/submission.csv"), "--json", str(pipeline / "score.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads((pipeline / "score.json").read_text())
    assert abs(res["official"]["macro_dice"] - res["ours"]["macro_dice"]) < 1e-9


def test_bad_member_stops_with_one_line_and_no_submission(pipeline: Path) -> None:
    p = _run(["05_submit.py", "-c", f"{SAMPLE}/submit.yaml", "--exp", "bad_submit",
              "submit.members=[no_such_exp]"], pipeline, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
    assert "no_such_exp" in p.stderr
    assert not (pipeline / "bad_submit/submission.csv").exists()


def test_gpu_recipe_runs_on_cpu_with_tiny_settings(tmp_path: Path) -> None:
    """configs/milk10k_gpu (not measured on a GPU): every file loads, chains (members, oof_exps and exp
    names agree) and runs 01 -> 05 on the shipped sample with tiny models, EMA and its own TTA."""
    gpu, out = "configs/milk10k_gpu", tmp_path / "gpu"
    tiny_stack = [TINY_ENC, "stack.features=[lite0]", "stack.xgb.n_estimators=20", "stack.lgbm.n_estimators=20",
                  "stack.pca_components=8", "stack.seeds=[0]"]
    ran = _run_plan(gpu, out, {"train": [*TINY_TRAIN, "train.model.hidden=32", "train.batch_size=32", "train.ema=0.5"],
                               "features": tiny_stack, "stack": tiny_stack}, ("--data", "input/milk10k_sample"))
    trains = [n for n in ran if n.startswith("02_train")]
    assert trains == ["02_train train_derm_sklesion", "02_train train_fusion_lite2"]
    cv = json.loads((out / "gpu_submit" / "cv.json").read_text())
    assert [m["exp"] for m in cv["submit"]["members"]] == ["gpu_stack", "gpu_fusion_lite2", "gpu_derm_sklesion"]
    assert {"macro_dice_nested", "macro_dice_tuned_cv_nested"} <= set(cv["submit"]["honest_cv"])
    assert json.loads((out / "gpu_fusion_lite2" / "cv.json").read_text())["training"]["weights_for_oof"] == ["EMA"]
    sub = pd.read_csv(out / "gpu_submit" / "submission.csv")
    assert len(sub) == 32
