#!/usr/bin/env python
"""Run the fault battery (tests/faults, e2e included) and print its figures for BENCHMARKS.md: per
stage, the faults tried, how many were survived and the files lost.

    python tools/fault_battery.py                 # the whole battery (~5 min on 2 idle cores)
    python tools/fault_battery.py -k kill         # a part of it (pytest -k expression)
    python tools/fault_battery.py --log faults.jsonl --details

Each test of tests/faults records every fault it tries (tests/faults/battery.py `record`) as one JSON
line in the file named by FAULT_BATTERY_LOG; this tool sets it, runs pytest and tabulates the lines.
A fault is survived when the stage stopped in one line with exit 2 or recomputed, nothing half
written was left, and the next run gave the reference outputs; files lost counts files missing,
corrupt or different from the reference afterwards. Exit code: pytest's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kill", "corrupt", "disk full", "read-only", "bad config", "bad", "folds.csv", "ground truth")


def kind(fault: str) -> str:
    """The family of a recorded fault (the table's columns group by it)."""
    for k in KINDS:
        if fault.startswith(k) or k in fault:
            return {"bad config": "bad config value", "bad": "bad input", "folds.csv": "corrupt",
                    "ground truth": "message"}.get(k, k)
    return "other"


def table(rows: list[dict]) -> str:
    """Markdown: one row per stage (faults tried, survived, files lost, by family), then the total."""
    by: dict[str, dict] = defaultdict(lambda: {"tried": 0, "survived": 0, "lost": 0, "kinds": defaultdict(int)})
    for r in rows:
        s = by[r["stage"]]
        s["tried"] += 1
        s["survived"] += bool(r["survived"])
        s["lost"] += int(r["files_lost"])
        s["kinds"][kind(r["fault"])] += 1
    lines = ["| stage | faults tried | survived | files lost | of which |", "|---|---:|---:|---:|---|"]
    for st in sorted(by):
        s = by[st]
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["kinds"].items()))
        lines.append(f"| {st} | {s['tried']} | {s['survived']} | {s['lost']} | {kinds} |")
    tot = [sum(s[k] for s in by.values()) for k in ("tried", "survived", "lost")]
    lines.append(f"| all | {tot[0]} | {tot[1]} | {tot[2]} | |")
    return "\n".join(lines)


def details(rows: list[dict]) -> str:
    return "\n".join(f"{'ok  ' if r['survived'] else 'FAIL'} {r['stage']:>5} {r['fault']}: {r['note']}"
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default=None, help="pytest -k expression (a part of the battery)")
    p.add_argument("--log", default=None, help="keep the JSON-lines record here (default: a temp file)")
    p.add_argument("--details", action="store_true", help="also print one line per fault")
    ns = p.parse_args(argv)
    log = Path(ns.log) if ns.log else Path(tempfile.mkstemp(prefix="faults_", suffix=".jsonl")[1])
    log.write_text("")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", "-m", "e2e or not e2e"]
    cmd += ["-k", ns.k] if ns.k else []
    rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FAULT_BATTERY_LOG": str(log)}).returncode
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print(table(rows))
    if ns.details:
        print(details(rows))
    if not ns.log:
        log.unlink()
    return rc


if __name__ == "__main__":
    sys.exit(main())
