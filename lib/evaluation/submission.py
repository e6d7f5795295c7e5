"""Official-format submission files, validated with the official parser's rules before writing."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import PipelineError
from lib.core.io import ID, write_text
from lib.data.formats import get_format

log = logging.getLogger(__name__)

def id_column(fmt: str) -> str:
    """The submission's id column for a data format (the registry's; unknown formats: `lesion_id`)."""
    try:
        return get_format(fmt).id_col
    except PipelineError:
        return ID


def build_submission(probs: pd.DataFrame, classes: list[str], fmt: str, task: str,
                     key: str | None = None) -> pd.DataFrame:
    """`lesion_id` + class columns -> the challenge's layout from the format registry: the id
    column, one `target` column for binary challenges (ISIC 2020 / 2024), else one column per
    class, plus constant columns the official format requires (ISIC 2019: `UNK` = 0).
    `key`: the id column's name (default: the format's; generic data: its own id column)."""
    key = key or id_column(fmt)
    try:
        spec = get_format(fmt)
    except PipelineError:
        spec = None
    out = pd.DataFrame({key: probs[ID].astype(str).to_numpy()})
    if task == "binary" and spec is not None and spec.target_col:
        out[spec.target_col] = probs[classes[0]].to_numpy(dtype=np.float64)
        return out
    for c in classes:
        out[c] = probs[c].to_numpy(dtype=np.float64)
    for c, v in (spec.extra_cols if spec is not None else ()):
        if c not in out:
            out[c] = float(v)
    return out


def validate_submission(sub: pd.DataFrame, test_ids: list[str], columns: list[str], key: str) -> None:
    """The official parser's rules: key column, unique ids, exactly the test ids, all columns,
    float values in [0, 1], no NaN. Raises PipelineError naming the problem."""
    if list(sub.columns) != [key, *columns]:
        missing = sorted(set(columns) - set(sub.columns))
        extra = sorted(set(sub.columns) - set(columns) - {key})
        raise PipelineError(f"submission columns must be [{key}, {', '.join(columns)}]; "
                            f"missing {missing}, extra {extra}")
    ids = sub[key].astype(str)
    if ids.duplicated().any():
        raise PipelineError(f"submission has duplicate ids {ids[ids.duplicated()].unique()[:5].tolist()}")
    want, got = set(map(str, test_ids)), set(ids)
    if want != got:
        raise PipelineError(f"submission ids differ from the test lesions: missing {sorted(want - got)[:5]}, "
                            f"extra {sorted(got - want)[:5]}")
    vals = sub[columns].to_numpy()
    if not np.issubdtype(vals.dtype, np.floating):
        raise PipelineError("submission values must be floats")
    if np.isnan(vals).any():
        raise PipelineError(f"submission has NaN for ids {ids[np.isnan(vals).any(1)].tolist()[:5]}")
    bad = (vals < 0) | (vals > 1)
    if bad.any():
        raise PipelineError(f"submission values outside [0, 1] for ids {ids[bad.any(1)].tolist()[:5]}")


def to_csv_text(sub: pd.DataFrame) -> str:
    buf = io.StringIO()
    sub.to_csv(buf, index=False)  # full precision: remapped values just above 0.5 must stay above
    return buf.getvalue()


def write_submission(sub: pd.DataFrame, test_ids: list[str], path: str | Path) -> Path:
    """Validate, then write atomically; re-read the written text and validate again."""
    key, cols = sub.columns[0], list(sub.columns[1:])
    validate_submission(sub, test_ids, cols, key)
    text = to_csv_text(sub)
    back = pd.read_csv(io.StringIO(text), dtype={key: str})
    validate_submission(back, test_ids, cols, key)
    return write_text(text, path)
