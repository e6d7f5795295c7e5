"""Determinism (issue 27 item 10): the sample recipe run twice from scratch on the same machine, into two
output folders, gives the same submission.csv byte for byte; every stage's manifest records what
decides bit-for-bit results besides the config and the data (device, threads, torch's CPU capability,
CPU model, library versions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_test_release import run_recipe

pytestmark = pytest.mark.e2e

MANIFESTS = ("prep/milk10k_sample", "sample_fusion", "sample_stack/features", "sample_stack", "sample_submit")


def test_two_runs_from_scratch_give_the_same_submission_byte_for_byte(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_recipe(a)
    run_recipe(b)
    assert (a / "sample_submit/submission.csv").read_bytes() == (b / "sample_submit/submission.csv").read_bytes()
    for folder in MANIFESTS:
        ma, mb = (json.loads((r / folder / "manifest.json").read_text()) for r in (a, b))
        assert ma["determinism"] == mb["determinism"] and ma["versions"] == mb["versions"], folder
        assert {"device", "threads", "cpu_capability", "cores", "cpu"} <= set(ma["determinism"]), folder
        assert {"python", "lib", "numpy", "pandas"} <= set(ma["versions"]), folder
    for folder in ("sample_fusion", "sample_stack/features"):   # 02 and 03 run torch: its threads and capability
        d = json.loads((a / folder / "manifest.json").read_text())["determinism"]
        assert d["threads"] >= 1 and d["cpu_capability"] and d["device"] == "cpu", folder
    assert {"torch", "timm", "xgboost", "lightgbm", "onnxruntime"} <= set(
        json.loads((a / "sample_stack/manifest.json").read_text())["versions"])
