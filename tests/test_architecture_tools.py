"""The command-line tools (tools/*.py) and the Kaggle notebook builder (kaggle/*.py, and the code cells it
writes) follow the package's rules, read from the source with `ast`:

- no function longer than MAX_FUNCTION_LINES (the checker of tests/test_architecture.py);
- one exit path for bad input: only tools/_common.py (`run_tool`) writes the `error: ...` line.

Each check is a plain function over a folder, and is shown to catch a planted breach.
"""
from __future__ import annotations

import ast
from pathlib import Path

import nbformat

from tests.test_architecture import MAX_FUNCTION_LINES, long_functions

ROOT = Path(__file__).resolve().parents[1]
EXIT_HELPER = Path("tools") / "_common.py"


def tool_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "tools").glob("*.py")) + sorted((root / "kaggle").glob("*.py"))


def notebook_cells(root: Path, tmp: Path) -> list[Path]:
    """The code cells of kaggle/*.ipynb, each written to a file of its own under `tmp` (for the checkers)."""
    out = []
    for nb in sorted((root / "kaggle").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(nb, as_version=4).cells):
            if cell.cell_type == "code":
                out.append(tmp / f"{nb.stem}_cell{i:02d}.py")
                out[-1].write_text(cell.source)
    return out


def error_lines(paths: list[Path], root: Path = ROOT) -> list[str]:
    """'file:line' for each string that starts an `error: ` line, outside the one exit helper."""
    bad = []
    for p in paths:
        if p.is_relative_to(root) and p.relative_to(root) == EXIT_HELPER:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            first = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else node
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("error: "):
                bad.append(f"{p.name}:{node.lineno}")
    return sorted(set(bad))


def test_no_long_function_in_tools_and_kaggle(tmp_path: Path) -> None:
    bad = long_functions(tool_files() + notebook_cells(ROOT, tmp_path))
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(bad)


def test_bad_input_leaves_through_the_one_exit_helper() -> None:
    assert (ROOT / EXIT_HELPER).is_file()
    bad = error_lines(tool_files())
    assert not bad, "tools print their own 'error:' line; use tools._common.run_tool:\n" + "\n".join(bad)


def test_checks_catch_planted_breaches(tmp_path: Path) -> None:
    for folder in ("tools", "kaggle"):
        (tmp_path / folder).mkdir()
    body = "    x = 1\n" * MAX_FUNCTION_LINES
    (tmp_path / "tools" / "ok.py").write_text("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))
    (tmp_path / "tools" / "long.py").write_text("def g():\n" + body)
    (tmp_path / "kaggle" / "build.py").write_text(
        "import sys\ndef main():\n    try:\n        pass\n    except ValueError as e:\n"
        "        print(f'error: {e}', file=sys.stderr)\n        return 2\n")
    (tmp_path / "tools" / "_common.py").write_text("def run_tool():\n    print('error: x')\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def h():\n" + body)])
    nbformat.write(nb, tmp_path / "kaggle" / "k.ipynb")
    cells = tmp_path / "cells"
    cells.mkdir()
    found = long_functions(tool_files(tmp_path) + notebook_cells(tmp_path, cells))
    assert [f.split()[1] for f in found] == ["g", "h"]       # 81 lines are caught, 80 pass
    assert error_lines(tool_files(tmp_path), tmp_path) == ["build.py:6"]  # _common.py is the one allowed
