"""tools/_common.py: the one exit path of the tools (bad input -> one line, exit 2; anything else is a
bug and keeps its stack trace) and the new-output-folder rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from lib.core.errors import ConfigError, PipelineError
from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def common():
    return load_file(ROOT / "tools" / "_common.py", "tools_common")


def _raise(e: Exception):
    def body():
        raise e
    return body


def test_exit_code_is_the_body_s(common) -> None:
    assert common.run_tool(lambda: None) == 0
    assert common.run_tool(lambda: 1) == 1


def test_user_error_is_one_line_and_exit_2(common, capsys: pytest.CaptureFixture) -> None:
    assert common.run_tool(_raise(ConfigError("recipe x: bad value 3"))) == 2
    cap = capsys.readouterr()
    assert cap.err == "error: recipe x: bad value 3\n" and cap.out == ""


def test_only_the_named_errors_are_user_errors(common, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(KeyError):
        common.run_tool(_raise(KeyError("bug")))
    assert common.run_tool(_raise(OSError("cannot read a.csv")), errors=(PipelineError, OSError)) == 2
    assert capsys.readouterr().err == "error: cannot read a.csv\n"


def test_require_empty(common, tmp_path: Path) -> None:
    assert common.require_empty(tmp_path / "new") == tmp_path / "new"
    assert common.require_empty(tmp_path) == tmp_path
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError, match="exists and is not empty"):
        common.require_empty(tmp_path)
