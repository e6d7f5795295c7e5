"""Train once, predict anywhere (issue 26): the sample recipe (tiny models, plus a cut encoder fine-tuned
on its trunk cache and the fold models' logits as a feature block, so every fitted part is on the path)
is trained, exported as a bundle, and 06_predict.py scores the sample's test release with only the
bundle and a copy of the test release that holds no training file (both read-only). The predict path
reproduces the training run's blended probabilities within 1e-5 and its decisions exactly. Bad bundles
and bad releases stop with one line naming the file, exit code 2 and nothing written."""
from __future__ import annotations

import json
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.e2e.test_test_release import CLASSES, run_recipe
from tests.helpers import SAMPLE, TEST_IN, TEST_META, read_raw, write_raw

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def release_copy(dst: Path) -> Path:
    """The sample's test release alone (metadata + test images): no training file beside it."""
    dst.mkdir(parents=True)
    shutil.copyfile(SAMPLE / TEST_META, dst / TEST_META)
    shutil.copytree(SAMPLE / TEST_IN, dst / TEST_IN)
    return dst


def predict(bundle: Path, release: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "06_predict.py", "--bundle", str(bundle), "--test-data", str(release), "--output", str(out),
           "threads=2", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("bundle")
    out, bundle = base / "train", base / "bundle"
    run_recipe(out)
    p = subprocess.run([sys.executable, "tools/export_bundle.py", str(out / "sample_submit"), str(bundle)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    release = release_copy(base / "release")
    _read_only(bundle)
    _read_only(release)
    run = predict(bundle, release, base / "pred")
    yield {"base": base, "out": out, "bundle": bundle, "release": release, "pred": base / "pred" / "predict",
           "run": run}
    _writable(base)


def test_predict_reproduces_the_training_run(trained: dict) -> None:
    run = trained["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    ids = sorted(dict.fromkeys(read_raw(SAMPLE / TEST_META)["lesion_id"]))
    for rel in ("sample_fusion/test.parquet", "sample_stack/features/lite0_test.parquet",
                "sample_stack/features/ft_lite0_test.parquet", "sample_stack/features/sample_fusion_test.parquet",
                "sample_stack/test.parquet", "sample_submit/test.parquet"):
        got, want = pd.read_parquet(trained["pred"] / rel), pd.read_parquet(trained["out"] / rel)
        assert sorted(got["lesion_id"]) == ids, rel
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-5, obj=rel)
    got = pd.read_csv(trained["pred"] / "submission.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    want = pd.read_csv(trained["out"] / "sample_submit/submission.csv", dtype={"lesion_id": str}).set_index("lesion_id")
    got = got.loc[want.index]
    assert np.abs(got[CLASSES].to_numpy() - want[CLASSES].to_numpy()).max() <= 1e-5
    assert ((got[CLASSES] > 0.5).to_numpy() == (want[CLASSES] > 0.5).to_numpy()).all()   # identical decisions
    summary = json.loads((trained["pred"] / "predict.json").read_text())
    assert summary["n_test"] == len(ids) and summary["seconds_per_1000"] > 0


def test_the_bundle_is_safe_and_holds_no_training_data(trained: dict) -> None:
    bundle = trained["bundle"]
    doc = json.loads((bundle / "bundle.json").read_text())
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(doc["files"]) == [f for f in files if f != "bundle.json"]
    assert {Path(f).suffix for f in files} <= {".json", ".yaml", ".md", ".png", ".safetensors", ".ubj", ".txt"}
    assert not [f for f in files if f.endswith((".parquet", ".csv", ".jpg", ".npy", ".pt", ".pkl"))]
    kinds = [e["kind"] for e in doc["recipe"]["experiments"]]
    assert kinds == ["train", "features", "stack", "submit"]
    assert "model_card.md" in doc["files"] and doc["data"]["classes"] == CLASSES
    assert any(f.startswith("sample_stack/features/ft_lite0/fold4") for f in files)
    assert any(f.startswith("sample_fusion/fold4/model.safetensors") for f in files)


def _broken(trained: dict, tmp: Path, how: str) -> Path:
    """A writable copy of the bundle, damaged in one way."""
    b = tmp / "b"
    shutil.copytree(trained["bundle"], b)
    _writable(b)
    doc = json.loads((b / "bundle.json").read_text())
    victim = b / "sample_fusion" / "fold0" / "model.safetensors"
    if how == "missing":
        victim.unlink()
    elif how == "checksum":
        victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    elif how == "pickle":
        (b / "sample_stack" / "stacker" / "extra.pkl").write_bytes(pickle.dumps({"x": 1}))
    elif how == "version":
        doc["artifact_versions"]["stacker"] = 99
        (b / "bundle.json").write_text(json.dumps(doc))
    elif how == "format":
        doc["format_version"] = 2
        (b / "bundle.json").write_text(json.dumps(doc))
    return b


@pytest.mark.parametrize("how,match", [
    ("missing", "model.safetensors: missing from the bundle"),
    ("checksum", "model.safetensors: checksum does not match"),
    ("pickle", "extra.pkl: refused: a .pkl file can run code"),
    ("version", "stacker is 99; this code reads"),
    ("format", "bundle format version 2"),
])
def test_a_bad_bundle_is_refused_with_nothing_written(trained: dict, tmp_path: Path, how: str, match: str) -> None:
    p = predict(_broken(trained, tmp_path, how), trained["release"], tmp_path / "out")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def _release_without_clinical(dst: Path) -> Path:
    dst.mkdir()
    meta = read_raw(SAMPLE / TEST_META)
    write_raw(meta[meta["image_type"] == "dermoscopic"], dst / TEST_META)
    shutil.copytree(SAMPLE / TEST_IN, dst / TEST_IN)
    return dst


@pytest.mark.parametrize("release,match", [
    (lambda tmp: ROOT / "input" / "isic2024_ham_sample", "no milk10k test release there"),
    (lambda tmp: _release_without_clinical(tmp / "r"), "clinical"),
    (lambda tmp: tmp / "absent", "absent"),
])
def test_a_bad_release_is_refused_with_nothing_written(trained: dict, tmp_path: Path, release, match: str) -> None:
    p = predict(trained["bundle"], release(tmp_path), tmp_path / "out")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_only_runtime_settings_may_be_overridden(trained: dict, tmp_path: Path) -> None:
    p = predict(trained["bundle"], trained["release"], tmp_path / "out", "stack.pca_components=4")
    assert p.returncode == 2 and "only runtime settings may change" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_second_prediction_reuses_the_test_side_caches(trained: dict) -> None:
    again = predict(trained["bundle"], trained["release"], trained["base"] / "pred")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "lite0/test: cached embeddings reused" in again.stderr + again.stdout
    a = pd.read_csv(trained["pred"] / "submission.csv")
    b = pd.read_csv(trained["out"] / "sample_submit/submission.csv")
    assert sorted(a["lesion_id"]) == sorted(b["lesion_id"])


@pytest.mark.parametrize("what,match", [
    ("stack", "is not a 05 experiment"),
    ("nonempty", "exists and is not empty"),
    ("absent", "is not a finished experiment"),
])
def test_export_refuses_what_is_not_a_finished_recipe(trained: dict, tmp_path: Path, what: str, match: str) -> None:
    src = {"stack": trained["out"] / "sample_stack", "absent": trained["out"] / "nope"}.get(
        what, trained["out"] / "sample_submit")
    dest = tmp_path / "b"
    if what == "nonempty":
        dest.mkdir()
        (dest / "x.json").write_text("{}")
    p = subprocess.run([sys.executable, "tools/export_bundle.py", str(src), str(dest)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".b.tmp")]
