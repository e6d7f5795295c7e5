"""lib.evaluation.submission: official-format layout, every validation rule, nothing written on error,
values just above 0.5 survive the CSV round trip."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import PipelineError
from lib.evaluation import submission as S

CLASSES = ["AKIEC", "BCC", "MEL"]
IDS = ["IL_001", "IL_002", "IL_003"]


def sub(**cols) -> pd.DataFrame:
    df = pd.DataFrame({"lesion_id": IDS, "AKIEC": [0.1, 0.2, 0.3], "BCC": [0.5, 0.6, 0.7], "MEL": [0.0, 1.0, 0.4]})
    for k, v in cols.items():
        df[k] = v
    return df


def test_valid_submission_passes():
    S.validate_submission(sub(), IDS, CLASSES, "lesion_id")
    S.validate_submission(sub().iloc[::-1], IDS, CLASSES, "lesion_id")   # order is free


@pytest.mark.parametrize("make, pattern", [
    (lambda: sub().drop(columns="MEL"), r"missing \['MEL'\]"),
    (lambda: sub(EXTRA=0.1), r"extra \['EXTRA'\]"),
    (lambda: sub()[["lesion_id", "BCC", "AKIEC", "MEL"]], r"columns must be \[lesion_id, AKIEC, BCC, MEL\]"),
    (lambda: sub().rename(columns={"lesion_id": "image"}), r"columns must be \[lesion_id"),
    (lambda: sub(lesion_id=["IL_001", "IL_001", "IL_003"]), r"duplicate ids \['IL_001'\]"),
    (lambda: sub().iloc[:2], r"missing \['IL_003'\]"),
    (lambda: sub(lesion_id=["IL_001", "IL_002", "IL_999"]), r"missing \['IL_003'\], extra \['IL_999'\]"),
    (lambda: sub(BCC=[0.5, np.nan, 0.7]), r"NaN for ids \['IL_002'\]"),
    (lambda: sub(MEL=[0.0, 1.0000001, 0.4]), r"outside \[0, 1\] for ids \['IL_002'\]"),
    (lambda: sub(AKIEC=[-1e-9, 0.2, 0.3]), r"outside \[0, 1\] for ids \['IL_001'\]"),
    (lambda: sub(AKIEC=["0.1", "0.2", "x"]), r"must be floats"),
    (lambda: sub(AKIEC=[np.inf, 0.2, 0.3]), r"outside \[0, 1\]"),
])
def test_validation_rules(make, pattern):
    with pytest.raises(PipelineError, match=pattern):
        S.validate_submission(make(), IDS, CLASSES, "lesion_id")


def test_write_submission_writes_nothing_on_error(tmp_path):
    path = tmp_path / "out" / "submission.csv"
    with pytest.raises(PipelineError):
        S.write_submission(sub(BCC=[0.5, np.nan, 0.7]), IDS, path)
    with pytest.raises(PipelineError):
        S.write_submission(sub(), IDS[:2], path)
    assert not path.exists()
    assert not path.parent.exists() or not list(path.parent.iterdir())


def test_write_submission_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "submission.csv"
    S.write_submission(sub(), IDS, path)
    before = path.read_text()
    with pytest.raises(PipelineError):
        S.write_submission(sub(MEL=[0.0, 2.0, 0.4]), IDS, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_values_just_above_half_survive_round_trip(tmp_path):
    above = np.nextafter(0.5, 1)
    below = np.nextafter(0.5, 0)
    df = sub(BCC=[above, below, 0.5], AKIEC=[1e-300, np.nextafter(1.0, 0), 0.3])
    path = S.write_submission(df, IDS, tmp_path / "s.csv")
    back = pd.read_csv(path, dtype={"lesion_id": str})
    assert back["lesion_id"].tolist() == IDS
    assert back["BCC"].iloc[0] > 0.5
    assert back["BCC"].iloc[1] < 0.5
    assert back["BCC"].iloc[2] == 0.5
    np.testing.assert_array_equal(back[CLASSES].to_numpy(), df[CLASSES].to_numpy())   # bit-exact
    first = path.read_text().splitlines()
    assert first[0] == "lesion_id,AKIEC,BCC,MEL"


def test_build_submission_layouts():
    probs = pd.DataFrame({"lesion_id": ["a", "b"], "BCC": [0.1, 0.2], "AKIEC": [0.9, 0.8], "junk": [1, 2]})
    out = S.build_submission(probs, ["AKIEC", "BCC"], "milk10k", "multiclass")
    assert list(out.columns) == ["lesion_id", "AKIEC", "BCC"]
    assert out["AKIEC"].tolist() == [0.9, 0.8] and out["AKIEC"].dtype == np.float64
    ham = S.build_submission(probs, ["AKIEC", "BCC"], "ham10000", "multiclass")
    assert list(ham.columns) == ["image", "AKIEC", "BCC"]
    bin_ = pd.DataFrame({"lesion_id": ["ISIC_1", "ISIC_2"], "malignant": [0.01, 0.9]})
    b = S.build_submission(bin_, ["malignant"], "isic2024", "binary")
    assert list(b.columns) == ["isic_id", "target"] and b["target"].tolist() == [0.01, 0.9]
    S.validate_submission(b, ["ISIC_2", "ISIC_1"], ["target"], "isic_id")
    assert S.id_column("unknown_fmt") == "lesion_id"
