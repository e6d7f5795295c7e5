"""tools/make_timing_release.py: a full-size timing release (training as is, a split's test lesions renamed)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "input" / "milk10k_sample"


def test_timing_release_renames_the_test_lesions_and_links_every_image(tmp_path: Path, capsys) -> None:
    tool = load_file(ROOT / "tools" / "make_timing_release.py")
    out = tmp_path / "timing"
    assert tool.main(["--src", str(SAMPLE), "--split", str(SAMPLE), "--out", str(out)]) == 0
    old = pd.read_csv(SAMPLE / "MILK10k_Test_Metadata.csv")
    new = pd.read_csv(out / "MILK10k_Test_Metadata.csv")
    assert len(new) == len(old) and new["lesion_id"].str.startswith("IL_T").all()
    assert new["isic_id"].str.startswith("ISIC_T").all()
    assert not set(new["lesion_id"]) & set(pd.read_csv(SAMPLE / "MILK10k_Training_GroundTruth.csv")["lesion_id"])
    for (lesion, isic), (nl, ni) in zip(old[["lesion_id", "isic_id"]].itertuples(index=False),
                                        new[["lesion_id", "isic_id"]].itertuples(index=False)):
        link = out / "MILK10k_Test_Input" / nl / f"{ni}.jpg"
        assert link.read_bytes() == (SAMPLE / "MILK10k_Test_Input" / lesion / f"{isic}.jpg").read_bytes()
    assert (out / "MILK10k_Training_Input").resolve() == (SAMPLE / "MILK10k_Training_Input").resolve()
    # bad input: one line, exit 2
    assert tool.main(["--src", str(SAMPLE), "--split", str(SAMPLE), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert tool.main(["--src", str(SAMPLE), "--split", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "MILK10k_Test_Metadata.csv" in capsys.readouterr().err and not (tmp_path / "o2").exists()
