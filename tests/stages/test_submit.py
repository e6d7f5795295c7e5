"""Stage 05 (lib.stages.submit) on fake members: test.parquet like every stage, the common cv.json,
its manifest, the stage-times table in report.md, and members refused when made on other folds or
before manifests existed."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core import artifacts as A
from lib.core.errors import MissingArtifactError
from lib.core.io import read_json
from lib.data.dataset import load_dataset
from lib.evaluation import decision as D
from lib.evaluation import metrics as M
from lib.stages import submit
from tests.stages.conftest import stage_cfg

COMMON = {"schema_version", "stage", "exp", "task", "n", "macro_dice_05", "macro_dice_tuned_cv", "thresholds",
          "per_fold"}


def md_head(out: Path) -> str:
    """The headline section of report.md."""
    return (out / A.REPORT).read_text().split("## Headline (OOF)", 1)[1].split("##", 1)[0]


def _submit_cfg(out: Path, exp: str, members: list[str], **kw: object) -> dict:
    return stage_cfg(out, exp, f"submit.members=[{', '.join(members)}]", **kw)


def test_submit_writes_test_parquet_cv_manifest_and_stage_times(preps: Path, make_member) -> None:
    base = stage_cfg(preps, "m")
    make_member(base, "m_a", seed=0)
    make_member(base, "m_b", seed=10)
    cfg = _submit_cfg(preps, "sub", ["m_a", "m_b"])
    submit.run(cfg)
    out = preps / "sub"
    _, _, test = load_dataset(cfg)
    te = pd.read_parquet(out / A.TEST)
    assert list(te["lesion_id"]) == list(test["lesion_id"])
    assert not (out / "test_blend.parquet").exists() and (out / A.SUBMISSION).exists()

    cv = read_json(out / A.CV)
    assert COMMON <= set(cv) and cv["stage"] == "submit" and cv["exp"] == "sub" and cv["task"] == "multiclass"
    assert cv["schema_version"] == A.CV_SCHEMA_VERSION and "macro_f1_argmax" in cv
    assert [m["exp"] for m in cv["submit"]["members"]] == ["m_a", "m_b"]
    assert cv["submit"]["decision"] in ("argmax", "thresholds")
    # issue 27.1 / 27.4: the expected score is the fully nested figure (rule re-chosen per fold), labelled
    # honest; the rule itself was chosen on all OOF rows (the deployment choice), and cv.json says so
    sub, h = cv["submit"], cv["submit"]["honest_cv"]
    assert sub["expected_score"] == h["macro_dice_nested"] and set(map(int, h["rules_per_fold"])) == {0, 1, 2, 3, 4}
    assert sub["decision_chosen_on"].startswith("all OOF rows") and "rules_per_fold" in sub["decision_chosen_on"]
    assert sub["expected_score_nesting"] == "weights nested, thresholds nested, decision nested: honest"
    assert h["nesting"]["macro_dice_tuned_cv_nested"].endswith("decision per rule (thresholds): not honest")
    assert cv["nesting"]["macro_dice_tuned_cv"].startswith("weights not nested")  # weights tuned on all folds
    assert not any(k.endswith("_old") for k in h)
    honest_rows = [r for r in md_head(out).splitlines() if r.endswith(": honest |")]
    assert [r.split(" | ")[0] for r in honest_rows] == ["| 05's expected score: the submission's rule, everything "
                                                        "fitted without the fold it scores", "|   its standard error "
                                                        "(class-stratified bootstrap of the OOF lesions)"]

    man = read_json(out / A.MANIFEST)
    assert man["stage"] == "submit" and man["exp"] == "sub" and man["folds_sha1"] == A.folds_sha1(cfg)
    assert man["wall_seconds"] > 0 and man["versions"]["python"]
    assert {(i["role"], i["exp"]) for i in man["inputs"]} == {("prep", "p42"), ("member", "m_a"), ("member", "m_b")}

    md = (out / A.REPORT).read_text()
    section = md.split("## Stage times", 1)[1].split("##", 1)[0]
    for row in ("| 01 prepare | p42 |", "| 02 train | m_a | 12.5 |", "| 02 train | m_b | 12.5 |", "| 05 submit | sub (until this report) |",
                "**total**"):
        assert row in section, (row, section)


def test_submit_refuses_a_member_made_on_other_folds(preps: Path, make_member) -> None:
    make_member(stage_cfg(preps, "x", folds_seed=7), "other_folds")
    make_member(stage_cfg(preps, "x"), "ok_member")
    cfg = _submit_cfg(preps, "sub_bad", ["ok_member", "other_folds"])
    theirs, ours = A.folds_sha1(stage_cfg(preps, "x", folds_seed=7)), A.folds_sha1(cfg)
    assert theirs != ours
    with pytest.raises(MissingArtifactError) as e:
        submit.run(cfg)
    msg = str(e.value)
    assert "'other_folds'" in msg and theirs[:8] in msg and ours[:8] in msg and "02_train_fold.py" in msg
    assert "\n" not in msg
    assert not (preps / "sub_bad" / A.SUBMISSION).exists()


def test_submit_refuses_a_member_without_manifest(preps: Path, make_member) -> None:
    folder = make_member(stage_cfg(preps, "x"), "old_member", manifest=False)
    with pytest.raises(MissingArtifactError, match="'old_member'.*no manifest.json.*rerun 02_train_fold.py"):
        submit.run(_submit_cfg(preps, "sub_old", ["old_member"]))
    shutil.rmtree(folder / A.fold_name(0))
    (folder / A.IMPORTANCE).write_bytes(b"")  # looks like a 04 experiment now
    with pytest.raises(MissingArtifactError, match="rerun 04_stack.py"):
        submit.run(_submit_cfg(preps, "sub_old", ["old_member"]))


def test_submit_output_is_itself_a_member(preps: Path, make_member) -> None:
    """05 writes oof.parquet + test.parquet + manifest like 02/04: a blend can be blended again."""
    make_member(stage_cfg(preps, "x"), "m_c", seed=3)
    submit.run(_submit_cfg(preps, "sub_c", ["m_c"]))
    cv = submit.run(_submit_cfg(preps, "sub_of_sub", ["sub_c"]))
    assert cv["stage"] == "submit"
    md = (preps / "sub_of_sub" / A.REPORT).read_text()
    assert "| 05 submit | sub_c |" in md and "| 02 train | m_c |" in md


def test_logit_adjust_enters_the_nested_estimate_with_priors_from_the_other_folds(preps: Path, make_member) -> None:
    """With `submit.logit_adjust_tau`, the nested estimate decides on the adjusted blend too, and the
    priors of fold k come from the other folds' labels only (issue 27.2): one member, so the nested
    argmax equals the argmax of the OOF adjusted fold by fold, not with the priors of all labels."""
    base = stage_cfg(preps, "m")
    make_member(base, "m_t", seed=3)
    cvs = {}
    for tau in (0.0, 2.0):
        cfg = stage_cfg(preps, f"sub_tau{tau}", "submit.members=[m_t]", f"submit.logit_adjust_tau={tau}")
        cvs[tau] = submit.run(cfg)
    _, train, _ = load_dataset(cfg)
    classes = list(pd.read_parquet(preps / "sub_tau0.0" / A.OOF).columns[1:])
    y = train[[f"y_{c}" for c in classes]].to_numpy(float)
    raw = pd.read_parquet(preps / "sub_tau0.0" / A.OOF).set_index("lesion_id").loc[train["lesion_id"], classes].to_numpy()
    folds = train["fold"].to_numpy()
    per_fold = np.zeros_like(raw)
    for k in np.unique(folds):
        m = folds == k
        assert not np.allclose(D.class_priors(y[~m]), D.class_priors(y))  # priors differ between folds
        per_fold[m] = D.logit_adjust(raw[m], D.class_priors(y[~m]), 2.0)
    everywhere = D.logit_adjust(raw, D.class_priors(y), 2.0)
    h0, h2 = cvs[0.0]["submit"]["honest_cv"], cvs[2.0]["submit"]["honest_cv"]
    assert h0["macro_f1_argmax_nested"] == pytest.approx(cvs[0.0]["macro_f1_argmax"])
    assert h2["macro_f1_argmax_nested"] == pytest.approx(M.macro_dice(y, D.argmax_decisions(per_fold)))
    assert M.macro_dice(y, D.argmax_decisions(per_fold)) != pytest.approx(M.macro_dice(y, D.argmax_decisions(everywhere)))
    assert cvs[2.0]["macro_f1_argmax"] == pytest.approx(M.macro_dice(y, D.argmax_decisions(everywhere)))  # deployment
    assert h2["priors_nested"] and "priors nested" in h2["nesting"]["macro_f1_argmax_nested"]
    assert "priors not nested" in cvs[2.0]["nesting"]["macro_f1_argmax"]
    for h in (h0, h2):  # the uncertainty of each nested estimate: same point value, a positive SE, an interval
        b = h["bootstrap"]
        for rule, point in (("argmax", h["macro_f1_argmax_nested"]), ("thresholds", h["macro_dice_tuned_cv_nested"]),
                            ("decision", h["macro_dice_nested"])):
            assert b[rule]["macro_dice"] == pytest.approx(point, abs=1e-4) and b[rule]["se"] > 0
            assert b[rule]["ci_low"] <= b[rule]["macro_dice"] <= b[rule]["ci_high"]
    md = (preps / "sub_tau2.0" / A.REPORT).read_text()
    assert f"{h2['bootstrap']['argmax']['se']:.4f}" in md and "blend weights and priors from the other folds" in md


def test_submit_writes_the_model_card(preps: Path, make_member) -> None:
    """05 writes model_card.json / .md (subgroups decoded from the sample's MILK10k metadata) and shows
    them in report.md with the subgroup plot; the card's per-class figures are the submitted decision's."""
    base = stage_cfg(preps, "m")
    make_member(base, "mc_a", seed=3)
    cfg = _submit_cfg(preps, "sub_card", ["mc_a"])
    cv = submit.run(cfg)
    out = preps / "sub_card"
    card = read_json(out / A.MODEL_CARD_JSON)
    assert set(card["subgroups"]["columns"]) == {"sex", "site", "skin_tone_class", "age_approx band"}
    assert card["data"]["n_lesions"] == 98 and card["cv"]["macro_dice_nested"] == cv["submit"]["honest_cv"][
        "macro_dice_nested"] and card["cv"]["decision"] == cv["submit"]["decision"]
    assert sum(e["n"] for e in card["subgroups"]["columns"]["sex"]) == 98
    info, train, _ = load_dataset(cfg)
    oof = pd.read_parquet(out / A.OOF).set_index("lesion_id").loc[train["lesion_id"], info["classes"]].to_numpy()
    thr = np.array([cv["thresholds"][c] for c in info["classes"]])
    dec = D.apply_rule(oof, cv["submit"]["decision"], thr)
    y = train[[f"y_{c}" for c in info["classes"]]].to_numpy()
    assert [e["dice"] for e in card["per_class"]] == [round(float(v), 4) for v in M.dice_per_class(y, dec)]
    md = (out / A.MODEL_CARD_MD).read_text()
    assert all(f"**{c}**" in md for c in card["subgroups"]["columns"]) and "## Limits" in md
    rep = (out / A.REPORT).read_text()
    assert "## Model card" in rep and f"]({A.REPORT_DIR}/{A.FIG_SUBGROUPS})" in rep
    assert (out / A.REPORT_DIR / A.FIG_SUBGROUPS).is_file()
