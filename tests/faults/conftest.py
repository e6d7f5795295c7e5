"""The battery's reference: one uninterrupted run of 01 -> 05 with tiny settings (shared by the
session), with each stage's work time (from its first log line to its end: the range the kill points
are drawn from). The run happens in
a workspace folder and is kept in a pristine copy: `workspace(stages)` refills the workspace with
the files those stages wrote, at the same absolute path (a fold's fingerprint includes the prep
folder's path, so finished folds count as finished only there)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.battery import copy_outputs, must_pass, run_stage, snapshot


@dataclass
class Reference:
    out: Path              # the workspace (where the reference ran)
    pristine: Path         # its untouched copy
    seconds: dict[str, float]
    snap: dict

    def workspace(self, stages: list[str]) -> Path:
        """The workspace holding only the files that `stages` wrote in the reference run."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return copy_outputs(self.pristine, self.out, stages)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("faults")
    out = root / "work"
    secs = {s: must_pass(run_stage(s, out), f"reference {s}").work_seconds for s in ("01", "02", "03", "04", "05")}
    shutil.copytree(out, root / "pristine", copy_function=shutil.copy2)
    return Reference(out, root / "pristine", secs, snapshot(out))
