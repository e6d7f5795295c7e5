"""The Kaggle kernel notebook run headless (nbclient) the way a kernel runs it, in the current
environment: code and data in read-only copies, HOME and every output in a writable working folder,
a network guard that fails the run on any non-loopback connection or name lookup, tiny models.
The full wheels rehearsal (fresh venv, pip --no-index) is `python tools/kaggle_rehearsal.py`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import load_file

pytestmark = pytest.mark.e2e
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64", "train.epochs=1",
        "train.batch_size=16", "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64}]",
        "stack.xgb.n_estimators=20", "stack.pca_components=8", "cache.size=96", "threads=2"]


def _rehearsal():
    return load_file(ROOT / "tools" / "kaggle_rehearsal.py", "kaggle_rehearsal")


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    kr = _rehearsal()
    work = tmp_path_factory.mktemp("kaggle")
    code = kr.copy_read_only(kr.tracked_files(ROOT), ROOT, work / "input" / "code")
    sample = ROOT / "input" / "milk10k_sample"
    data = kr.copy_read_only([p for p in sample.rglob("*") if p.is_file()], sample, work / "input" / "milk10k")
    before = {"code": kr.tree_digest(code), "data": kr.tree_digest(data)}
    out = work / "working"
    out.mkdir()
    params = dict(CODE_DIR=str(code), WHEELS_DIR=None, DATA_DIR=str(data), WORK_DIR=str(out),
                  RECIPE="configs/milk10k_sample", SKLESION_WEIGHTS=None, EXTRA_ARGS=TINY)
    env = kr.kernel_env(work, kr.write_net_guard(work / "guard"))
    error = None
    try:
        nb = kr.execute_notebook(kr.notebook_with_params(params), out, env, timeout=1200,
                                 out=work / "executed.ipynb")
    except Exception as e:  # noqa: BLE001 - asserted in the test with the notebook's output
        nb, error = None, e
    yield dict(kr=kr, work=work, code=code, data=data, out=out, before=before, nb=nb, error=error)
    kr.make_writable(work)


def test_notebook_runs_top_to_bottom_and_writes_the_submission(kernel_run: dict) -> None:
    assert kernel_run["error"] is None, str(kernel_run["error"])[-3000:]
    sub = pd.read_csv(kernel_run["out"] / "submission.csv", dtype={"lesion_id": str})
    test_ids = pd.read_csv(kernel_run["data"] / "MILK10k_Test_Metadata.csv")["lesion_id"].unique()
    assert sorted(sub["lesion_id"]) == sorted(test_ids)
    text = kernel_run["kr"].cell_text(kernel_run["nb"])
    for stage in ("01_preprocess", "02_train train_fusion", "03_features stack", "04_stack stack", "05_submit"):
        assert f"--- {stage}:" in text, stage
    assert "WHEELS_DIR = None" in text


def test_report_figures_are_shown_inline(kernel_run: dict) -> None:
    assert kernel_run["nb"] is not None
    images = [o for c in kernel_run["nb"].cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2


def test_no_network_and_nothing_written_into_code_or_data(kernel_run: dict) -> None:
    kr, log = kernel_run["kr"], kernel_run["work"] / "net_guard.log"
    assert not log.exists() or not log.read_text().strip(), log.read_text()
    for k in ("code", "data"):
        assert kr.digest_changes(kernel_run["before"][k], kr.tree_digest(kernel_run[k])) == [], k
    assert (kernel_run["work"] / "home").is_dir()  # HOME pointed into the writable work folder


def test_recipe_with_sklesion_and_no_weights_stops_with_what_to_do(tmp_path: Path) -> None:
    """The notebook's first cells only: a sklesion recipe without SKLESION_WEIGHTS stops at the weights cell."""
    kr = _rehearsal()
    params = dict(CODE_DIR=str(ROOT), WHEELS_DIR=None, DATA_DIR=None, WORK_DIR=str(tmp_path / "w"),
                  RECIPE="configs/milk10k_dev", SKLESION_WEIGHTS=None, EXTRA_ARGS=[])
    nb = kr.notebook_with_params(params)
    weights = next(i for i, c in enumerate(nb.cells) if "uses_sklesion" in c.source)
    nb.cells = nb.cells[:weights + 1]
    env = kr.kernel_env(tmp_path, kr.write_net_guard(tmp_path / "guard"))
    with pytest.raises(Exception) as e:
        kr.execute_notebook(nb, tmp_path, env, timeout=300)
    assert "uses the sklesion encoder but SKLESION_WEIGHTS is None" in str(e.value)
    assert "export-sklesion" in str(e.value)
