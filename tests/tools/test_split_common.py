"""tools/split_common.py and the split tools: one argument parser for the three, the seeded choice of
test / train lesions, and make_test_split.py run on the shipped sample (a new folder is required)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "input" / "milk10k_sample"
TOOLS = ("make_test_split", "make_ham_split", "make_isic2019_split")


@pytest.fixture(scope="module")
def sc():
    return load_file(ROOT / "tools" / "split_common.py", "split_common")


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_the_split_tools_share_the_parser(sc) -> None:
    shared = _options(sc.split_parser("d", "src"))
    assert shared == {"-h", "--help", "--src", "--out", "--test-frac", "--seed", "--link"}
    full = _options(sc.split_parser("d", "src", "CLASS", 85))
    assert full - shared == {"--train-per-class", "--test-per-class", "--resize"}
    for name in TOOLS:
        text = (ROOT / "tools" / f"{name}.py").read_text()
        assert "split_parser(" in text and "ArgumentParser(" not in text, name


def _lesions() -> pd.DataFrame:
    return pd.DataFrame({"lesion_id": [f"L{i:02d}" for i in range(30)], "dx": ["a"] * 20 + ["b"] * 10})


def test_choose_lesions_by_counts_and_by_fraction(sc) -> None:
    p = sc.split_parser("d", "src", "CLASS", 85)
    a = p.parse_args(["--src", "s", "--out", "o", "--test-per-class", "a=3,b=2", "--train-per-class", "a=4"])
    train, test = sc.choose_lesions(_lesions(), a)
    les = _lesions().set_index("lesion_id")["dx"]
    assert sorted(les[test]) == ["a"] * 3 + ["b"] * 2 and list(les[train]) == ["a"] * 4
    assert not set(train) & set(test)
    assert (train, test) == sc.choose_lesions(_lesions(), a)  # seeded
    a = p.parse_args(["--src", "s", "--out", "o", "--test-frac", "0.2"])
    train, test = sc.choose_lesions(_lesions(), a)
    assert len(test) == 6 and sorted(train + test) == sorted(_lesions()["lesion_id"])
    assert np.mean(les[test] == "a") == pytest.approx(2 / 3)  # stratified


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_test_split.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_make_test_split_on_the_sample_then_refuses_a_used_folder(tmp_path: Path) -> None:
    out = tmp_path / "split"
    p = _run("--src", str(SAMPLE), "--out", str(out), "--test-per-class", "BCC=2,NV=1", "--link")
    assert p.returncode == 0, p.stderr
    truth = pd.read_csv(out / "held_out" / "MILK10k_Test_GroundTruth.csv")
    assert len(truth) == 3 and truth["BCC"].sum() == 2
    test_meta = pd.read_csv(out / "MILK10k_Test_Metadata.csv")
    assert set(test_meta["lesion_id"]) == set(truth["lesion_id"])
    assert len(pd.read_csv(out / "MILK10k_Training_GroundTruth.csv")) == 98 - 3
    p = _run("--src", str(SAMPLE), "--out", str(out), "--test-frac", "0.2")
    assert p.returncode == 2 and p.stderr.strip() == f"error: {out} exists and is not empty; choose a new folder"
