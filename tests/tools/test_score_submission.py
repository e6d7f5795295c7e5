"""tools/score_submission.py --bootstrap / --against on tiny official-format files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["A", "B", "C"]


@pytest.fixture(scope="module")
def tool():
    return load_file(ROOT / "tools" / "score_submission.py", "score_submission")


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    ids = [f"IL_{i:07d}" for i in range(60)]
    lab = np.r_[0, 1, 2, rng.integers(0, 3, 57)]
    guess = np.where(rng.random(60) < 0.3, (lab + 1) % 3, lab)
    paths = []
    for name, m in (("truth", np.eye(3)[lab]), ("a", np.eye(3)[guess] * 0.8 + 0.05), ("b", np.eye(3)[lab] * 0.8 + 0.05)):
        p = tmp_path / f"{name}.csv"
        pd.DataFrame(m, columns=CLASSES).assign(lesion_id=ids)[["lesion_id", *CLASSES]].to_csv(p, index=False)
        paths.append(p)
    return paths[0], paths[1], paths[2]


def test_bootstrap_and_paired_difference_in_the_json(tool, tmp_path: Path) -> None:
    truth, a, b = _files(tmp_path)
    out = tmp_path / "s.json"
    assert tool.main(["--truth", str(truth), "--submission", str(b), "--bootstrap", "200",
                      "--against", str(a), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    bs = res["bootstrap"]
    assert bs["macro_dice"] == pytest.approx(res["ours"]["macro_dice"]) == 1.0
    assert bs["diff"] > 0 and bs["diff_ci_low"] > 0 and bs["n_boot"] == 200


def test_bad_bootstrap_requests_exit_2(tool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth, a, _ = _files(tmp_path)
    with pytest.raises(SystemExit) as e:
        tool.main(["--truth", str(truth), "--submission", str(a), "--against", str(a)])
    assert e.value.code == 2 and "--against needs --bootstrap" in capsys.readouterr().err
    binary = tmp_path / "bin.csv"
    pd.DataFrame({"isic_id": ["x", "y"], "target": [0.0, 1.0]}).to_csv(binary, index=False)
    assert tool.main(["--truth", str(binary), "--submission", str(binary), "--bootstrap", "10"]) == 2
    assert "multiclass" in capsys.readouterr().err


def test_bad_against_files_exit_2_naming_the_file(tool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth, a, b = _files(tmp_path)
    short = tmp_path / "short.csv"
    pd.read_csv(b).iloc[:-1].to_csv(short, index=False)
    for bad, words in ((short, f"--against {short}: prediction table: lesion_id mismatch"), (tmp_path, str(tmp_path))):
        assert tool.main(["--truth", str(truth), "--submission", str(a), "--bootstrap", "10", "--against", str(bad)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
