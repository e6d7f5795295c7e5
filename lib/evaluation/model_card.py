"""The model card 05 writes next to its submission (`model_card.json`, `model_card.md`) and shows in
its report: what the model was trained on, the CV figures with their bootstrap intervals, per-class
figures and per-subgroup figures (with intervals and a forest plot), intended use and limits.

Subgroups are decoded from the encoded metadata stage 01 writes (`lib.data.formats.encoding`):
a categorical column `<cat>` becomes its level (the `meta_<cat>_<level>` one-hot column that is 1,
else `unknown`); a numeric column whose name has the word `age` (`age`, `age_approx`) becomes an
age band (AGE_BANDS, `unknown` where `meta_<age>_missing` is set), its value recovered from the
standardized column with the encoder's mean and std; other numeric columns are not subgroups.

Per subgroup level with at least `min_n` lesions: multiclass / multilabel, the macro Dice (the
official rule, `lib.core.scoring`) of the submitted decision over the classes present in the level;
binary, the AUC of the OOF probabilities when both labels are present. Its 95% interval is a
percentile bootstrap inside the level: lesions redrawn stratified by class
(`lib.evaluation.bootstrap.stratified_weights`), or, binary, whole patients when the table has a
`group` column (`grouped_draws`). Everything is measured on the OOF rows of the development set.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from lib.core import artifacts as A
from lib.core.errors import PipelineError
from lib.core.io import ID, assert_same_ids
from lib.core.scoring import dice_per_class
from lib.evaluation.bootstrap import grouped_draws, stratified_weights, weighted_macro_dice

log = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
UNKNOWN = "unknown"
AGE_EDGES = (30, 45, 60, 75)                       # band i holds ages in [edge[i-1], edge[i])
AGE_BANDS = ("<30", "30-44", "45-59", "60-74", ">=75")
MIN_N = 10
N_BOOT = 200
# what a subgroup analysis usually asks for -> name fragments of the columns that carry it
STANDARD_SUBGROUPS = (("sex", ("sex",)), ("age", ("age",)), ("anatomic site", ("site", "localization", "location")),
                      ("skin tone", ("skin_tone", "fitzpatrick")))
OOF_FIGURES = ("macro_dice_05", "macro_dice_tuned_cv", "macro_f1_argmax", "balanced_accuracy", "macro_auc", "auc",
               "pauc_80", "top1_accuracy", "top3_accuracy")
NESTED_FIGURES = ("macro_dice_nested", "macro_dice_tuned_cv_nested", "macro_f1_argmax_nested", "pauc_80_nested",
                  "rules_per_fold")
INTENDED_USE = (
    "Research and benchmarking: classifying skin-lesion images of this release's classes for the ISIC-style "
    "challenge it was built for, and comparing model variants. Not a medical device: not for diagnosis, "
    "triage, screening or any clinical decision, and not validated on other populations, cameras, "
    "dermatoscopes or image types than the development data.")


# ----------------------------------------------------------------------------- subgroups


def is_age_column(name: str) -> bool:
    """True for a numeric column that holds an age (`age`, `age_approx`; not `n_images`)."""
    return "age" in re.split(r"[^a-z0-9]+", name.lower())


def _decode_cat(train: pd.DataFrame, col: str, levels: list[str]) -> pd.Categorical | None:
    """Level of each row from the one-hot `meta_<col>_<level>` columns (none set: unknown)."""
    levels = [str(lv) for lv in levels if str(lv) != UNKNOWN]
    present = [(lv, f"meta_{col}_{lv}") for lv in levels if f"meta_{col}_{lv}" in train.columns]
    if not present and f"meta_{col}_{UNKNOWN}" not in train.columns:
        return None
    values = np.full(len(train), UNKNOWN, dtype=object)
    for lv, c in present:
        values[train[c].to_numpy(np.float64) > 0.5] = lv
    return pd.Categorical(values, categories=[*levels, UNKNOWN])


def _age_bands(train: pd.DataFrame, col: str, stats: dict) -> pd.Categorical:
    """Age band of each row: the standardized `meta_<col>` scaled back (mean/std of the encoder)."""
    age = train[f"meta_{col}"].to_numpy(np.float64) * float(stats.get("std", 1.0)) + float(stats.get("mean", 0.0))
    age = np.round(age, 3)  # float32 storage: 45 must not become 44.99998
    miss = np.isnan(age)
    if f"meta_{col}_missing" in train.columns:
        miss |= train[f"meta_{col}_missing"].to_numpy(np.float64) > 0.5
    bands = np.asarray(AGE_BANDS, dtype=object)[np.searchsorted(AGE_EDGES, np.nan_to_num(age), side="right")]
    return pd.Categorical(np.where(miss, UNKNOWN, bands), categories=[*AGE_BANDS, UNKNOWN])


def subgroups(train: pd.DataFrame, encoders: dict) -> dict[str, pd.Series]:
    """{subgroup column: its level per lesion (categorical Series indexed by lesion_id)} decoded from
    the `meta_*` columns stage 01 wrote with `encoders` (`<prep>/meta_encoders.json`). Categorical
    columns keep their name; an age column `<c>` becomes `<c> band`. No metadata: an empty dict."""
    index = pd.Index(train[ID].astype(str), name=ID) if ID in train.columns else train.index
    out: dict[str, pd.Series] = {}
    for col, levels in ((encoders or {}).get("cat") or {}).items():
        values = _decode_cat(train, col, list(levels))
        if values is not None:
            out[col] = pd.Series(values, index=index, name=col)
    for col, stats in ((encoders or {}).get("num") or {}).items():
        if is_age_column(col) and f"meta_{col}" in train.columns:
            out[f"{col} band"] = pd.Series(_age_bands(train, col, stats), index=index, name=f"{col} band")
    return out


# ----------------------------------------------------------------------------- figures


def _num(v: Any, nd: int = 4) -> float | None:
    """A JSON-able float (None for None / NaN)."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else round(v, nd)


