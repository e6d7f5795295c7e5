"""Every config under configs/ loads and validates; recipe folders keep their options in ablations/,
each listed in docs/ablations.md, each reading only experiments its recipe makes; comments say what a
file is, not its history. (tests/e2e/test_ablations.py runs each ablation.)"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from lib.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
ABLATIONS = sorted(CONFIGS.glob("*/ablations/*.yaml"))
RECIPE_FILES = ("base.yaml", "train_*.yaml", "stack*.yaml", "submit.yaml")  # what run_all.sh runs
TABLE = ROOT / "docs" / "ablations.md"


def _rel(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg["exp"] != "default" or path.name == "base.yaml", f"{_rel(path)} names no exp"


def test_recipe_top_levels_hold_only_what_run_all_runs() -> None:
    stray = [_rel(p) for p in CONFIGS.glob("*/*.yaml")
             if not any(fnmatch.fnmatch(p.name, pat) for pat in RECIPE_FILES)]
    assert not stray, f"options belong in <recipe>/ablations/ (docs/ablations.md): {stray}"
    assert not list(CONFIGS.rglob("variant_*.yaml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=_rel)
def test_ablation_is_named_by_its_stage_and_listed(path: Path) -> None:
    assert path.name.split("_")[0] in ("train", "stack", "submit"), path.name
    rows = [ln for ln in TABLE.read_text().splitlines() if ln.startswith("| `")]
    recipe = path.parent.parent.name
    assert any(f"`{path.name}`" in r or f"`configs/{recipe}/ablations/{path.name}`" in r for r in rows), \
        f"{_rel(path)} has no row in docs/ablations.md"


def test_every_file_the_table_names_exists() -> None:
    text = TABLE.read_text()
    named = set(re.findall(r"`configs/([\w/]+\.yaml)`", text))
    section = "milk10k_dev"
    for ln in text.splitlines():  # bare names in the milk10k_dev table
        if ln.startswith("## `configs/"):
            section = ln.split("/")[1]
        m = re.match(r"\| `(\w+\.yaml)` \|", ln)
        if m:
            named.add(f"{section}/ablations/{m.group(1)}")
    missing = sorted(n for n in named if not (CONFIGS / n).is_file())
    assert named and not missing, missing


def _exps(recipe: str) -> set[str]:
    files = [*CONFIGS.glob(f"{recipe}/*.yaml"), *CONFIGS.glob(f"{recipe}/ablations/*.yaml")]
    return {load_config(f)["exp"] for f in files if f.name != "base.yaml"}


@pytest.mark.parametrize("path", ABLATIONS, ids=_rel)
def test_ablation_reads_only_experiments_its_recipe_makes(path: Path) -> None:
    cfg = load_config(path)
    needs = {*cfg["stack"]["oof_exps"], *cfg["features"]["from_exps"], *(m["exp"] for m in cfg["submit"]["members"])}
    if cfg["stack"]["features_exp"]:
        needs.add(cfg["stack"]["features_exp"])
    missing = needs - _exps(path.parent.parent.name)
    assert not missing, f"{_rel(path)} reads experiments no file of its recipe makes: {sorted(missing)}"


def test_exp_names_are_unique_within_a_recipe() -> None:
    for recipe in sorted({p.parent.parent.name for p in ABLATIONS}):
        files = [*CONFIGS.glob(f"{recipe}/*.yaml"), *CONFIGS.glob(f"{recipe}/ablations/*.yaml")]
        exps = [load_config(f)["exp"] for f in files if f.name != "base.yaml"]
        assert len(exps) == len(set(exps)), (recipe, sorted(exps))


def test_config_comments_say_what_a_file_is_not_its_history() -> None:
    history = re.compile(r"issue \d+|old recipe|instead of the|no longer|variant_", re.I)
    bad = [f"{_rel(p)}:{i}" for p in ALL for i, ln in enumerate(p.read_text().splitlines(), 1)
           if ln.lstrip().startswith("#") and history.search(ln)]
    assert not bad, bad


def test_every_benchmarks_section_the_table_names_exists() -> None:
    bench = (ROOT / "BENCHMARKS.md").read_text()
    heads = [ln.lstrip("#").strip() for ln in bench.splitlines() if ln.startswith("#")]
    rows = [ln for ln in TABLE.read_text().splitlines() if ln.startswith("| `")]
    quoted = [q for r in rows for q in re.findall(r'"([^"]+)"', r.rsplit("|", 2)[-2])]
    missing = [q for q in quoted if not any(h.startswith(q) for h in heads)]
    assert quoted and not missing, missing
