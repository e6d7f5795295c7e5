"""The Kaggle inference notebook (kaggle/predict_kernel.ipynb) run headless (nbclient) the way a kernel runs it,
in the current environment: a recipe is trained with tiny models (its plan, lib.stages.plan), exported as a
bundle (tools/export_bundle.py), then the notebook scores a test release with read-only copies of the code,
the bundle and the release's test files only (no training image within reach), a network guard, and HOME
and every output in a writable working folder.

- MILK10k sample recipe, the sample's own test release: the notebook's submission equals the training run's
  05 submission (ids and probabilities within 1e-5);
- ISIC 2024 stand-in recipe (configs/isic2024_ham_sample), then the competition's real 3-row test files
  (test-metadata.csv + test-image.hdf5): the 3 isic_ids with a finite target in [0, 1].

The full wheels rehearsal (fresh venv, pip --no-index) is `python tools/kaggle_rehearsal.py --notebook predict`."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lib.stages.plan import recipe_plan
from tests.helpers import load_file

pytestmark = pytest.mark.e2e
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
ENC = "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64}]"
TRAIN = ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64", "train.epochs=1",
         "train.batch_size=16"]
STACK = [ENC, "stack.xgb.n_estimators=20", "stack.lgbm.n_estimators=20", "stack.pca_components=8"]
TINY = {"train": TRAIN, "features": [ENC], "stack": STACK}  # per kind of step of the recipe plan
COMMON = ["cache.size=96", "threads=2"]
# the competition's public test files: the shared data folder, else the same bytes shipped in the repository
ISIC24_TEST = next((p for p in (ROOT.parent / "shared" / "data" / "isic2024_test_sample",
                                ROOT / "input" / "isic2024_test_sample") if (p / "test-metadata.csv").is_file()), None)


def _rehearsal():
    return load_file(ROOT / "tools" / "kaggle_rehearsal.py", "kaggle_rehearsal")


def train_and_export(recipe: str, work: Path, extra: list[str]) -> tuple[Path, str]:
    """Every step of the recipe's plan into work/train (tiny models), then its 05 experiment exported as a
    bundle; returns (bundle folder, the 05 experiment's name)."""
    out = work / "train"
    steps = recipe_plan(ROOT / "configs" / recipe)
    for step in steps:
        cmd = [sys.executable, *step.argv([*TINY.get(step.kind, []), *COMMON, *extra]), "--output", str(out)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{step.name} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    exp = yaml.safe_load(steps[-1].config.read_text())["exp"]
    bundle = work / "bundle_src"
    p = subprocess.run([sys.executable, "tools/export_bundle.py", str(out / exp), str(bundle)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"export_bundle failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return bundle, exp


def rehearse_predict(work: Path, bundle: Path, release: Path) -> dict:
    """The predict notebook on read-only copies of the code, the bundle and the release's test files."""
    kr = _rehearsal()
    inputs = kr.predict_inputs(work, bundle, release)
    before = {k: kr.tree_digest(v) for k, v in inputs.items()}
    out = work / "working"
    out.mkdir()
    env = kr.kernel_env(work, kr.write_net_guard(work / "guard"))
    params = kr.predict_params(inputs, out, None, ["threads=2"])
    error, nb = None, None
    try:
        nb = kr.execute_notebook(kr.notebook_with_params(params, kr.NOTEBOOKS["predict"]), out, env, timeout=1200,
                                 out=work / "executed.ipynb")
    except Exception as e:  # noqa: BLE001 - asserted in the tests with the notebook's output
        error = e
    return dict(kr=kr, work=work, out=out, before=before, nb=nb, error=error, **inputs)


def assert_offline_and_untouched(run: dict) -> None:
    kr, log = run["kr"], run["work"] / "net_guard.log"
    assert not log.exists() or not log.read_text().strip(), log.read_text()
    for k, before in run["before"].items():
        assert kr.digest_changes(before, kr.tree_digest(run[k])) == [], k


@pytest.fixture(scope="module")
def milk10k(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("kaggle_predict_milk10k")
    bundle, exp = train_and_export("milk10k_sample", work, [])
    run = rehearse_predict(work, bundle, ROOT / "input" / "milk10k_sample")
    run["trained"] = work / "train" / exp / "submission.csv"
    yield run
    run["kr"].make_writable(work)


def test_predict_notebook_gets_only_the_test_release(milk10k: dict) -> None:
    names = {p.relative_to(milk10k["test"]).parts[0] for p in milk10k["test"].rglob("*")}
    assert names == {"MILK10k_Test_Input", "MILK10k_Test_Metadata.csv"}  # no training image or label


def test_predict_notebook_reproduces_the_training_runs_submission(milk10k: dict) -> None:
    assert milk10k["error"] is None, str(milk10k["error"])[-3000:]
    sub = pd.read_csv(milk10k["out"] / "submission.csv", dtype={"lesion_id": str})
    test_ids = pd.read_csv(milk10k["test"] / "MILK10k_Test_Metadata.csv", dtype={"lesion_id": str})["lesion_id"]
    assert sorted(sub["lesion_id"]) == sorted(test_ids.unique())
    trained = pd.read_csv(milk10k["trained"], dtype={"lesion_id": str})
    assert list(sub.columns) == list(trained.columns)
    a, b = (t.set_index("lesion_id").sort_index() for t in (sub, trained))
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), atol=1e-5)
    text = milk10k["kr"].cell_text(milk10k["nb"])
    assert "--- 06_predict:" in text and "WHEELS_DIR = None" in text
    assert (milk10k["out"] / "timings.json").is_file() and (milk10k["out"] / "output" / "predict").is_dir()


def test_predict_notebook_shows_the_model_card_and_the_bundle(milk10k: dict) -> None:
    assert milk10k["nb"] is not None
    data = [o.get("data", {}) for c in milk10k["nb"].cells for o in c.get("outputs", [])]
    cards = [d["text/markdown"] for d in data if "text/markdown" in d]
    assert any(card == (milk10k["bundle"] / "model_card.md").read_text() for card in cards)
    assert any("image/png" in d for d in data) == any(milk10k["bundle"].glob("*.png"))
    assert "'task': 'multiclass'" in milk10k["kr"].cell_text(milk10k["nb"])


def test_predict_notebook_is_offline_and_writes_nothing_into_its_inputs(milk10k: dict) -> None:
    assert milk10k["nb"] is not None
    assert_offline_and_untouched(milk10k)
    assert set(milk10k["before"]) == {"code", "bundle", "test"}
    assert (milk10k["work"] / "home").is_dir()  # HOME pointed into the writable work folder


@pytest.mark.skipif(ISIC24_TEST is None, reason="the ISIC 2024 public test files are absent")
def test_isic2024_bundle_scores_the_real_test_files(tmp_path: Path) -> None:
    """The ISIC 2024 stand-in recipe (HAM10000 in the SLICE-3D layout), tiny, then the competition's 3 real
    test rows (HDF5 crops): the notebook writes isic_id,target for the 3 ids, targets finite in [0, 1]."""
    bundle, _ = train_and_export("isic2024_ham_sample", tmp_path, ["folds.n_splits=3"])
    run = rehearse_predict(tmp_path, bundle, ISIC24_TEST)
    try:
        assert run["error"] is None, str(run["error"])[-3000:]
        sub = pd.read_csv(run["out"] / "submission.csv", dtype={"isic_id": str})
        ids = pd.read_csv(ISIC24_TEST / "test-metadata.csv", dtype={"isic_id": str})["isic_id"]
        assert list(sub.columns) == ["isic_id", "target"] and len(ids) == 3
        assert sorted(sub["isic_id"]) == sorted(ids)
        assert all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in sub["target"].astype(float))
        assert_offline_and_untouched(run)
    finally:
        run["kr"].make_writable(tmp_path)
