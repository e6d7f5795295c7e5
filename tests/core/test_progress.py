"""lib.core.progress: a log file gets plain lines (no carriage returns), a terminal gets tqdm."""
from __future__ import annotations

import logging

from lib.core import progress as P


def test_log_mode_writes_plain_lines(monkeypatch, caplog):
    monkeypatch.setenv("SKL_PROGRESS", "log")
    monkeypatch.setenv("SKL_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="progress"):
        with P.progress(4, "extract", unit="img") as bar:
            for _ in range(4):
                bar.update(1)
                bar.set_postfix(img_s="3.0")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4 and all("\r" not in s for s in lines)
    assert lines[0].startswith("extract: 1/4 img") and "eta" in lines[0]
    assert lines[-1].endswith("(done)") and "4/4" in lines[-1] and "img_s=3.0" in lines[-1]


def test_log_mode_rate_limited(monkeypatch, caplog):
    monkeypatch.setenv("SKL_PROGRESS", "log")
    monkeypatch.setenv("SKL_PROGRESS_EVERY", "3600")
    with caplog.at_level(logging.INFO, logger="progress"):
        bar = P.progress(1000, "train", unit="batch")
        for _ in range(1000):
            bar.update()
        bar.close()
    assert caplog.records == []  # nothing within the interval, and a short job adds no summary line


def test_modes(monkeypatch):
    monkeypatch.setenv("SKL_PROGRESS", "off")
    assert isinstance(P.progress(3, "x"), P.LogProgress) and not P.progress(3, "x").enabled
    monkeypatch.setenv("SKL_PROGRESS", "bar")
    bar = P.progress(3, "x")
    assert type(bar).__name__ == "tqdm"
    bar.close()
    monkeypatch.delenv("SKL_PROGRESS")
    assert P.progress_mode() in ("bar", "log")
    assert isinstance(P.progress(3, "x", disable=True), P.LogProgress)
