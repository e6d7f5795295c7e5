"""The fault battery's shared parts: the five stages as tiny commands on the shipped MILK10k sample, a
runner (optionally SIGKILLed at a given second), the checks that no final file is a partial one, an
output snapshot compared with tolerance 0, and the record of every fault tried (for
tools/fault_battery.py: one JSON line per fault when FAULT_BATTERY_LOG names a file)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
CFG = "configs/milk10k_sample"
COMMON = ["folds.n_splits=3", "cache.size=64", "threads=2", "cache.workers=1"]
TINY_ENC = "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64}]"
TINY_TRAIN = ["train.model.arch=test_efficientnet", "train.model.weights=null", "train.img_size=64",
              "train.epochs=1", "train.batch_size=16"]
STAGES: dict[str, list[str]] = {
    "01": ["01_preprocess.py", "-c", f"{CFG}/base.yaml"],
    "02": ["02_train_fold.py", "-c", f"{CFG}/train_fusion.yaml", *TINY_TRAIN],
    "03": ["03_extract_features.py", "-c", f"{CFG}/stack.yaml", TINY_ENC],
    "04": ["04_stack.py", "-c", f"{CFG}/stack.yaml", TINY_ENC, "stack.xgb.n_estimators=20", "stack.pca_components=8"],
    "05": ["05_submit.py", "-c", f"{CFG}/submit.yaml"],
}
# JSON keys / CSV columns whose values are timings, versions or the machine: not compared between runs;
# and a fold's `fingerprint` (summary.json), a hash that includes the prep folder's absolute path
VOLATILE = {"seconds", "wall_seconds", "created_utc", "images_per_s", "fold_seconds", "versions", "parts",
            "threads", "wall_seconds_note", "train_seconds", "fingerprint"}
# files compared by existence only: binary models/exports (their outputs are the compared tables),
# the report and its figures (they carry the stage times)
EXISTENCE_ONLY = (".pt", ".onnx", ".png", ".md")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    killed: bool
    seconds: float
    work_seconds: float   # from the stage's first log line (its work begins: imports and config done) to its end


def command(stage: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, *STAGES[stage], "--output", str(out), *COMMON, *extra]


def _drain(stream, lines: list[str], first: list[float]) -> None:
    for line in stream:
        if not first and " INFO " in line:
            first.append(time.perf_counter())
        lines.append(line)


def run_stage(stage: str, out: Path, *extra: str, kill_at: float | None = None, timeout: float = 600,
              env: dict | None = None) -> Result:
    """Run one stage as its own process group. `kill_at`: SIGKILL the group that many seconds after the
    stage's first log line (its work, not the interpreter's start-up), if it is still running."""
    t0 = time.perf_counter()
    p = subprocess.Popen(command(stage, out, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env={**os.environ, **(env or {})})
    so: list[str] = []
    se: list[str] = []
    first: list[float] = []
    threads = [threading.Thread(target=_drain, args=(p.stdout, so, []), daemon=True),
               threading.Thread(target=_drain, args=(p.stderr, se, first), daemon=True)]
    for t in threads:
        t.start()
    killed = False
    while p.poll() is None:
        now = time.perf_counter()
        if now - t0 > timeout or (kill_at is not None and first and now - first[0] >= kill_at):
            os.killpg(p.pid, signal.SIGKILL)
            killed = kill_at is not None
            break
        time.sleep(0.02)
    p.wait()
    for t in threads:
        t.join()
    end = time.perf_counter()
    if not killed and p.returncode == -signal.SIGKILL:
        raise TimeoutError(f"stage {stage} ran over {timeout} s")
    return Result(p.returncode, "".join(so), "".join(se), killed, end - t0, end - (first[0] if first else t0))


def must_pass(r: Result, what: str) -> Result:
    assert r.rc == 0 and not r.killed, f"{what} failed ({r.rc}):\n{r.stderr[-3000:]}"
    return r


def one_line_error(r: Result, *names: str) -> str:
    """Exit 2, stderr's last line `error: ...` naming each of `names`, no stack trace; the line."""
    assert r.rc == 2, f"exit {r.rc}, expected 2:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, r.stderr[-3000:]
    for n in names:
        assert n in errs[0], (n, errs[0])
    return errs[0]


# ----------------------------------------------------------------------------- output checks
def final_files(out: Path) -> list[Path]:
    """Every final (not hidden, not temporary) file under `out`."""
    return sorted(p for p in out.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                        p.relative_to(out).parts))


