"""lib.evaluation.model_card: subgroups decoded from the encoded metadata stage 01 writes, per-subgroup
figures against hand computations, bootstrap intervals, the binary path, markdown, JSON and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.io import write_json, write_text
from lib.data.formats.encoding import apply_meta_encoders, fit_meta_encoders
from lib.evaluation import metrics as M
from lib.evaluation import model_card as MC
from lib.evaluation import report as R

CLASSES = ["BCC", "MEL", "NV"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _encoded(raw: pd.DataFrame, num: list[str], cat: list[str]) -> tuple[pd.DataFrame, dict]:
    """The train table stage 01 writes: lesion_id + meta_* columns, encoders fitted on it."""
    enc = json.loads(json.dumps(fit_meta_encoders(raw, num, cat)))  # as read back from meta_encoders.json
    return pd.concat([raw[["lesion_id"]], apply_meta_encoders(raw, enc, "train")], axis=1), enc


def _raw_milk() -> pd.DataFrame:
    return pd.DataFrame({
        "lesion_id": [f"L{i}" for i in range(8)],
        "age_approx": [25, 30, 44, 45, 60, 75, np.nan, 90],
        "sex": ["male", "female", None, "female", "male", "male", "female", "unknown"],
        "site": ["head_neck_face", "upper extremity", "trunk", "trunk", None, "trunk", "trunk", "head_neck_face"],
        "skin_tone_class": ["1", "2", "3", "3", "2", "1", None, "5"],
    })


def test_subgroups_decoded_from_the_encoded_table() -> None:
    raw = _raw_milk()
    train, enc = _encoded(raw, ["age_approx"], ["sex", "site", "skin_tone_class"])
    assert not {"sex", "site", "age_approx"} & set(train.columns)   # only the encoded columns are there
    sg = MC.subgroups(train, enc)
    assert set(sg) == {"sex", "site", "skin_tone_class", "age_approx band"}
    assert list(sg["sex"]) == ["male", "female", "unknown", "female", "male", "male", "female", "unknown"]
    assert list(sg["site"]) == ["head_neck_face", "upper extremity", "trunk", "trunk", "unknown", "trunk", "trunk",
                                "head_neck_face"]   # a level with a space decodes too
    assert list(sg["skin_tone_class"]) == ["1", "2", "3", "3", "2", "1", "unknown", "5"]
    assert list(sg["age_approx band"]) == ["<30", "30-44", "30-44", "45-59", "60-74", ">=75", "unknown", ">=75"]
    assert list(sg["sex"].index) == list(raw["lesion_id"])
    assert list(sg["age_approx band"].cat.categories) == [*MC.AGE_BANDS, "unknown"]


def test_subgroups_other_formats_and_no_metadata() -> None:
    raw = pd.DataFrame({"lesion_id": ["a", "b", "c"], "age": [50, 20, np.nan], "sex": ["male", "female", "male"],
                        "localization": ["back", "face", "back"], "n_images": [1, 2, 3],
                        "clin_size_long_diam_mm": [3.0, 4.0, 5.0]})
    train, enc = _encoded(raw, ["age", "n_images", "clin_size_long_diam_mm"], ["sex", "localization"])
    sg = MC.subgroups(train, enc)
    assert set(sg) == {"sex", "localization", "age band"}   # other numbers (n_images: no 'age' word) are not
    assert list(sg["age band"]) == ["45-59", "<30", "unknown"]
    bare = pd.DataFrame({"lesion_id": ["a", "b"], "y_BCC": [1.0, 0.0]})
    assert MC.subgroups(bare, {}) == {} and MC.subgroups(bare, {"num": {}, "cat": {}}) == {}
    assert MC.subgroups(bare, {"cat": {"sex": ["male"]}, "num": {"age": {"mean": 1, "std": 1}}}) == {}


def _case(n: int, seed: int = 0, err: float = 0.25) -> tuple[pd.DataFrame, dict, np.ndarray, np.ndarray]:
    """A multiclass train table with sex metadata, OOF probabilities and decisions that are right
    with probability 1 - err."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(CLASSES), n)
    pred = np.where(rng.random(n) < err, rng.integers(0, len(CLASSES), n), lab)
    probs = M.to_onehot(pred, len(CLASSES)) * 0.7 + 0.1
    raw = pd.DataFrame({"lesion_id": [f"L{i:04d}" for i in range(n)], "sex": rng.choice(["female", "male"], n),
                        "age_approx": rng.choice([20, 35, 50, 65, 80], n).astype(float)})
    train, enc = _encoded(raw, ["age_approx"], ["sex"])
    Y = M.to_onehot(lab, len(CLASSES))
    train = train.assign(fold=np.arange(n) % 5, **{f"y_{c}": Y[:, i] for i, c in enumerate(CLASSES)})
    return train, enc, probs, M.to_onehot(pred, len(CLASSES))


