"""The format registry: name -> reader, default task, classes, test release marker, submission layout.

Stage 01 reads through `read_split`; stage 05 (lib.evaluation.submission) takes the id column and the
submission layout from `get_format`. Adding a format = one module with a reader + one `FormatSpec` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lib.core.errors import ConfigError, PipelineError
import lib.data.formats.generic as generic
import lib.data.formats.ham10000 as ham10000
import lib.data.formats.isic2019 as isic2019
import lib.data.formats.isic2020 as isic2020
import lib.data.formats.isic2024 as isic2024
import lib.data.formats.milk10k as milk10k
import lib.data.formats.scin as scin
from lib.data.formats.common import Raw


@dataclass(frozen=True)
class FormatSpec:
    """What the pipeline needs to know about one data format."""
    name: str
    read: Callable[[Path, str, dict], Raw]       # (root, split, cfg["data"]) -> Raw
    task: str                                    # default task
    classes: tuple[str, ...] | None              # default classes (None: from the data)
    has_test: Callable[[Path, dict], bool]       # is there a test release under this root?
    id_col: str = "lesion_id"                    # submission id column
    target_col: str | None = None                # binary submission: one column with this name
    extra_cols: tuple[tuple[str, float], ...] = field(default_factory=tuple)  # constant columns (ISIC 2019 UNK)


def _files(*names: str) -> Callable[[Path, dict], bool]:
    def has(root: Path, d: dict) -> bool:
        return any((root / n).exists() for n in names)
    return has


def _generic_has_test(root: Path, d: dict) -> bool:
    return bool(d["generic"]["test_csv"])


def _specs() -> tuple[FormatSpec, ...]:
    return (
        FormatSpec("milk10k", milk10k.read, "multiclass", tuple(milk10k.MILK_CLASSES),
                   _files("MILK10k_Test_Metadata.csv")),
        FormatSpec("ham10000", ham10000.read, "multiclass", tuple(ham10000.HAM_CLASSES),
                   _files("HAM10000_test_metadata.csv"), id_col="image"),
        FormatSpec("isic2019", isic2019.read, "multiclass", tuple(isic2019.ISIC2019_CLASSES),
                   _files("ISIC_2019_Test_Metadata.csv"), id_col="image", extra_cols=(("UNK", 0.0),)),
        FormatSpec("isic2020", isic2020.read, "binary", ("malignant",), _files("test.csv"),
                   id_col="image_name", target_col="target"),
        FormatSpec("isic2024", isic2024.read, "binary", ("malignant",), _files("test-metadata.csv"),
                   id_col="isic_id", target_col="target"),
        FormatSpec("scin", scin.read, "multilabel", None, scin.has_test, id_col="case_id"),
        FormatSpec("generic", generic.read, "multiclass", None, _generic_has_test),
    )


def format_names() -> list[str]:
    return [s.name for s in _specs()]


def get_format(name: str) -> FormatSpec:
    for s in _specs():
        if s.name == name:
            return s
    raise ConfigError(f"config: data.format '{name}' unknown (one of {format_names()})")


def read_split(cfg: dict, split: str) -> Raw | None:
    """Read the train split (required) or the test split (None when absent)."""
    d = cfg["data"]
    root = Path(d["root"] if split == "train" else (d["test_root"] or d["root"]))
    if not root.is_dir():
        raise PipelineError(f"data folder not found: {root}")
    spec = get_format(d["format"])
    if split == "test" and not spec.has_test(root, d):
        return None
    raw = spec.read(root, split, d)
    if d["task"]:
        raw.task = d["task"]
    if raw.task == "binary" and len(raw.classes) != 1:
        raise PipelineError(f"data.task binary needs exactly one class (the positive one), got {raw.classes}")
    return raw
