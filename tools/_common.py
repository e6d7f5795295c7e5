"""What the command-line tools under tools/ share: one exit path for bad input, the one-line log format,
the "output folder must be new" rule. Standard library + lib.core.errors only (kaggle_install.py runs
it before any wheel is installed).

A tool puts the repository on sys.path itself (it runs as `python tools/<tool>.py`, also from a
read-only copy of the code on Kaggle, where nothing is installed), then:

    from tools._common import run_tool
    def main(argv=None) -> int:
        a = parser().parse_args(argv)
        return run_tool(lambda: work(a))    # PipelineError -> "error: <one line>" on stderr, exit 2
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from lib.core.errors import PipelineError

USER_ERRORS = (PipelineError,)


def run_tool(body: Callable[[], int | None], errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """The tool's exit code: `body()`'s (0 when it returns None); an error of `errors` (bad user input)
    is printed as one line `error: ...` on stderr, no stack trace, and gives 2."""
    try:
        code = body()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


def setup_logging(fmt: str = "%(levelname)s %(message)s") -> None:
    logging.basicConfig(level=logging.INFO, format=fmt)


def require_empty(out: Path) -> Path:
    """`out` when it does not exist or is empty; PipelineError otherwise (a tool never mixes two outputs)."""
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} exists and is not empty; choose a new folder")
    return out
