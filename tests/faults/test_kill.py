"""Kill and rerun: each stage SIGKILLed at seeded points of its reference work time (counted from its
first log line, after the interpreter's start-up and the config load), one after the other
(each rerun starts from what the killed one left), then rerun to the end. After every kill no final
file is a partial one (every final parquet / csv / json / yaml / npy / jpg parses: writes are atomic);
the finished rerun's outputs equal the uninterrupted reference run's with tolerance 0 (the tiny
pipeline is deterministic on one machine: seeded training, seeded random-init encoders, fixed thread
counts; timings, versions and the output root are not compared; models, ONNX exports, the report and
its figures are compared by existence: the tables computed from them are compared).

The kill points are seeded, but where a point lands inside the stage depends on the machine's speed."""
from __future__ import annotations

import pytest

from tests.faults.battery import (
    corrupt_files,
    differences,
    kill_points,
    must_pass,
    of_stage,
    record,
    run_stage,
    snapshot,
    temp_files,
)

pytestmark = pytest.mark.e2e
ORDER = ["01", "02", "03", "04", "05"]
N_POINTS = 3


@pytest.mark.parametrize("stage", ORDER)
def test_killed_stage_reruns_to_the_uninterrupted_result(stage, reference, tmp_path):
    before = ORDER[:ORDER.index(stage)]
    out = reference.workspace(before)
    kills = []
    for t in kill_points(stage, reference.seconds[stage], N_POINTS, seed=27):
        r = run_stage(stage, out, kill_at=t)
        if not r.killed:  # finished before the point: a finished stage's rerun is the next "run"
            must_pass(r, f"{stage} run meant to be killed at {t:.1f}s")
        kills.append((t, r.killed, corrupt_files(out)))
    left = temp_files(out)  # hidden temp files of the killed writes: never read; reported, then removed
    for p in left:
        p.unlink()
    must_pass(run_stage(stage, out), f"{stage} rerun after the kills")
    new_left = temp_files(out)  # an uninterrupted run (here over the killed runs' outputs) leaves none
    diff = differences(of_stage(reference.snap, [*before, stage]), snapshot(out))
    for t, killed, bad in kills:
        record(stage, "kill", not bad and not diff and not new_left, len(bad) + len(diff),
               f"SIGKILL {t:.1f}s into the work{'' if killed else ' (finished first)'}; {len(left)} temp files left; "
               + "; ".join([*bad, *diff][:3]))
    for t, _, bad in kills:
        assert not bad, f"after the kill at {t:.1f}s, half-written final files: {bad}"
    assert not new_left, f"the uninterrupted rerun left temp files: {sorted(map(str, new_left))}"
    assert not diff, f"rerun after kills at {[round(k[0], 1) for k in kills]} differs from the reference: {diff}"
