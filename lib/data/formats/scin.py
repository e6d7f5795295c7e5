"""SCIN (Google Skin Condition Image Network) official layout: a case is the unit.

`dataset/scin_cases.csv` (questionnaire answers + `image_{1,2,3}_path`, 1-3 views per case) and
`dataset/scin_labels.csv` (`weighted_skin_condition_label`: a dict condition -> weight). The tables may
also sit directly in the data root. Multi-label: a case's conditions are those with weight >=
`data.scin.label_min_weight` (at least its top one), optionally only its `top_k`; conditions with
fewer than `min_cases` cases become `other_label`. Views are pooled per case: `src_image` lists the
case's 1-3 image paths joined by `|` (the image cache tiles them into one picture per case).
Images are optional (`use_images`: null = when all present, true = required, false = never).
"""
from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.core.io import ID
from lib.data.formats.common import Raw, check_unique, read_csv

log = logging.getLogger(__name__)

VIEW_COLS = ["image_1_path", "image_2_path", "image_3_path"]
CAT_COLS = ["age_group", "sex_at_birth", "fitzpatrick_skin_type", "related_category", "condition_duration"]
YES_PREFIXES = ("textures_", "body_parts_", "condition_symptoms_", "other_symptoms_")
VIEW_SEP = "|"


def condition_name(name: str) -> str:
    """A condition as a column-safe class name: 'SCC/SCCIS' -> 'SCC_SCCIS'."""
    return re.sub(r"[^0-9A-Za-z+-]+", "_", name.strip()).strip("_")


def locate(root: Path) -> tuple[Path, Path]:
    """(folder holding the tables, release root the image paths are relative to)."""
    if (root / "dataset" / "scin_cases.csv").exists():
        return root / "dataset", root
    if root.name == "dataset":
        return root, root.parent
    return root, root


def has_test(root: Path, d: dict) -> bool:
    """A SCIN test release is a separate `data.test_root` holding its own case table."""
    return bool(d["test_root"]) and (locate(root)[0] / "scin_cases.csv").exists()


def parse_weights(text: str | float, path: Path, line: int) -> dict[str, float]:
    """`weighted_skin_condition_label` -> {condition: weight}; anything else is a DataError."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise DataError(f"{path}: line {line}: weighted_skin_condition_label does not parse: {text[:60]!r}") from None
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in d.items()):
        raise DataError(f"{path}: line {line}: weighted_skin_condition_label is not a dict of condition -> weight")
    return {k: float(v) for k, v in d.items()}


def case_conditions(w: dict[str, float], min_weight: float, top_k: int | None) -> list[str]:
    """The conditions of one case: weight >= min_weight (at least the top one), the top_k by weight."""
    ranked = sorted(w.items(), key=lambda kv: -kv[1])
    keep = [k for k, v in ranked if v >= min_weight] or [k for k, _ in ranked[:1]]
    return keep[:top_k] if top_k else keep


def label_table(ids: pd.Series, conds: list[list[str]], lines: list[int], s: dict, known: list[str] | None,
                path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Multi-hot `y_<condition>` columns; the long tail (< min_cases cases) -> `other_label`."""
    other = s["other_label"]
    names = [[condition_name(c) for c in cs] for cs in conds]
    if known is None:
        counts = pd.Series([c for cs in names for c in set(cs)]).value_counts()
        frequent = [c for c in counts.index if counts[c] >= s["min_cases"] and c != other]
        known = frequent + ([other] if len(frequent) < len(counts) or other in counts else [])
    rows = []
    for i, cs in enumerate(names):
        mapped = set()
        for c in cs:
            if c in known:
                mapped.add(c)
            elif other in known:
                mapped.add(other)
            else:
                raise DataError(f"{path}: line {lines[i]} (case {ids.iloc[i]}): unknown condition '{c}' "
                                f"(known: {known[:8]}...; add '{other}' to data.classes to bucket the rest)")
        rows.append([float(c in mapped) for c in known])
    y = pd.DataFrame(np.array(rows, dtype=float).reshape(len(names), len(known)),
                     columns=[f"y_{c}" for c in known])
    y.insert(0, ID, ids.astype(str).to_numpy())
    return y, list(known)


def read_labels(folder: Path, s: dict, known: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """Labelled cases only (an empty dict = not labelled): `lesion_id` + multi-hot `y_*`."""
    path = folder / "scin_labels.csv"
    lab = read_csv(path, "SCIN labels", ["case_id", "weighted_skin_condition_label"])
    check_unique(lab, "case_id", path)
    ids, conds, lines = [], [], []
    for i, (cid, text) in enumerate(zip(lab["case_id"], lab["weighted_skin_condition_label"])):
        w = parse_weights(text, path, i + 2)
        if w:
            ids.append(cid)
            conds.append(case_conditions(w, float(s["label_min_weight"]), s["top_k"]))
            lines.append(i + 2)
    if not ids:
        raise DataError(f"{path}: no case has a weighted_skin_condition_label")
    log.info("SCIN: %d of %d cases have a dermatologist label (the others are left out of training)",
             len(ids), len(lab))
    return label_table(pd.Series(ids), conds, lines, s, known, path)


def view_sources(cases: pd.DataFrame, base: Path, path: Path, use: bool | None) -> list[str] | None:
    """Per case, its 1-3 image paths joined by `|`; None when images are not used."""
    if use is False:
        return None
    views = [c for c in VIEW_COLS if c in cases.columns]
    out, missing = [], []
    for i, row in enumerate(cases[views].itertuples(index=False)):
        paths = [base / str(v) for v in row if isinstance(v, str) and v.strip()]
        if not paths:
            missing.append((i, "no image path"))
        for p in paths:
            if not p.exists():
                missing.append((i, f"image not found: {p}"))
        out.append(VIEW_SEP.join(str(p) for p in paths))
    if not missing:
        return out
    i, what = missing[0]
    if use:
        raise DataError(f"{path}: line {i + 2} (case {cases['case_id'].iloc[i]}): {what} "
                        f"({len(missing)} problem(s); data.scin.use_images is true)")
    log.warning("SCIN: %d image(s) absent (e.g. line %d: %s): running on the questionnaire features only",
                len(missing), i + 2, what)
    return None


def questionnaire(cases: pd.DataFrame, out: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Questionnaire answers as raw metadata: YES columns -> 0/1 numbers, the rest categorical."""
    yes = [c for c in cases.columns if c.startswith(YES_PREFIXES)]
    for c in yes:
        out[c] = cases[c].fillna("").astype(str).str.strip().str.upper().eq("YES").astype(float).to_numpy()
    out["n_images"] = cases[[c for c in VIEW_COLS if c in cases]].notna().sum(axis=1).astype(float).to_numpy()
    cats = [c for c in CAT_COLS if c in cases.columns]
    for c in cats:
        out[c] = cases[c].to_numpy()
    return yes + ["n_images"], cats


def read_scin(root: Path, split: str, d: dict) -> Raw:
    """One row per case (never dropped or duplicated); train keeps the labelled cases."""
    s = d["scin"]
    folder, base = locate(root)
    path = folder / "scin_cases.csv"
    cases = read_csv(path, "SCIN cases", ["case_id"])
    check_unique(cases, "case_id", path)
    classes = list(d["classes"]) if d["classes"] else None
    if split == "train":
        y, classes = read_labels(folder, s, classes)
        cases = cases[cases["case_id"].astype(str).isin(set(y[ID]))].reset_index(drop=True)
        lost = sorted(set(y[ID]) - set(cases["case_id"].astype(str)))
        if lost:
            raise DataError(f"{folder / 'scin_labels.csv'}: {len(lost)} labelled case(s) not in {path}, e.g. {lost[:3]}")
    elif classes is None:
        raise DataError("data.classes must be set for a SCIN test split (the conditions of the training run)")
    out = pd.DataFrame({ID: cases["case_id"].astype(str).to_numpy()})
    srcs = view_sources(cases, base, path, s["use_images"])
    if srcs is not None:
        out["src_image"] = srcs
    num, cats = questionnaire(cases, out)
    if split == "train":
        out = out.merge(y, on=ID, how="left", validate="one_to_one")
    return Raw(out, classes, [] if srcs is None else ["image"], "multilabel", num, cats)


def read(root: Path, split: str, d: dict) -> Raw:
    return read_scin(root, split, d)
