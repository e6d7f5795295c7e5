"""The package's design, read from the source with `ast` (not by convention):

- layers, one direction: core <- config <- data <- vision <- training | tabular <- evaluation <- stages;
  a module imports only its own layer or layers to its left (training and tabular are siblings and
  do not import each other); every import counts, also one hidden inside a function;
- no import cycle between lib modules;
- the numbered scripts are thin: they import only `lib.config.cli` and `lib.stages.*`, have an
  importable `main(cfg, ...)` and do nothing at import time;
- no function in lib/ longer than MAX_FUNCTION_LINES;
- no module-level mutable state: module-level containers are UPPER_CASE constants;
- one home for file names: no string literal in lib/ names a file a stage writes (the names
  `lib/core/artifacts.py` defines) outside that module; writer and reader use its constants.

Each checker is a plain function over an import graph, and is shown to catch a planted breach.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib"
LAYERS = {"core": 0, "config": 1, "data": 2, "vision": 3, "training": 4, "tabular": 4, "evaluation": 5,
          "stages": 6}
MAX_FUNCTION_LINES = 80
SCRIPTS = sorted(ROOT.glob("0[1-5]_*.py"))
ARTIFACTS = LIB / "core" / "artifacts.py"
# file-name literals allowed outside lib/core/artifacts.py, per module (none today; a stale entry fails)
FILE_NAME_LITERALS_ALLOWED: dict[str, set[str]] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def lib_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every `lib` module imported anywhere in the file (functions included), resolved to a known module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` depends on the submodule (a parent package's __init__ runs for
            # any submodule import, so it is not an edge of its own); `from mod import name` on mod
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = subs + ([node.module] if len(subs) < len(node.names) else [])
        for n in names:
            if n == "lib" or not n.startswith("lib."):
                continue
            while n not in known and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in known and n != "lib":
                out.add(n)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = lib_modules()
    return {m: imported_modules(p, set(mods)) - {m} for m, p in mods.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for each import of a module in a later layer or in a sibling layer."""
    bad = []
    for a, targets in graph.items():
        la = layer_of(a)
        for b in sorted(targets):
            lb = layer_of(b)
            if la is None or lb is None:
                if la != lb:
                    bad.append(f"{a} -> {b} (a lib module outside the layers)")
                continue
            if LAYERS[lb] > LAYERS[la] or (LAYERS[lb] == LAYERS[la] and la != lb):
                bad.append(f"{a} ({la}) -> {b} ({lb})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{rel(p)}:{node.lineno} {node.name} ({n} lines)")
    return out


def mutable_module_state(paths: list[Path]) -> list[str]:
    """Module-level names bound to a list/dict/set (literal or call) that are not UPPER_CASE constants."""
    out = []
    for p in paths:
        for node in ast.parse(p.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
            value = getattr(node, "value", None)
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in ("list", "dict", "set", "defaultdict", "OrderedDict"))
            for t in targets:
                if mutable and isinstance(t, ast.Name) and not t.id.isupper() and t.id != "__all__":
                    out.append(f"{rel(p)}:{node.lineno} {t.id}")
    return out


def artifact_file_names(path: Path = ARTIFACTS) -> set[str]:
    """The file names a module defines: module-level UPPER_CASE str constants that look like `name.ext`
    (folder names such as `features` are also config keys, so they are not checked)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
                and re.fullmatch(r"[\w-]+\.[a-z]+", node.value.value)):
            out.add(node.value.value)
    return out


def file_name_literals(paths: list[Path], names: set[str],
                       allowed: dict[str, set[str]] | None = None) -> list[str]:
    """'file:line literal' for each string literal (f-string pieces too; docstrings and other bare
    strings are prose) that is one of `names` or ends in one after '/', '_', '-' or '.'
    (`f"{exp}_train.parquet"`). `allowed`: {relative file: literals it may still hold}."""
    out = []
    for p in paths:
        tree = ast.parse(p.read_text())
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        ok = (allowed or {}).get(rel(p), set())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
                continue
            v = node.value
            hit = [n for n in names if v == n or (v.endswith(n) and v[-len(n) - 1] in "/_-.")]
            if hit and v not in ok:
                out.append(f"{rel(p)}:{node.lineno} {v!r} (use lib.core.artifacts' name for {hit[0]})")
    return out


# ----------------------------------------------------------------------------- the checks


def test_every_lib_module_sits_in_a_layer():
    outside = [m for m in lib_modules() if m != "lib" and layer_of(m) is None]
    assert not outside, f"modules outside the layers {sorted(LAYERS)}: {outside}"


def test_no_layer_breach():
    bad = layer_breaches(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_no_long_function():
    bad = long_functions(sorted(LIB.rglob("*.py")))
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(bad)


def test_no_module_level_mutable_state():
    bad = mutable_module_state(sorted(LIB.rglob("*.py")) + SCRIPTS)
    assert not bad, "module-level mutable names (make them UPPER_CASE constants or local):\n" + "\n".join(bad)


def test_file_names_live_in_artifacts_only():
    names = artifact_file_names()
    assert {"summary.json", "model.pt", "checkpoint.pt", "oof.parquet", "cv.json", "manifest.json"} <= names
    paths = [p for p in sorted(LIB.rglob("*.py")) if p != ARTIFACTS]
    bad = file_name_literals(paths, names, FILE_NAME_LITERALS_ALLOWED)
    assert not bad, "file names spelled outside lib/core/artifacts.py (use its constants):\n" + "\n".join(bad)
    stale = {f: lits - {v for v in lits if file_name_literals([ROOT / f], {v})} for f, lits in
             FILE_NAME_LITERALS_ALLOWED.items()}
    assert not any(stale.values()), f"allowed literals no longer present (remove them from the list): {stale}"


def test_file_name_check_catches_planted_literals(tmp_path):
    art = tmp_path / "artifacts.py"
    art.write_text('"""Names."""\nOOF = "oof.parquet"\nSUMMARY = "summary.json"\nFEATURES = "features"\n'
                   'CV_SCHEMA_VERSION = 1\nsuffix = "x.txt"\n')
    names = artifact_file_names(art)
    assert names == {"oof.parquet", "summary.json"}
    f = tmp_path / "m.py"
    f.write_text('"""Writes oof.parquet and summary.json."""\n'
                 'def w(folder, exp):\n'
                 '    """Reads summary.json."""\n'
                 '    a = folder / "oof.parquet"\n'
                 '    b = folder / f"{exp}_summary.json"\n'
                 '    c = cfg["features"], "my_oof.parquet.bak", "oof.parquet.json"\n'
                 '    return a, b, c\n')
    bad = file_name_literals([f], names)
    assert [b.split()[1] for b in bad] == ["'oof.parquet'", "'_summary.json'"], bad
    assert file_name_literals([f], names, {rel(f): {"oof.parquet", "_summary.json"}}) == []


def test_checkers_catch_planted_breaches(tmp_path):
    graph = {"lib.core.io": {"lib.stages.train"}, "lib.stages.train": {"lib.core.io"},
             "lib.training.fold": {"lib.tabular.stackers"}, "lib.tabular.stackers": set(),
             "lib.vision.models": {"lib.data.cache"}, "lib.data.cache": set()}
    bad = layer_breaches(graph)
    assert "lib.core.io (core) -> lib.stages.train (stages)" in bad
    assert "lib.training.fold (training) -> lib.tabular.stackers (tabular)" in bad
    assert not any(b.startswith("lib.vision.models") for b in bad)   # a later layer may import an earlier one
    assert cycles(graph) == [["lib.core.io", "lib.stages.train"]]
    f = tmp_path / "m.py"
    f.write_text("def f():\n" + "    x = 1\n" * 85 + "state = {}\nTABLE = {'a': 1}\n")
    assert len(long_functions([f])) == 1 and long_functions([f], limit=100) == []
    # a module-level lowercase container is state; an UPPER_CASE one is a table
    assert [s.split()[-1] for s in mutable_module_state([f])] == ["state"]


def test_hidden_function_import_is_seen(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from lib.stages.train import run\n    return run\n")
    assert imported_modules(p, {"lib.stages.train", "lib.stages"}) == {"lib.stages.train"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_are_thin(script):
    mods = imported_modules(script, set(lib_modules()))
    assert mods, f"{script.name} imports nothing from lib"
    extra = [m for m in mods if m != "lib.config.cli" and not m.startswith("lib.stages.")]
    assert not extra, f"{script.name} imports domains directly: {extra} (scripts call a stage)"
    tree = ast.parse(script.read_text())
    top = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.If))
           and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
           and not (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))]
    assert not top, f"{script.name} does work at import time (line {top[0].lineno})"
    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    argv = sys.argv
    sys.argv = [str(script), "--definitely-not-a-flag"]   # importing must not parse arguments
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    assert callable(getattr(mod, "main", None)), f"{script.name} has no importable main(cfg)"


def test_config_loading_imports_no_ml_library():
    code = ("import sys\nfrom lib.config.load import load_config\nfrom lib.config.cli import build_parser\n"
            "load_config('configs/milk10k_sample/train_fusion.yaml')\n"
            "heavy = [m for m in ('torch', 'xgboost', 'lightgbm', 'albumentations', 'sklearn', 'timm', 'cv2',"
            " 'open_clip') if m in sys.modules]\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"loading a config imported {out.stdout.strip()}"
