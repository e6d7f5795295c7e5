"""The battery's own checks can fail: a half-written final file is flagged, a one-ulp change in a table
is a difference (tolerance 0), volatile keys (timings) and the output root are not, and a file that
is missing or extra is reported."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from tests.faults.battery import corrupt_files, differences, kill_points, owner, snapshot, temp_files


def _tree(root, value=0.25, seconds=1.0):
    (root / "exp").mkdir(parents=True)
    pd.DataFrame({"lesion_id": ["a", "b"], "MEL": [value, 0.5]}).to_parquet(root / "exp/oof.parquet")
    (root / "exp/cv.json").write_text(json.dumps({"macro": 0.5, "seconds": seconds, "out": str(root / "x")}))
    return root


def test_half_written_files_and_temp_leftovers_are_found(tmp_path):
    root = _tree(tmp_path / "o")
    assert corrupt_files(root) == {}
    data = (root / "exp/oof.parquet").read_bytes()
    (root / "exp/oof.parquet").write_bytes(data[: len(data) // 2])
    (root / "exp/cv.json").write_text('{"macro": 0.')
    (root / "exp/.test.parquet.abc.tmp").write_bytes(b"partial")
    assert set(corrupt_files(root)) == {"exp/oof.parquet", "exp/cv.json"}
    assert [p.name for p in temp_files(root)] == [".test.parquet.abc.tmp"]


def test_tables_compare_with_tolerance_zero_but_not_timings_or_the_root(tmp_path):
    a = snapshot(_tree(tmp_path / "a"))
    assert differences(a, snapshot(_tree(tmp_path / "b", seconds=9.0))) == []
    assert differences(a, snapshot(_tree(tmp_path / "c", value=np.nextafter(0.25, 1)))) == ["exp/oof.parquet: differs"]
    d = _tree(tmp_path / "d")
    (d / "exp/cv.json").unlink()
    (d / "exp/extra.json").write_text("{}")
    assert differences(a, snapshot(d)) == ["exp/cv.json: missing", "exp/extra.json: extra"]


def test_kill_points_are_seeded_and_inside_the_run():
    pts = kill_points("02", 20.0, 3, seed=27)
    assert pts == kill_points("02", 20.0, 3, seed=27) != kill_points("02", 20.0, 3, seed=28)
    assert all(1.0 <= t <= 19.0 for t in pts) and pts == sorted(pts)


def test_every_output_has_an_owner_stage():
    assert [owner(p) for p in ("prep/m/folds.csv", "prep/m/features/x/train.parquet", "prep/m/trunks/x/a.npy",
                               "sample_fusion/fold0/oof.parquet", "sample_stack/features/lite0_train.parquet",
                               "sample_stack/oof.parquet", "sample_submit/submission.csv")] == \
        ["01", "03", "03", "02", "03", "04", "05"]
