"""THE artifact module: the name of every file a stage writes, where another experiment lives, how a
stage reads another stage's outputs, and the per-folder `manifest.json` that ties them together.

Layout (every path below `paths.output`, `<prep>` = `paths.prep`):

- `<prep>/`  (01): train.parquet, test.parquet, folds.csv, fold_summary.csv, meta_encoders.json,
  dataset.json, config.yaml, manifest.json, images/<cache tag>/, features/<enc>-<key>/ (03's cache)
- `<exp>/`   (02): fold{k}/ (checkpoint.pt, model.pt, history.csv, oof.parquet logits,
  test_logits.parquet, summary.json, config.yaml); oof.parquet, test.parquet, cv.json, config.yaml,
  manifest.json
- `<exp>/features/` (03): <enc>_<split>.parquet + .json, config.yaml, manifest.json
- `<exp>/`   (04): oof.parquet, test.parquet, cv.json, importance.parquet, heads/, config.yaml, manifest.json
- `<exp>/`   (05): oof.parquet, test.parquet (blended probabilities), submission.csv, thresholds.json,
  cv.json, report.md, report/*.png, config.yaml, manifest.json

A manifest records the stage, the config fingerprint, the sha1 of the folds.csv used, the folders it
read (with their fingerprints), the UTC time and the stage's wall seconds. Stages 04 and 05 refuse
a member made on another folds.csv (`require_same_folds`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import (
    ID,
    assert_same_ids,
    merge_on_id,
    read_json,
    read_table,
    write_json,
    write_yaml,
)

# ----------------------------------------------------------------------------- file names

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
CV = "cv.json"
OOF = "oof.parquet"                  # experiment: OOF probabilities; fold{k}/: the fold's OOF logits
TEST = "test.parquet"                # experiment: test probabilities
# 01 (prep folder)
PREP_TRAIN = "train.parquet"
PREP_TEST = "test.parquet"
FOLDS = "folds.csv"
FOLD_SUMMARY = "fold_summary.csv"
META_ENCODERS = "meta_encoders.json"
DATASET = "dataset.json"
IMAGES = "images"
# 02 (fold folders)
FOLD_TEST_LOGITS = "test_logits.parquet"
FOLD_SUMMARY_JSON = "summary.json"
HISTORY = "history.csv"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
# 03
FEATURES = "features"
# 04
IMPORTANCE = "importance.parquet"
HEADS = "heads"
# 05
SUBMISSION = "submission.csv"
THRESHOLDS = "thresholds.json"
REPORT = "report.md"
REPORT_DIR = "report"

CV_SCHEMA_VERSION = 1
CHECKPOINT_VERSION = 1               # `format_version` of fold{k}/checkpoint.pt and model.pt
MANIFEST_SCHEMA_VERSION = 1
STAGES = {  # stage name -> (number, script)
    "prepare": ("01", "01_preprocess.py"),
    "train": ("02", "02_train_fold.py"),
    "features": ("03", "03_extract_features.py"),
    "stack": ("04", "04_stack.py"),
    "submit": ("05", "05_submit.py"),
}
# config keys that change how fast or where a stage runs, not what it computes (not fingerprinted)
RUNTIME_KEYS = ("exp", "device", "threads", "paths", "cache.workers", "features.workers", "features.batch_size",
                "train.workers", "train.log_every", "train.folds", "train.keep_checkpoint", "submit.report",
                "stack.xgb.n_jobs", "stack.xgb.device", "stack.lgbm.n_jobs")


def features_file(enc: str, split: str, ext: str = "parquet") -> str:
    """`<enc>_<split>.<ext>` inside an experiment's features/ folder."""
    return f"{enc}_{split}.{ext}"


def head_file(kind: str, head: str) -> str:
    """`<kind>_<head>.parquet` inside heads/ (kind: oof | test)."""
    return f"{kind}_{head}.parquet"


def fold_name(k: int) -> str:
    return f"fold{k}"


# ----------------------------------------------------------------------------- folders


def exp_folder(cfg: dict, exp: str | None = None) -> Path:
    """THE way to find an experiment's folder: `<paths.output>/<exp>` (exp None: this config's own)."""
    return Path(cfg["paths"]["output"]) / str(cfg["exp"] if exp is None else exp)


def exp_dir(cfg: dict) -> Path:
    """This config's own experiment folder, `<paths.output>/<exp>/`."""
    return exp_folder(cfg)


def prep_dir(cfg: dict) -> Path:
    return Path(cfg["paths"]["prep"])


