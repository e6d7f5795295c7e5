"""A new test release on a trained output folder (issue 26 item 6, issue 27 item 9): the sample recipe runs
with its own test release, then again on the same output folder with `--test-data` another release
(lesions dropped, one image replaced under the same id). The second run trains nothing: every
train-side artifact and cache is left untouched (02's fold models and OOF logits, 03's embeddings,
trunk activations, fine-tuned fold models), only the test side is recomputed, and its submission
equals a from-scratch run on that release. The recipe is the sample's with tiny models, plus a cut
encoder fine-tuned on its trunk cache and the fold models' logits as a feature block, so that every
test-side cache is on the path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lib.stages.plan import recipe_plan
from tests.helpers import TEST_META, other_test_release, read_raw

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "configs/milk10k_sample"
CLASSES = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
ENC = ("features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64, cut: conv_head, "
       "finetune: true}]")
STACK = [ENC, "features.finetune.epochs=1", "features.from_exps=[sample_fusion]",
         "stack.features=[lite0, ft_lite0, sample_fusion]", "stack.xgb.n_estimators=20", "stack.pca_components=8"]
TINY = {"train": ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64",
                  "train.epochs=1", "train.batch_size=16"], "features": STACK, "stack": STACK}


def run_recipe(out: Path, *common: str) -> str:
    """Every step of the sample recipe's plan (what run_all.sh runs) into `out`; returns their logs."""
    logs = []
    for step in recipe_plan(ROOT / SAMPLE):
        cmd = [sys.executable, *step.argv([*common, *TINY.get(step.kind, [])]), "--output", str(out),
               "cache.size=96", "threads=2"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{step.name} failed ({p.returncode}):\n{p.stderr[-3000:]}"
        logs.append(p.stdout + p.stderr)
    return "\n".join(logs)


def train_side(out: Path) -> dict[Path, int]:
    """Every file a trained recipe keeps for its train side, with its mtime."""
    prep = out / "prep" / "milk10k_sample"
    files = [*(out / "sample_fusion").glob("fold*/*"), *prep.glob("features/*/train*"),
             *prep.glob("features/*/fold*.safetensors"), *prep.glob("trunks/*/train_*")]
    return {f: f.stat().st_mtime_ns for f in files if f.name != "test_logits.parquet" and f.name != "test_logits.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("release")
    out, scratch = base / "out", base / "scratch"
    run_recipe(out)
    first = pd.read_csv(out / "sample_submit/submission.csv", dtype={"lesion_id": str})
    stamps = train_side(out)
    release, changed = other_test_release(base / "release_b", drop=3)   # made after training, as a real one is
    logs = run_recipe(out, "--test-data", str(release))
    run_recipe(scratch, "--test-data", str(release))
    return {"out": out, "scratch": scratch, "first": first, "stamps": stamps, "logs": logs, "release": release,
            "changed": changed}


def test_second_release_trains_nothing_and_recomputes_the_test_side(runs: dict) -> None:
    stamps, logs = runs["stamps"], runs["logs"]
    names = {f.name for f in stamps}
    assert {"model.pt", "oof.parquet", "summary.json", "fold4.safetensors", "train.parquet"} <= names
    assert any(n.startswith("train-") for n in names) and any(n.startswith("train_") for n in names)
    assert train_side(runs["out"]) == stamps
    for k in range(5):
        assert f"fold {k} already trained with this config" in logs and f"fold {k}: test logits of" in logs
    assert "lite0/train: cached embeddings reused" in logs and "lite0/test: cached embeddings reused" not in logs
    assert "ft_lite0: cached fine-tuned fold models and OOF logits reused" in logs
    assert "ft_lite0: test logits of 29 lesions from the 5 kept fold models" in logs
    assert "not refitting, predicting the test rows only" in logs      # 04 applies its kept stackers
    manifest = json.loads((runs["out"] / "sample_fusion/manifest.json").read_text())
    scratch = json.loads((runs["scratch"] / "sample_fusion/manifest.json").read_text())
    assert manifest["test_rows"] == scratch["test_rows"] and len(manifest["test_rows"]) == 40


def test_second_release_submission_equals_a_from_scratch_run(runs: dict) -> None:
    ids = list(dict.fromkeys(read_raw(runs["release"] / TEST_META)["lesion_id"]))
    for rel in ("sample_submit/submission.csv", "sample_submit/test.parquet", "sample_stack/test.parquet",
                "sample_fusion/test.parquet", "sample_stack/features/lite0_test.parquet",
                "sample_stack/features/ft_lite0_test.parquet", "sample_stack/features/sample_fusion_test.parquet"):
        read = (lambda p: pd.read_csv(p, dtype={"lesion_id": str})) if rel.endswith(".csv") else pd.read_parquet
        got, want = read(runs["out"] / rel), read(runs["scratch"] / rel)
        assert sorted(got["lesion_id"]) == sorted(ids), rel
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6, obj=rel)
    first = runs["first"].set_index("lesion_id")
    assert len(first) == len(ids) + 3
    again = pd.read_csv(runs["out"] / "sample_submit/submission.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    assert not first.loc[runs["changed"], CLASSES].equals(again.loc[runs["changed"], CLASSES])   # its new image counts