def test_subgroup_figure_equals_a_hand_computation() -> None:
    # 12 female lesions: BCC 6 (row 3 called MEL), MEL 6 (row 10 called NV), NV absent but predicted once
    y = M.to_onehot(np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]), 3)
    dec = M.to_onehot(np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 2, 1]), 3)
    raw = pd.DataFrame({"lesion_id": [f"F{i}" for i in range(12)] + ["M0", "M1"], "sex": ["female"] * 12 + ["male"] * 2})
    train, enc = _encoded(raw, [], ["sex"])
    Y = np.vstack([y, M.to_onehot(np.array([2, 2]), 3)])
    D = np.vstack([dec, M.to_onehot(np.array([2, 2]), 3)])
    train = train.assign(fold=0, **{f"y_{c}": Y[:, i] for i, c in enumerate(CLASSES)})
    card = MC.build_model_card(train, D, D, CLASSES, "multiclass", {}, {"format": "milk10k"}, enc, min_n=10)
    female, male = card["subgroups"]["columns"]["sex"]
    # BCC: TP 5, FP 0, FN 1 (row 3) -> 10/11; MEL: TP 5, FP 1 (row 3), FN 1 (row 10) -> 10/12;
    # NV has no true row among them: not averaged (the official rule would score it 0, predicted once)
    assert female["level"] == "female" and female["n"] == 12
    assert female["value"] == pytest.approx(round((10 / 11 + 10 / 12) / 2, 4))
    assert female["ci_low"] <= female["value"] <= female["ci_high"]
    assert male == {"level": "male", "n": 2, "n_positive": [0, 0, 2], "note": "n < 10: not measured"}
    per_class = {e["class"]: e for e in card["per_class"]}
    assert per_class["NV"]["support"] == 2 and per_class["NV"]["n_predicted"] == 3
    assert per_class["NV"]["dice"] == pytest.approx(round(2 * 2 / (2 + 3), 4))


def test_intervals_contain_the_point_and_shrink_with_n() -> None:
    widths = []
    for n in (60, 1200):
        train, enc, probs, dec = _case(n, seed=1)
        card = MC.build_model_card(train, probs, dec, CLASSES, "multiclass", {}, {}, enc, seed=3)
        levels = [e for col in card["subgroups"]["columns"].values() for e in col if "value" in e]
        assert levels and all(e["ci_low"] <= e["value"] <= e["ci_high"] for e in levels)
        widths.append(np.mean([e["ci_high"] - e["ci_low"] for e in levels]))
    assert widths[1] < widths[0] / 2, widths   # ~ 1 / sqrt(n): 20x the rows, a few times narrower
    again = MC.build_model_card(train, probs, dec, CLASSES, "multiclass", {}, {}, enc, seed=3)
    assert again == card                          # seeded


def test_binary_path_auc_and_patient_draws() -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.2).astype(float)
    score = np.clip(0.5 * y + rng.normal(0.3, 0.2, n), 0, 1)
    raw = pd.DataFrame({"lesion_id": [f"I{i}" for i in range(n)], "sex": np.where(np.arange(n) < 250, "male", "female"),
                        "age_approx": 50.0})
    train, enc = _encoded(raw, ["age_approx"], ["sex"])
    y[250:] = 0.0   # no positive among the female rows
    train = train.assign(fold=np.arange(n) % 5, y_malignant=y, group=[f"P{i // 3}" for i in range(n)])
    card = MC.build_model_card(train, score, (score > 0.5).astype(float), ["malignant"], "binary", {}, {}, enc)
    female, male = card["subgroups"]["columns"]["sex"]   # the encoder's level order
    assert (female["level"], female["n"], male["level"], male["n"]) == ("female", 50, "male", 250)
    assert male["value"] == pytest.approx(round(M.macro_auc(y[:250, None], score[:250, None]), 4))
    assert male["ci_low"] <= male["value"] <= male["ci_high"] and male["n_positive"] == [int(y[:250].sum())]
    assert female["value"] is None and female["note"] == "one label only"
    assert "patients" in card["subgroups"]["draws"] and card["data"]["n_patients_or_groups"] == 100
    assert [e["level"] for e in card["subgroups"]["columns"]["age_approx band"]] == ["45-59"]
    assert "AUC" in card["subgroups"]["metric"]