def features_dir(cfg: dict, exp: str | None = None) -> Path:
    """`<paths.output>/<exp>/features/` (exp None: this config's own)."""
    return exp_folder(cfg, exp) / FEATURES


def fold_dir(cfg: dict, k: int, exp: str | None = None) -> Path:
    return exp_folder(cfg, exp) / fold_name(k)


def save_config(cfg: dict, folder: str | Path, name: str = CONFIG) -> Path:
    """Save the resolved config next to the artifacts it produced."""
    return write_yaml(cfg, Path(folder) / name)


# ----------------------------------------------------------------------------- fingerprints


def config_fingerprint(cfg: dict) -> str:
    """12 hex digits of sha1 over the resolved config minus RUNTIME_KEYS."""
    c = copy.deepcopy(cfg)
    for key in RUNTIME_KEYS:
        *parents, last = key.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folds_sha1(cfg: dict) -> str | None:
    """sha1 of `<prep>/folds.csv` (None when absent)."""
    p = prep_dir(cfg) / FOLDS
    return file_sha1(p) if p.exists() else None


def lib_version() -> str:
    """`lib.__version__` when set, else the repository's short git commit (+dirty), else 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    v = getattr(sys.modules.get("lib"), "__version__", None)
    if v:
        return str(v)
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "lib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git-{sha}{'-dirty' if dirty else ''}" if sha else "unknown"


def versions() -> dict:
    """python, torch (only when already imported: never imported for this) and lib."""
    out = {"python": platform.python_version(), "lib": lib_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = str(getattr(torch, "__version__", "unknown"))
    return out


# ----------------------------------------------------------------------------- manifests


def read_manifest(folder: str | Path) -> dict | None:
    p = Path(folder) / MANIFEST
    return read_json(p) if p.exists() else None


def _rel(cfg: dict, folder: Path) -> str:
    return Path(os.path.relpath(Path(folder).resolve(), Path(cfg["paths"]["output"]).resolve())).as_posix()


def input_record(cfg: dict, folder: str | Path, role: str) -> dict:
    """What a manifest says about a folder it read: role, exp, stage, path (relative to paths.output),
    fingerprint, folds sha1 and wall seconds from that folder's own manifest (None when it has none)."""
    folder = Path(folder)
    m = read_manifest(folder) or {}
    return {"role": role, "exp": m.get("exp", folder.name), "stage": m.get("stage"), "path": _rel(cfg, folder),
            "fingerprint": m.get("fingerprint"), "folds_sha1": m.get("folds_sha1"),
            "wall_seconds": m.get("wall_seconds")}


def write_manifest(cfg: dict, folder: str | Path, stage: str, inputs: list[dict], wall_seconds: float,
                   exp: str | None = None, extra: dict | None = None) -> Path:
    """Write `<folder>/manifest.json` atomically (call it last, once the stage's outputs exist)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    m = {"schema_version": MANIFEST_SCHEMA_VERSION, "stage": stage, "script": STAGES[stage][1],
         "exp": str(cfg["exp"] if exp is None else exp), "path": _rel(cfg, Path(folder)),
         "fingerprint": config_fingerprint(cfg), "folds_sha1": folds_sha1(cfg), "inputs": inputs,
         "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "wall_seconds": round(float(wall_seconds), 2), "versions": versions(), **(extra or {})}
    return write_json(m, Path(folder) / MANIFEST)


def guess_stage(folder: Path) -> str:
    """The stage that most likely wrote a folder without a manifest (for the error message)."""
    if (folder / SUBMISSION).exists() or (folder / THRESHOLDS).exists():
        return "submit"
    if (folder / IMPORTANCE).exists() or (folder / HEADS).is_dir():
        return "stack"
    if folder.name == FEATURES or any(folder.glob("*_train.parquet")):
        return "features"
    return "train" if any(folder.glob("fold*")) else "stack"


def require_same_folds(cfg: dict, folder: str | Path, role: str, exp: str) -> dict:
    """The folder's manifest, or MissingArtifactError when it has none or was made on another folds.csv."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        script = STAGES[guess_stage(folder)][1]
        raise MissingArtifactError(f"{role} '{exp}' ({folder}) has no {MANIFEST} (made before manifests existed "
                                   f"or not finished): rerun {script} for '{exp}' on these folds")
    ours, theirs = folds_sha1(cfg), m.get("folds_sha1")
    if theirs != ours:
        script = STAGES.get(m.get("stage"), ("", "its stages"))[1]
        raise MissingArtifactError(
            f"{role} '{exp}' was made on another folds.csv ({folder / MANIFEST} says {str(theirs)[:8]} vs "
            f"{str(ours)[:8]} in {prep_dir(cfg)}): rerun {script} for '{exp}' (and the stages it reads) on these folds")
    return m


