"""The battery's reference: one uninterrupted run of 01 -> 05 with tiny settings (shared by the
session), with each stage's wall time (the range the kill points are drawn from)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.battery import must_pass, run_stage, snapshot


@dataclass
class Reference:
    out: Path
    seconds: dict[str, float]
    snap: dict


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    secs = {s: must_pass(run_stage(s, out), f"reference {s}").seconds for s in ("01", "02", "03", "04", "05")}
    return Reference(out, secs, snapshot(out))
