"""Atomic file writes, table readers and id-alignment guards."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lib.core.errors import DataError, PipelineError

ID = "lesion_id"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; move it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:  # name the file: pyarrow's and pandas' disk-full errors carry no file name
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
    except RuntimeError as e:  # torch.save hides a full disk behind "unexpected pos"
        if not _nearly_full(path.parent):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `folder` has less than `margin` bytes left for this user."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < margin


def _atomic(write: Callable[[Path], Any], path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write text atomically."""
    return _atomic(lambda p: p.write_text(text), path)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (indented, NaN-free floats as null)."""
    return write_text(json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False) + "\n", path)


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, np.ndarray):
        return _nan_to_none(o.tolist())
    if isinstance(o, np.floating):
        return _nan_to_none(float(o))
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def write_yaml(obj: Any, path: str | Path) -> Path:
    """Write YAML atomically, keys in insertion order."""
    return write_text(yaml.safe_dump(obj, sort_keys=False), path)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame to parquet atomically (index dropped)."""
    return _atomic(lambda p: df.reset_index(drop=True).to_parquet(p, index=False), path)


def write_csv(df: pd.DataFrame, path: str | Path, **kw: Any) -> Path:
    """Write a DataFrame to CSV atomically (no index)."""
    return _atomic(lambda p: df.to_csv(p, index=False, **kw), path)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; one DataError line naming the file when it is not valid JSON (cut short or
    edited by hand)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]}): the file is corrupt or was "
                        "edited by hand; rerun the stage that wrote it") from None


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet or CSV table written by this pipeline; one-line errors when missing or corrupt
    (a truncated or overwritten file is never half read)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found (did the earlier stage run?)")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path, columns=columns)
        return pd.read_csv(path, dtype={ID: str}, usecols=columns)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: unreadable table ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the file "
                        "is corrupt; rerun the stage that wrote it") from None


def assert_unique_ids(df: pd.DataFrame, what: str, col: str = ID) -> None:
    """Raise if `col` is missing or has duplicates."""
    if col not in df.columns:
        raise PipelineError(f"{what}: no '{col}' column")
    dup = df[col][df[col].duplicated()]
    if len(dup):
        raise PipelineError(f"{what}: duplicate {col} {sorted(dup.astype(str).unique())[:5]}")


def assert_same_ids(a: pd.DataFrame, b: pd.DataFrame, what: str, col: str = ID,
                    ordered: bool = False) -> None:
    """Raise unless `a` and `b` hold the same unique ids (and in the same order if `ordered`)."""
    assert_unique_ids(a, f"{what} (left)", col)
    assert_unique_ids(b, f"{what} (right)", col)
    sa, sb = set(a[col]), set(b[col])
    if sa != sb:
        raise PipelineError(
            f"{what}: id mismatch, {len(sa - sb)} only left (e.g. {sorted(sa - sb)[:3]}), "
            f"{len(sb - sa)} only right (e.g. {sorted(sb - sa)[:3]})")
    if ordered and not (a[col].to_numpy() == b[col].to_numpy()).all():
        raise PipelineError(f"{what}: same ids but in a different order")


def merge_on_id(left: pd.DataFrame, right: pd.DataFrame, what: str, how: str = "exact",
                col: str = ID) -> pd.DataFrame:
    """Merge two id-keyed tables; `how='exact'` requires identical id sets, 'left' requires right ⊇ left."""
    if how == "exact":
        assert_same_ids(left, right, what, col)
    else:
        assert_unique_ids(right, f"{what} (right)", col)
        missing = set(left[col]) - set(right[col])
        if missing:
            raise PipelineError(f"{what}: {len(missing)} ids missing on the right, e.g. {sorted(missing)[:3]}")
    overlap = (set(left.columns) & set(right.columns)) - {col}
    if overlap:
        raise PipelineError(f"{what}: both tables have columns {sorted(overlap)[:5]}")
    return left.merge(right, on=col, how="left", validate="one_to_one")