def stage_times(cfg: dict, inputs: list[dict]) -> list[dict]:
    """Manifests reachable from `inputs` (and what they read, transitively), one row per folder:
    number, stage, exp, wall_seconds, created_utc; in stage order, each followed by its manifest's
    `parts` (sub-steps, `part: True`, already inside the stage's time). Folders without one are skipped."""
    root = Path(cfg["paths"]["output"])
    seen: dict[str, dict] = {}
    todo = [i["path"] for i in inputs]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        m = read_manifest(root / rel)
        if m is None:
            continue
        seen[rel] = m
        todo += [i["path"] for i in m.get("inputs", [])]
    rows = []
    for rel, m in sorted(seen.items(), key=lambda kv: (STAGES.get(kv[1]["stage"], ("?",))[0], kv[1].get("exp", kv[0]))):
        row = {"number": STAGES.get(m["stage"], ("?",))[0], "stage": m["stage"], "exp": m.get("exp", rel),
               "wall_seconds": m.get("wall_seconds"), "created_utc": m.get("created_utc")}
        rows.append(row)
        rows += [{**row, "stage": f"· {name}", "wall_seconds": secs, "part": True}
                 for name, secs in (m.get("parts") or {}).items()]
    return rows


def cv_document(stage: str, exp: str, task: str, metrics: dict, **extras: object) -> dict:
    """The one cv.json schema: schema_version, stage, exp, task, the cv_summary metrics at top level,
    then stage-specific blocks under named keys (02 `training`, 04 `stack`, 05 `submit`)."""
    clash = set(extras) & (set(metrics) | {"schema_version", "stage", "exp", "task"})
    if clash:
        raise ValueError(f"cv.json extras clash with common keys: {sorted(clash)}")
    return {"schema_version": CV_SCHEMA_VERSION, "stage": stage, "exp": str(exp), **metrics, "task": task, **extras}


# ----------------------------------------------------------------------------- readers


def load_features(cfg: dict, names: list[str], split: str, exp: str | None = None) -> pd.DataFrame | None:
    """Read `<exp>/features/<name>_<split>.parquet` for each name and join on lesion_id (test: None
    when absent)."""
    folder = features_dir(cfg, exp)
    out = None
    for n in names:
        p = folder / features_file(n, split)
        if not p.exists():
            if split == "test":
                return None
            raise MissingArtifactError(f"{p} not found: run 03_extract_features.py for encoder '{n}' first")
        if out is None:
            require_same_folds(cfg, folder, "features", f"{exp or cfg['exp']}/{FEATURES}")
        df = read_table(p)
        out = df if out is None else merge_on_id(out, df, f"features {n} {split}")
    return out


def feature_info(cfg: dict, name: str, split: str = "train", exp: str | None = None) -> dict:
    return read_json(features_dir(cfg, exp) / features_file(name, split, "json"))


def load_member(cfg: dict, exp: str, train: pd.DataFrame, test: pd.DataFrame | None,
                classes: list[str], role: str = "member") -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A member's OOF and test probabilities, rows in train/test order, ids asserted; refused
    (MissingArtifactError) when it is missing, has no manifest or was made on another folds.csv."""
    folder = exp_folder(cfg, exp)
    if not (folder / OOF).exists():
        raise MissingArtifactError(f"{role} '{exp}': {folder / OOF} not found: run 02_train_fold.py or "
                                   f"04_stack.py for '{exp}' first")
    require_same_folds(cfg, folder, role, exp)
    oof = read_table(folder / OOF)
    missing = [c for c in classes if c not in oof.columns]
    if missing:
        raise PipelineError(f"{folder / OOF} lacks class columns {missing}")
    assert_same_ids(train, oof, f"member {exp}: OOF vs train lesions")
    oof = oof.set_index(ID).loc[train[ID].to_numpy()].reset_index()[[ID, *classes]]
    te = None
    if test is not None:
        te = read_table(folder / TEST)
        assert_same_ids(test, te, f"member {exp}: test predictions vs test lesions")
        te = te.set_index(ID).loc[test[ID].to_numpy()].reset_index()[[ID, *classes]]
    return oof, te