def _strata(y: np.ndarray) -> np.ndarray:
    """Bootstrap strata: the first true class of a row, -1 for a row without one (multilabel)."""
    return np.where(y.max(axis=1) > 0.5, y.argmax(axis=1), -1)


def subgroup_figure(y: np.ndarray, probs: np.ndarray, decided: np.ndarray, task: str,
                    groups: np.ndarray | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The task metric on some OOF rows with its bootstrap SE and 95% percentile interval:
    binary, AUC of `probs[:, 0]` (None with one label only; draws of whole `groups` when given);
    otherwise the macro Dice of `decided` over the classes with a true row here (None when none)."""
    y, probs, decided = (np.asarray(a, np.float64) for a in (y, probs, decided))
    if task == "binary":
        t, s = y[:, 0] > 0.5, probs[:, 0]
        if t.all() or not t.any():
            return {"value": None, "se": None, "ci_low": None, "ci_high": None, "note": "one label only"}
        value = roc_auc_score(t, s)
        draws = grouped_draws(np.arange(len(t)) if groups is None else np.asarray(groups), t, n_boot, seed)
        boots = np.array([roc_auc_score(t[d], s[d]) for d in draws])
    else:
        present = (y > 0.5).any(axis=0)
        if not present.any():
            return {"value": None, "se": None, "ci_low": None, "ci_high": None, "note": "no class present"}
        value = dice_per_class(y[:, present], decided[:, present]).mean()
        boots = weighted_macro_dice(y[:, present], decided[:, present], stratified_weights(_strata(y), n_boot, seed))
    return {"value": _num(value), "se": _num(boots.std(ddof=1)), "ci_low": _num(np.quantile(boots, 0.025)),
            "ci_high": _num(np.quantile(boots, 0.975))}


def _levels(s: pd.Series, rows: dict, min_n: int, seed: int) -> list[dict]:
    """One entry per level with rows (category order): n, positives, the figure when n >= min_n."""
    out = []
    codes = s.to_numpy()
    for i, lv in enumerate(s.cat.categories):
        m = codes == lv
        n = int(m.sum())
        if n == 0:
            continue
        e: dict = {"level": str(lv), "n": n, "n_positive": [int(v) for v in (rows["y"][m] > 0.5).sum(axis=0)]}
        if n >= min_n:
            g = None if rows["groups"] is None else rows["groups"][m]
            e.update(subgroup_figure(rows["y"][m], rows["probs"][m], rows["decided"][m], rows["task"], g,
                                     rows["n_boot"], seed + 1 + i))
        else:
            e["note"] = f"n < {min_n}: not measured"
        out.append(e)
    return out


def _aligned(train: pd.DataFrame, table: Any, classes: list[str], what: str) -> np.ndarray:
    """`[N, K]` values in train order: a table with lesion_id + class columns, or an array as it is."""
    if isinstance(table, pd.DataFrame):
        assert_same_ids(train, table, f"model card: {what} vs train")
        return table.set_index(ID).loc[train[ID].to_numpy(), classes].to_numpy(np.float64)
    a = np.asarray(table, np.float64)
    a = a[:, None] if a.ndim == 1 else a
    if a.shape != (len(train), len(classes)):
        raise PipelineError(f"model card: {what} has shape {a.shape}, expected {(len(train), len(classes))}")
    return a


# ----------------------------------------------------------------------------- the card


def _data_block(train: pd.DataFrame, y: np.ndarray, classes: list[str], task: str, info: dict) -> dict:
    out = {"format": info.get("format"), "task": task, "classes": list(classes), "n_lesions": int(len(train)),
           "n_per_class": {c: int(n) for c, n in zip(classes, (y > 0.5).sum(axis=0))},
           "modalities": list(info.get("modalities") or []), "n_test": info.get("n_test"),
           "n_folds": int(train["fold"].nunique()) if "fold" in train.columns else None}
    if "group" in train.columns:
        out["n_patients_or_groups"] = int(train["group"].nunique())
    return out


def _cv_block(cv: dict) -> dict:
    """The headline figures of 05's cv.json: the expected score, the nested figures, their bootstrap
    intervals and nesting labels, and the (partly not nested) pooled OOF figures."""
    s = (cv or {}).get("submit") or {}
    h = s.get("honest_cv") or {}
    return {"decision": s.get("decision"), "decision_chosen_on": s.get("decision_chosen_on"),
            "expected_score": _num(s.get("expected_score")), "expected_score_nesting": s.get("expected_score_nesting"),
            **{k: h[k] for k in NESTED_FIGURES if k in h}, "bootstrap": h.get("bootstrap"),
            "nesting": h.get("nesting") or {},
            "oof": {k: _num(cv[k]) for k in OOF_FIGURES if k in (cv or {})},
            "oof_nesting": {k: v for k, v in ((cv or {}).get("nesting") or {}).items() if k in OOF_FIGURES}}


def _absent(cols: list[str]) -> list[str]:
    """The usual subgroup variables (STANDARD_SUBGROUPS) no decoded column carries."""
    return [name for name, frags in STANDARD_SUBGROUPS if not any(f in c.lower() for c in cols for f in frags)]


def _limits(card: dict) -> list[str]:
    sg = card["subgroups"]
    absent = sg["absent"]
    return [
        "Measured on the out-of-fold rows of the development set only (cross-validation), never on an "
        "external or prospective test set; a new population, site or device can score quite differently.",
        f"Subgroups are small: levels with fewer than {sg['min_n']} lesions are listed with their count only, "
        "and the intervals of the others are wide; no subgroup difference here was tested for significance.",
        "Intervals are percentile bootstraps inside each level with the class counts (binary: the positive "
        "patients) held fixed: a lower bound on the noise of another sample of the same size.",
        "A level's macro Dice averages only the classes present in that level, so levels (and the overall "
        "figure) are not strictly comparable; per-subgroup figures use the submission's rule and thresholds, "
        "fitted on all OOF rows (not nested).",
        "Metadata is as recorded in the release (approximate ages, self-reported or missing values: 'unknown').",
        ("No subgroup column for: " + ", ".join(absent) + ".") if absent else "Every usual subgroup variable "
        "(sex, age, anatomic site, skin tone) is present.",
        "Not a clinical device: nothing here validates the model for diagnosis or triage.",
    ]


def build_model_card(train: pd.DataFrame, oof_probs: Any, decided: Any, classes: list[str], task: str, cv: dict,
                     info: dict, encoders: dict, seed: int = 0, min_n: int = MIN_N, n_boot: int = N_BOOT) -> dict:
    """The model card as a JSON-able dict. `oof_probs` / `decided`: the OOF probabilities and the
    submitted rule's 0/1 decisions on them (`decision.apply_rule`), tables with lesion_id + class
    columns or `[N, K]` arrays in `train` order; `cv` 05's cv.json document; `info` dataset.json;
    `encoders` `<prep>/meta_encoders.json` (empty: no subgroups)."""
    y = train[[f"y_{c}" for c in classes]].to_numpy(np.float64)
    probs, dec = _aligned(train, oof_probs, classes, "OOF probabilities"), _aligned(train, decided, classes, "decisions")
    groups = train["group"].astype(str).to_numpy() if task == "binary" and "group" in train.columns else None
    rows = {"y": y, "probs": probs, "decided": dec, "task": task, "groups": groups, "n_boot": n_boot}
    subs = subgroups(train, encoders)
    metric = ("AUC of the OOF probabilities" if task == "binary" else
              "macro Dice of the submitted decision over the classes present in the subgroup")
    card: dict = {
        "schema_version": CARD_SCHEMA_VERSION, "data": _data_block(train, y, classes, task, info), "cv": _cv_block(cv),
        "per_class": [{"class": c, "dice": _num(d), "support": int(n), "n_predicted": int(p)} for c, d, n, p in
                      zip(classes, dice_per_class(y, dec), (y > 0.5).sum(axis=0), (dec > 0.5).sum(axis=0))],
        "subgroups": {"metric": metric, "min_n": min_n, "n_boot": n_boot, "seed": seed,
                      "draws": ("whole patients (group column), stratified by a positive" if groups is not None else
                                "lesions, stratified by class" if task != "binary" else "lesions, stratified by label"),
                      "age_bands": list(AGE_BANDS), "overall": subgroup_figure(y, probs, dec, task, groups, n_boot, seed),
                      "columns": {name: _levels(s, rows, min_n, seed) for name, s in subs.items()},
                      "absent": _absent(list(subs)),
                      "encoded_but_not_found": [c for c in (encoders or {}).get("cat", {}) if c not in subs]},
        "intended_use": INTENDED_USE,
    }
    card["limits"] = _limits(card)
    log.info("model card: %d lesions, %d subgroup columns (%s)", len(train), len(subs), ", ".join(subs) or "none")
    return card


# ----------------------------------------------------------------------------- markdown and plot


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(_cell(v) for v in r) + " |" for r in rows)])


def _interval(e: dict) -> str:
    return "-" if e.get("ci_low") is None else f"{e['ci_low']:.3f} - {e['ci_high']:.3f}"


def subgroup_markdown(card: dict) -> str:
    """The per-subgroup tables (one per column: level, n, figure, 95% interval) with their notes."""
    sg = card["subgroups"]
    if not sg["columns"]:
        return "_no subgroup columns in this data (no encoded metadata)_"
    parts = [f"Figure: {sg['metric']}; 95% percentile bootstrap interval ({sg['n_boot']} draws of {sg['draws']}); "
             f"levels with n < {sg['min_n']} are listed with n only. Age bands (years): {', '.join(sg['age_bands'])}.",
             "", f"Overall (all OOF rows): {_cell(sg['overall']['value'])} ({_interval(sg['overall'])})"]
    for col, levels in sg["columns"].items():
        parts += ["", f"**{col}**", "", _table(["level", "n", "figure", "95% interval"],
                                                [[e["level"], e["n"], e.get("value"), _interval(e)] for e in levels])]
    return "\n".join(parts)


def card_markdown(card: dict) -> str:
    """`model_card.md`: data, CV figures with intervals, per class, per subgroup, intended use, limits."""
    d, cv = card["data"], card["cv"]
    folds = "" if d.get("n_folds") is None else f" in {d['n_folds']} folds"
    boot = {k: v for k, v in (cv.get("bootstrap") or {}).items() if isinstance(v, dict)}
    how = {**cv["nesting"], "expected_score": cv.get("expected_score_nesting") or "-"}
    figs = [[k, v, how.get(k, "-")] for k, v in cv.items() if k in ("expected_score", *NESTED_FIGURES)
            and isinstance(v, float)]
    parts = ["# Model card", "", "## Data", "",
             f"Format **{d['format']}**, task **{d['task']}**, {d['n_lesions']} training lesions"
             f"{folds}, modalities: "
             f"{', '.join(d['modalities']) or '-'}.", "",
             _table(["class", "n"], [[c, n] for c, n in d["n_per_class"].items()]),
             "", "## CV figures", "", f"Decision: **{cv.get('decision')}** (chosen on {cv.get('decision_chosen_on')}).",
             "", _table(["figure", "value", "fitted how"], figs) if figs else "_no nested figures_", ""]
    if boot:
        parts += ["Bootstrap (" + str((cv.get("bootstrap") or {}).get("draws", "")) + "):", "",
                  _table(["figure", "value", "se", "95% interval"],
                         [[k, b.get("macro_dice", b.get("value")), b.get("se"), _interval(b)] for k, b in boot.items()]), ""]
    if cv["oof"]:
        parts += ["Pooled OOF figures (see cv.json `nesting`: some are not nested):", "",
                  _table(["figure", "value"], [[k, v] for k, v in cv["oof"].items()]), ""]
    parts += ["## Per class (OOF, submitted decision)", "",
              _table(["class", "support", "predicted", "Dice (= F1)"],
                     [[e["class"], e["support"], e["n_predicted"], e["dice"]] for e in card["per_class"]]),
              "", "## Subgroups (OOF)", "", subgroup_markdown(card), "",
              f"Plot: `{A.REPORT_DIR}/{A.FIG_SUBGROUPS}` (written with the 05 report).", "",
              "## Intended use", "", card["intended_use"], "", "## Limits of what was measured", "",
              *(f"- {x}" for x in card["limits"])]
    return "\n".join(parts).rstrip() + "\n"


def fig_subgroups(figure: Callable, card: dict) -> Any | None:
    """Forest plot of the measured subgroup levels (point and 95% interval), the overall figure as a
    dashed line; None when no level was measured."""
    sg = card["subgroups"]
    rows = [(f"{col}: {e['level']} (n={e['n']})", e) for col, levels in sg["columns"].items() for e in levels
            if e.get("value") is not None]
    if not rows:
        return None
    fig = figure(figsize=(7.0, 1.2 + 0.28 * len(rows)))
    ax = fig.subplots()
    ypos = np.arange(len(rows))[::-1]
    val = np.array([e["value"] for _, e in rows])
    lo = np.array([e["value"] if e["ci_low"] is None else e["ci_low"] for _, e in rows])
    hi = np.array([e["value"] if e["ci_high"] is None else e["ci_high"] for _, e in rows])
    cols = [lbl.split(":")[0] for lbl, _ in rows]
    colors = [f"C{sorted(set(cols), key=cols.index).index(c) % 10}" for c in cols]
    for y0, a, b, c in zip(ypos, lo, hi, colors):
        ax.plot([a, b], [y0, y0], color=c, lw=1.2)
    ax.scatter(val, ypos, c=colors, s=18, zorder=3)
    if sg["overall"].get("value") is not None:
        ax.axvline(sg["overall"]["value"], color="grey", ls="--", lw=0.9, label="overall")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(ypos, [lbl for lbl, _ in rows], fontsize=8)
    ax.set_xlim(max(0.0, float(lo.min()) - 0.05), min(1.0, float(hi.max()) + 0.05))
    ax.set_xlabel(sg["metric"], fontsize=8)
    ax.set_title(f"Per-subgroup figures on OOF rows, 95% bootstrap intervals (n >= {sg['min_n']})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig
