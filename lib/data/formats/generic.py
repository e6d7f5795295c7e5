"""A generic CSV: id column, image column(s) per modality, a label column or one-hot label columns."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID
from lib.data.formats.common import (
    Raw,
    check_unique,
    labels_from_names,
    onehot_labels,
    read_csv,
    to_numeric,
)


# --------------------------------------------------------------------------- generic CSV
def read_generic(root: Path, split: str, g: dict, classes: list[str] | None, task: str | None) -> Raw:
    """A CSV with an id column, image column(s) per modality, a label column or label columns."""
    csv = g["train_csv" if split == "train" else "test_csv"]
    if not csv:
        raise PipelineError(f"data.generic.{split}_csv is not set")
    path = root / csv
    img_cols = dict(g["image_cols"])
    need = [g["id_col"], *img_cols.values(), *g["meta_num_cols"], *g["meta_cat_cols"]]
    if split == "train":
        need += list(g["label_cols"] or ([g["label_col"]] if g["label_col"] else []))
        need += [g["group_col"]] if g["group_col"] else []
    df = read_csv(path, "generic CSV", need)
    check_unique(df, g["id_col"], path)
    out = pd.DataFrame({ID: df[g["id_col"]].astype(str).to_numpy()})
    folder = root / (g["image_dir"] or "")
    for mod, col in img_cols.items():
        srcs = []
        for i, v in enumerate(df[col]):
            p = Path(str(v))
            p = p if p.is_absolute() else folder / p
            if not p.suffix:
                p = p.with_suffix(".jpg")
            if pd.isna(v) or not p.exists():
                raise PipelineError(f"{path}: line {i + 2}: image for {mod} not found: {p}")
            srcs.append(str(p))
        out[f"src_{mod}"] = srcs
    task = task or ("multilabel" if g["label_cols"] and len(g["label_cols"]) > 1 else "multiclass")
    if split == "train":
        if g["label_cols"]:
            if task == "binary" and len(g["label_cols"]) != 1:
                raise PipelineError(f"data.generic.label_cols: a binary task takes one 0/1 column (the positive "
                                    f"class), got {list(g['label_cols'])}")
            y, classes = onehot_labels(df[[g["id_col"], *g["label_cols"]]].copy(), g["id_col"], path,
                                       classes or list(g["label_cols"]), multilabel=task == "multilabel",
                                       allow_none=task == "binary")
            out = out.merge(y, on=ID, how="left", validate="one_to_one")
        elif g["label_col"]:
            if task == "binary":
                raise PipelineError("data.generic: a binary task takes label_cols: [<positive class>] "
                                    "(one 0/1 column), not label_col")
            y, classes = labels_from_names(df, g["label_col"], classes, path, upper=False)
            out = pd.concat([out, y.reset_index(drop=True)], axis=1)
        else:
            raise PipelineError("data.generic: set label_col (class names) or label_cols (one-hot / multi-hot)")
    elif not classes:
        raise PipelineError("data.classes must be set for a generic test split")
    to_numeric(df, list(g["meta_num_cols"]), path)
    for c in [*g["meta_num_cols"], *g["meta_cat_cols"]]:
        out[c] = df[c].to_numpy()
    group = None
    if g["group_col"] and g["group_col"] in df.columns:  # required for train; optional in a test CSV
        out["group"] = df[g["group_col"]].astype(str).to_numpy()
        group = "group"
    return Raw(out, list(classes), list(img_cols), task, list(g["meta_num_cols"]), list(g["meta_cat_cols"]), group)


def read(root: Path, split: str, d: dict) -> Raw:
    return read_generic(root, split, d["generic"], d["classes"], d["task"])
