"""Messages that say the real cause: a MILK10k ground-truth file without one of its class columns names
the missing column (it used to report the first lesion of that class as "line N has no label")."""
from __future__ import annotations

import re

import pytest

from lib.core.errors import PipelineError
from lib.data import formats
from tests.faults.battery import record
from tests.helpers import MILK_CLASSES, TRAIN_GT, copy_sample, milk_cfg, read_raw, write_raw


@pytest.mark.parametrize("drop", [["DF"], ["BKL", "VASC"]])
def test_ground_truth_without_a_class_column_names_it(tmp_path, drop):
    root = copy_sample(tmp_path / "data", held_out=False)
    gt = read_raw(root / TRAIN_GT)
    assert gt[drop].astype(float).to_numpy().sum() > 0  # lesions of these classes exist: rows lose their label
    write_raw(gt.drop(columns=drop), root / TRAIN_GT)
    with pytest.raises(PipelineError) as e:
        formats.read_split(milk_cfg(root, tmp_path / "out"), "train")
    msg = str(e.value)
    ok = f"lacks class column{'s' if len(drop) > 1 else ''} {drop}" in msg and "no label" not in msg
    record("01", "ground truth lacks a class column", ok and "\n" not in msg, 0, msg[:120])
    assert "\n" not in msg and TRAIN_GT in msg
    assert re.search(rf"lacks class columns? {re.escape(str(drop))}", msg), msg
    assert "no label" not in msg
    assert all(c in MILK_CLASSES for c in drop)
