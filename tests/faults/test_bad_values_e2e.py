"""Bad values for 02-05 through the scripts themselves: a bad config value, a member experiment that
does not exist or was made on other folds, a features block never extracted. Each is one `error:`
line naming the key / experiment / block / folds.csv, exit 2, no stack trace, and nothing written
(the check runs before any compute)."""
from __future__ import annotations

import pytest

from tests.faults.battery import TINY_ENC, differences, one_line_error, record, run_stage, snapshot

pytestmark = pytest.mark.e2e
ALL = ["01", "02", "03", "04", "05"]

CASES = [  # (stage, extra args, what the line must name)
    ("02", ["train.epochs=0"], "train.epochs"),
    ("02", ["train.model.kind=triple"], "train.model.kind"),
    ("03", ["features.batch_size=0"], "features.batch_size"),
    ("03", ["features.encoders=[{name: a, arch: test_efficientnet, finetune: true}]"], "features.encoders[0].finetune"),
    ("04", ["stack.pca_components=0"], "stack.pca_components"),
    ("04", ["stack.xgb.subsample=1.5"], "stack.xgb.subsample"),
    ("05", ["submit.decision=maybe"], "submit.decision"),
    ("05", ["submit.members=[{exp: sample_stack, weight: -1}]"], "submit.members[0].weight"),
    ("04", ["stack.oof_exps=[no_such_exp]"], "no_such_exp"),
    ("05", ["submit.members=[sample_stack, no_such_exp]"], "no_such_exp"),
    ("04", ["stack.features=[lite0, never_extracted]"], "never_extracted"),
    ("04", ["stack.features_exp=no_such_exp"], "no_such_exp"),
    ("03", ["features.from_exps=[no_such_exp]"], "no_such_exp"),
]


@pytest.mark.parametrize("stage, extra, name", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_bad_input_is_one_line_before_any_compute(stage, extra, name, reference):
    out = reference.workspace(ALL[:ALL.index(stage)] + (["02", "03"] if stage == "04" else []))
    before = snapshot(out)
    args = [TINY_ENC, *extra] if stage == "04" and not any(e.startswith("stack.features=") for e in extra) else extra
    r = run_stage(stage, out, *args)
    changed = differences(before, snapshot(out))
    record(stage, f"bad input: {name}", r.rc == 2 and name in r.stderr and "Traceback" not in r.stderr
           and not changed, len(changed), (r.stderr.strip().splitlines() or [""])[-1][:120])
    one_line_error(r, name)
    assert not changed, f"a refused run wrote or changed files: {changed}"


@pytest.mark.parametrize("stage", ["04", "05"])
def test_members_made_on_other_folds_are_refused(stage, reference):
    """The members and features of the reference run, read through a prep with other folds (folds.seed 7)."""
    out = reference.workspace(ALL)
    other = [f"paths.prep={out / 'prep7'}", "folds.seed=7"]
    r1 = run_stage("01", out, *other)
    assert r1.rc == 0, r1.stderr[-2000:]
    before = snapshot(out)
    r = run_stage(stage, out, *other, *([TINY_ENC] if stage == "04" else []))
    changed = differences(before, snapshot(out))
    record(stage, "bad input: member made on other folds", r.rc == 2 and "folds.csv" in r.stderr and not changed,
           len(changed), (r.stderr.strip().splitlines() or [""])[-1][:120])
    one_line_error(r, "made on another folds.csv")
    assert not changed
