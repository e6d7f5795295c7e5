#!/usr/bin/env python
"""Compare the prediction tables of two output folders (a refactor must keep a seeded run's numbers).

    python tools/compare_runs.py OUT_A OUT_B [--exps sample_fusion sample_stack sample_submit] [--tol 0]

For every experiment, every table present in both folders (oof.parquet, test.parquet, fold*/oof.parquet,
fold*/test_logits.parquet, submission.csv) is read, ids are checked to be the same in the same order,
and the largest absolute difference of the numeric columns is printed. Exit 1 when a table differs by
more than --tol or is missing on one side, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lib.core.errors import PipelineError  # noqa: E402
from tools._common import run_tool  # noqa: E402

TABLES = ("oof.parquet", "test.parquet", "submission.csv", "fold*/oof.parquet", "fold*/test_logits.parquet")


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def compare_table(a: Path, b: Path) -> tuple[bool, float]:
    """(same ids in the same order, max abs difference of the numeric columns)."""
    x, y = read(a), read(b)
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return False, float("inf")
    same_ids = x.iloc[:, 0].astype(str).tolist() == y.iloc[:, 0].astype(str).tolist()
    num = x.select_dtypes("number").columns
    diff = float(np.abs(x[num].to_numpy(float) - y[num].to_numpy(float)).max()) if len(num) and len(x) else 0.0
    return same_ids, diff


def compare(out_a: Path, out_b: Path, exps: list[str], tol: float) -> int:
    for d in (out_a, out_b):
        if not d.is_dir():
            raise PipelineError(f"{d} is not a folder")
    bad = 0
    for exp in exps:
        rels = sorted({p.relative_to(out_a / exp) for pat in TABLES for p in (out_a / exp).glob(pat)}
                      | {p.relative_to(out_b / exp) for pat in TABLES for p in (out_b / exp).glob(pat)})
        for rel in rels:
            a, b = out_a / exp / rel, out_b / exp / rel
            if not (a.exists() and b.exists()):
                print(f"{exp}/{rel}: only in {'A' if a.exists() else 'B'}")
                bad += 1
                continue
            ids, diff = compare_table(a, b)
            ok = ids and diff <= tol
            bad += not ok
            print(f"{exp}/{rel}: ids {'same' if ids else 'DIFFER'}, max abs diff {diff:.3g}{'' if ok else '  <-- differs'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_a", type=Path)
    p.add_argument("out_b", type=Path)
    p.add_argument("--exps", nargs="+", default=["sample_fusion", "sample_stack", "sample_submit"])
    p.add_argument("--tol", type=float, default=0.0)
    ns = p.parse_args(argv)
    return run_tool(lambda: compare(ns.out_a, ns.out_b, ns.exps, ns.tol))


if __name__ == "__main__":
    sys.exit(main())
