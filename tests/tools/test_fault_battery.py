"""tools/fault_battery.py: the table of the battery's records (per stage: tried, survived, files lost)."""
from __future__ import annotations

from tests.helpers import ROOT, load_file

fb = load_file(ROOT / "tools" / "fault_battery.py", "fault_battery")


def test_table_counts_per_stage_and_in_total():
    rows = [{"stage": "01", "fault": "kill", "survived": True, "files_lost": 0, "note": ""},
            {"stage": "01", "fault": "disk full", "survived": False, "files_lost": 2, "note": ""},
            {"stage": "02", "fault": "corrupt: fold OOF", "survived": True, "files_lost": 0, "note": ""},
            {"stage": "02-05", "fault": "bad config value", "survived": True, "files_lost": 0, "note": ""},
            {"stage": "04", "fault": "bad input: no_such_exp", "survived": True, "files_lost": 0, "note": ""},
            {"stage": "02", "fault": "folds.csv changed under a finished stage", "survived": True, "files_lost": 0,
             "note": ""}]
    t = fb.table(rows).splitlines()
    assert t[2] == "| 01 | 2 | 1 | 2 | disk full 1, kill 1 |"
    assert t[3] == "| 02 | 2 | 2 | 0 | corrupt 2 |"
    assert t[4] == "| 02-05 | 1 | 1 | 0 | bad config value 1 |"
    assert t[5] == "| 04 | 1 | 1 | 0 | bad input 1 |"
    assert t[-1] == "| all | 6 | 5 | 2 | |"
    assert fb.details(rows[1:2]) == "FAIL    01 disk full: "
