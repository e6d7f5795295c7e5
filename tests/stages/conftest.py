"""Shared stage fixtures: two stage-01 preps of the shipped sample (same lesions, folds from two seeds,
images read in place: cache.mode none) and a factory of fake members (OOF/test probabilities + a
manifest, as 02 would write them) so that 04/05 contract tests need no training."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config.load import load_config
from lib.core import artifacts as A
from lib.core.io import ID, write_parquet
from lib.data.dataset import load_dataset
from lib.stages import prepare

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "input" / "milk10k_sample"


def stage_cfg(out: Path, exp: str, *overrides: str, folds_seed: int = 42) -> dict:
    """A config on the sample writing under `out`; folds seed 42 -> prep `p42`, other seeds -> `p<seed>`."""
    return load_config(None, [f"data.root={SAMPLE}", f"paths.output={out}", f"paths.prep={out / f'p{folds_seed}'}",
                              f"folds.seed={folds_seed}", "cache.mode=none", "cache.workers=1", f"exp={exp}",
                              "threads=1", *overrides])


@pytest.fixture(scope="module")
def preps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output root holding two preps of the same data: p42 (folds seed 42) and p7 (seed 7)."""
    out = tmp_path_factory.mktemp("stages")
    prepare.run(stage_cfg(out, "prep"))
    prepare.run(stage_cfg(out, "prep", folds_seed=7))
    return out


def _probs(train: pd.DataFrame, classes: list[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = train[[f"y_{c}" for c in classes]].to_numpy(float) if f"y_{classes[0]}" in train else 0.0
    logits = 2.0 * y + rng.normal(0, 1.0, (len(train), len(classes)))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.fixture
def make_member() -> Callable[..., Path]:
    """make_member(cfg, exp, seed=0, manifest=True): `<output>/<exp>/` with oof.parquet, test.parquet
    and (unless manifest=False) a stage-02 manifest made on cfg's prep."""
    def make(cfg: dict, exp: str, seed: int = 0, manifest: bool = True) -> Path:
        info, train, test = load_dataset(cfg)
        classes = info["classes"]
        folder = A.exp_folder(cfg, exp)
        for df, name, s in ((train, A.OOF, seed), (test, A.TEST, seed + 1)):
            tab = pd.DataFrame(_probs(df, classes, s), columns=classes)
            tab.insert(0, ID, df[ID].to_numpy())
            write_parquet(tab, folder / name)
        (folder / A.fold_name(0)).mkdir(exist_ok=True)  # looks like a 02 experiment
        if manifest:
            A.write_manifest(dict(cfg, exp=exp), folder, "train", [A.input_record(cfg, A.prep_dir(cfg), "prep")],
                             12.5)
        return folder
    return make