def temp_files(out: Path) -> list[Path]:
    """Leftover temporary files of interrupted atomic writes (hidden `.<name>.*.tmp` / `.tmp` names)."""
    return sorted(p for p in out.rglob(".*") if p.is_file() and (p.suffix in (".tmp", ".npy")
                                                                  or ".tmp" in p.name))


def unreadable(path: Path) -> str | None:
    """Why a final file does not parse (None when it does): parquet, csv, json, yaml, npy, jpg."""
    try:
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".npy":
            np.load(path, mmap_mode="r")
        elif path.suffix == ".jpg":
            data = path.read_bytes()
            if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
                return "not a complete JPEG"
    except Exception as e:  # noqa: BLE001 - any failure is a corrupt file
        return f"{type(e).__name__}: {e}"
    return None


def corrupt_files(out: Path) -> dict[str, str]:
    """Final files that do not parse (a half-written file in place of a final one)."""
    bad = {str(p.relative_to(out)): unreadable(p) for p in final_files(out)}
    return {k: v for k, v in bad.items() if v}


def _strip(o, roots: tuple[str, ...]):
    if isinstance(o, dict):
        return {k: _strip(v, roots) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [_strip(v, roots) for v in o]
    if isinstance(o, str):
        for r in roots:
            o = o.replace(r, "<OUT>")
    return o


def content(path: Path, roots: tuple[str, ...]):
    """What is compared of a file: tables as DataFrames, JSON/YAML without volatile keys (the output
    root replaced by a marker), arrays, bytes of cached images; None for existence-only files."""
    if path.suffix in EXISTENCE_ONLY:
        return None
    if unreadable(path):
        return path.read_bytes()
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype={"lesion_id": str})
        return df.drop(columns=[c for c in df.columns if c in VOLATILE])
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text()), roots)
    if path.suffix == ".yaml":
        return _strip(yaml.safe_load(path.read_text()), roots)
    if path.suffix == ".npy":
        return np.load(path)
    return path.read_bytes()


def snapshot(out: Path, *aliases: Path) -> dict:
    """Every final file's compared content; `out` and `aliases` (roots its files were copied from) read
    as one marker in JSON / YAML strings."""
    roots = tuple(str(r) for r in (out, *aliases))
    return {str(p.relative_to(out)): content(p, roots) for p in final_files(out)}


def _same(a, b) -> bool:
    if isinstance(a, pd.DataFrame):
        if not isinstance(b, pd.DataFrame):
            return False
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)  # tolerance 0
        except AssertionError:
            return False
        return True
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return a == b


def differences(ref: dict, got: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Files missing, extra or different in `got` vs `ref` (paths starting with `ignore` skipped)."""
    keys = [k for k in sorted(set(ref) | set(got)) if not k.startswith(ignore)]
    return [f"{k}: {'missing' if k not in got else 'extra' if k not in ref else 'differs'}"
            for k in keys if k not in got or k not in ref or not _same(ref[k], got[k])]


def owner(rel: str) -> str:
    """The stage that writes a file (path relative to the output root)."""
    parts = rel.split("/")
    if parts[0] == "prep":
        return "03" if len(parts) > 3 and parts[2] in ("features", "onnx", "trunks") else "01"
    if parts[0] == "sample_stack":
        return "03" if parts[1] == "features" else "04"
    return {"sample_fusion": "02", "sample_submit": "05"}[parts[0]]


def copy_outputs(src: Path, dst: Path, stages: list[str]) -> Path:
    """A fresh output root holding the files that `stages` wrote in `src` (e.g. the reference run)."""
    for p in final_files(src):
        rel = str(p.relative_to(src))
        if owner(rel) in stages:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)
    return dst


def of_stage(snap: dict, stages: list[str]) -> dict:
    return {k: v for k, v in snap.items() if owner(k) in stages}


def kill_points(stage: str, seconds: float, n: int, seed: int) -> list[float]:
    """`n` seeded kill times, in seconds after the stage's first log line, spread over its reference
    work time (5% to 95% of it)."""
    rng = np.random.default_rng([seed, int(stage)])
    return sorted(float(t) for t in rng.uniform(0.05 * seconds, 0.95 * seconds, n))


# ----------------------------------------------------------------------------- the record
def record(stage: str, fault: str, survived: bool, files_lost: int = 0, note: str = "") -> None:
    """Append one fault to FAULT_BATTERY_LOG (a JSON-lines file) when set; tests call it before asserting."""
    path = os.environ.get("FAULT_BATTERY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "fault": fault, "survived": bool(survived),
                                "files_lost": int(files_lost), "note": note}) + "\n")
