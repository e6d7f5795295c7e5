"""Progress reporting that stays readable in a log file.

`progress(total, desc, unit)` returns a tqdm bar when stderr is a terminal. When it is not (nohup,
`> log.txt`, CI, a Kaggle kernel's log) it returns `LogProgress`: one plain line every `every`
seconds (default 30) and one at the end, with done/total, rate and ETA, and no carriage-return
frames. `SKL_PROGRESS=bar|log|off` forces a mode; `SKL_PROGRESS_EVERY=<seconds>` sets the interval.
Both objects offer the same small interface: `update(n)`, `set_postfix(**kw)`, `close()`, and
use as a context manager.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("progress")


class LogProgress:
    """A tqdm stand-in that logs a line every `every` seconds instead of redrawing a bar."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, float(every)
        self.enabled = enabled
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def line(self, now: float | None = None) -> str:
        dt = max((now or time.time()) - self.t0, 1e-9)
        rate = self.n / dt
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", eta {(self.total - self.n) / rate:.0f}s"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} in {dt:.0f}s ({rate:.2f} {self.unit}/s{eta}{extra})"

    def close(self) -> None:
        if self.enabled and self.n and time.time() - self.t0 >= self.every:
            log.info("%s (done)", self.line())
        self.enabled = False

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self):  # pragma: no cover - not used as an iterator wrapper
        raise TypeError("LogProgress wraps counts, not iterables")


def progress_mode() -> str:
    """'bar' on a terminal, 'log' otherwise; `SKL_PROGRESS` overrides (bar | log | off)."""
    mode = os.environ.get("SKL_PROGRESS", "").strip().lower()
    if mode in ("bar", "log", "off"):
        return mode
    return "bar" if sys.stderr.isatty() else "log"


def progress(total: int | None, desc: str, unit: str = "it", disable: bool = False,
             leave: bool = False, mininterval: float = 2.0) -> Any:
    """A progress reporter for `total` units of work (see the module docstring)."""
    mode = "off" if disable else progress_mode()
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, mininterval=mininterval)
    every = float(os.environ.get("SKL_PROGRESS_EVERY", "30"))
    return LogProgress(total, desc, unit, every, enabled=mode == "log")
