"""Disk full and a read-only output folder, per stage: the output root is a small tmpfs (mounting
needs root; skipped with the reason otherwise) holding the earlier stages' reference outputs, filled
so that about half of what the stage writes fits. The stage stops with one line and exit 2 (no stack
trace), no final file is left half written and the earlier stages' files are untouched; once there is
space again the same command succeeds and its outputs equal the reference run's (tolerance 0).
Read-only (the tmpfs remounted ro): one line, exit 2, before any work; the next run on a writable
folder succeeds."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.battery import (
    copy_outputs,
    corrupt_files,
    differences,
    final_files,
    must_pass,
    of_stage,
    one_line_error,
    owner,
    record,
    run_stage,
    snapshot,
)

pytestmark = pytest.mark.e2e
ORDER = ["01", "02", "03", "04", "05"]


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def tmpfs(folder: Path, size_mb: int):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = _mount(["-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)])
    if p.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {p.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `folder`'s file system."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return filler


def stage_bytes(reference, stage: str) -> int:
    return sum(p.stat().st_size for p in final_files(reference.pristine)
               if owner(str(p.relative_to(reference.pristine))) == stage)


@pytest.mark.parametrize("stage", ORDER)
def test_disk_full_then_space_again(stage, reference, tmp_path):
    before = ORDER[:ORDER.index(stage)]
    with tmpfs(tmp_path / "mnt", 48) as out:
        copy_outputs(reference.pristine, out, before)
        earlier = snapshot(out)
        filler = fill(out, stage_bytes(reference, stage) // 2)
        r = run_stage(stage, out)
        bad = corrupt_files(out)
        changed = differences(earlier, {k: v for k, v in snapshot(out).items() if k in earlier or k == "filler.bin"},
                              ignore=("filler.bin",))
        filler.unlink()
        r2 = run_stage(stage, out)
        diff = differences(of_stage(reference.snap, [*before, stage]), snapshot(out, reference.out))
        ok = (r.rc == 2 and "Traceback" not in r.stderr and "No space left" in r.stderr and not bad and not changed
              and r2.rc == 0 and not diff)
        record(stage, "disk full", ok, len(bad) + len(changed) + len(diff),
               (r.stderr.strip().splitlines() or [""])[-1][:120])
        one_line_error(r, "No space left on device")
        assert not bad, f"half-written final files after the disk filled up: {bad}"
        assert not changed, f"earlier stages' files changed: {changed}"
        must_pass(r2, f"{stage} once there is space again")
        assert not diff, diff


@pytest.mark.parametrize("stage", ORDER)
def test_read_only_output_folder(stage, reference, tmp_path):
    before = ORDER[:ORDER.index(stage)]
    with tmpfs(tmp_path / "mnt", 48) as out:
        copy_outputs(reference.pristine, out, before)
        earlier = snapshot(out)
        p = _mount(["-o", "remount,ro", str(out)])
        assert p.returncode == 0, p.stderr
        r = run_stage(stage, out)
        p = _mount(["-o", "remount,rw", str(out)])
        assert p.returncode == 0, p.stderr
        same = not differences(earlier, snapshot(out))
        ok = r.rc == 2 and "Traceback" not in r.stderr and "not writable" in r.stderr and same
        r2 = run_stage(stage, out) if stage == "01" else None  # the next run on a writable folder (cheapest stage)
        record(stage, "read-only output folder", ok and (r2 is None or r2.rc == 0), 0,
               (r.stderr.strip().splitlines() or [""])[-1][:120])
        one_line_error(r, str(out), "not writable")
        assert same
        if r2 is not None:
            must_pass(r2, "01 on the folder made writable again")