def _cv_doc() -> dict:
    return {"stage": "submit", "macro_dice_tuned_cv": 0.61, "macro_f1_argmax": 0.6,
            "nesting": {"macro_f1_argmax": "weights fixed, thresholds none, decision per rule (argmax): not honest"},
            "submit": {"decision": "argmax", "decision_chosen_on": "all OOF rows", "expected_score": 0.58,
                       "expected_score_nesting": "weights nested, thresholds nested, decision nested: honest",
                       "honest_cv": {"macro_dice_nested": 0.58, "macro_f1_argmax_nested": 0.59,
                                     "rules_per_fold": ["argmax"] * 5,
                                     "nesting": {"macro_dice_nested": "weights nested, decision nested: honest"},
                                     "bootstrap": {"n_boot": 1000, "draws": "class-stratified",
                                                   "decision": {"macro_dice": 0.58, "se": 0.02, "ci_low": 0.54,
                                                                "ci_high": 0.62}}}}}


def test_markdown_json_report_and_plot(tmp_path: Path) -> None:
    train, enc, probs, dec = _case(200)
    info = {"format": "milk10k", "modalities": ["clinical", "dermoscopic"], "n_test": 0}
    card = MC.build_model_card(train, probs, dec, CLASSES, "multiclass", _cv_doc(), info, enc)
    assert json.loads(json.dumps(card, allow_nan=False)) == card   # plain JSON, no NaN, no numpy
    assert card["data"]["n_per_class"] == {c: int(train[f"y_{c}"].sum()) for c in CLASSES}
    assert card["cv"]["macro_dice_nested"] == 0.58 and card["cv"]["bootstrap"]["decision"]["ci_low"] == 0.54
    assert card["subgroups"]["absent"] == ["anatomic site", "skin tone"]
    md = MC.card_markdown(card)
    for col in card["subgroups"]["columns"]:
        assert f"**{col}**" in md
    for part in ("## Intended use", "## Limits", "0.540 - 0.620", "skin tone", "macro_dice_nested", "<30, 30-44"):
        assert part in md, part
    write_json(card, tmp_path / "model_card.json")
    write_text(md, tmp_path / "model_card.md")
    oof = pd.DataFrame({"lesion_id": train["lesion_id"], **{c: probs[:, i] for i, c in enumerate(CLASSES)}})
    cvs = R.cv_summary(train, oof, CLASSES)
    R.write_report(tmp_path, train, oof, CLASSES, cvs, cvs["thresholds"], "argmax", [], None, "t", card=card)
    rep = (tmp_path / "report.md").read_text()
    assert "## Model card" in rep and "**sex**" in rep and "](report/subgroups.png)" in rep
    assert (tmp_path / "report" / "subgroups.png").read_bytes()[:8] == PNG_MAGIC
    R.write_report(tmp_path, train, oof, CLASSES, cvs, cvs["thresholds"], "argmax", [], None, "t")
    assert not (tmp_path / "report" / "subgroups.png").exists()      # no card: no plot left behind
    assert "## Model card" not in (tmp_path / "report.md").read_text()


def test_card_without_metadata_has_no_subgroups() -> None:
    train, _, probs, dec = _case(50)
    bare = train[["lesion_id", "fold", *[f"y_{c}" for c in CLASSES]]]
    card = MC.build_model_card(bare, probs, dec, CLASSES, "multiclass", {}, {}, {})
    assert card["subgroups"]["columns"] == {} and card["subgroups"]["absent"] == ["sex", "age", "anatomic site",
                                                                                   "skin tone"]
    assert "no subgroup columns" in MC.card_markdown(card)
    from matplotlib.figure import Figure
    assert MC.fig_subgroups(Figure, card) is None
    json.dumps(card, allow_nan=False)


def test_oof_table_aligned_by_id() -> None:
    train, enc, probs, dec = _case(40)
    table = pd.DataFrame({"lesion_id": train["lesion_id"], **{c: probs[:, i] for i, c in enumerate(CLASSES)}})
    a = MC.build_model_card(train, table.iloc[::-1], dec, CLASSES, "multiclass", {}, {}, enc)
    b = MC.build_model_card(train, probs, dec, CLASSES, "multiclass", {}, {}, enc)
    assert a == b
    with pytest.raises(Exception, match="shape"):
        MC.build_model_card(train, probs[:10], dec, CLASSES, "multiclass", {}, {}, enc)
