"""THE artifact module: the name of every file a stage writes, where another experiment lives, how a
stage reads another stage's outputs, and the per-folder `manifest.json` that ties them together.

Layout (every path below `paths.output`, `<prep>` = `paths.prep`):

- `<prep>/`  (01): train.parquet, test.parquet, folds.csv, fold_summary.csv, meta_encoders.json,
  dataset.json, config.yaml, manifest.json, images/<cache tag>/, features/<enc>-<key>/ (03's cache:
  <split>-<rows>.parquet + .json, `rows_file`, named by the fingerprint of the rows it holds),
  features/ft_<enc>-<key>/ (03's fine-tune cache: train.parquet + .json, fold{k}.safetensors,
  test-<rows>.parquet + .json), trunks/<enc>-<key>/ (03's trunk cache of a cut encoder:
  <split>_<modality>.npy + .json holding the rows' fingerprint, `trunk_file`)
- `<exp>/`   (02): fold{k}/ (checkpoint.pt, model.pt, history.csv, oof.parquet logits,
  test_logits.parquet + test_logits.json (the fingerprint of the test rows they are for),
  summary.json, config.yaml); oof.parquet, test.parquet, cv.json, config.yaml, manifest.json
- `<exp>/features/` (03): <enc>_<split>.parquet + .json, config.yaml, manifest.json
- `<exp>/`   (04): oof.parquet, test.parquet, cv.json, importance.parquet, heads/, config.yaml, manifest.json,
  stacker/ (the fitted stackers: stacker.json + fold{k}/arrays.safetensors and boosters, `stacker_model_file`)
- `<exp>/`   (05): oof.parquet, test.parquet (blended probabilities), submission.csv, thresholds.json,
  cv.json, report.md, report/*.png, model_card.json, model_card.md, config.yaml, manifest.json

A manifest records the stage, the config fingerprint, the sha1 of the folds.csv used, the folders it
read (with their fingerprints), the UTC time, the stage's wall seconds, the library versions and
what else decides bit-for-bit results (`determinism`: device, threads, torch's CPU capability, CPU). Stages 04 and 05 refuse
a member made on another folds.csv (`require_same_folds`).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
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
FOLD_TEST_ROWS = "test_logits.json"  # fold{k}/: {"rows": fingerprint of the test rows, "n"} (02)
FOLD_SUMMARY_JSON = "summary.json"
HISTORY = "history.csv"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
# 03
FEATURES = "features"
TRUNKS = "trunks"
FOLD_ONNX = "model"                  # fold{k}/model-<key>.onnx: a finished fold model in ONNX Runtime (02)
ONNX = "onnx"                        # <prep>/onnx/<encoder>-<key>.onnx (03, ONNX Runtime)
WEIGHTS_SHA256 = "weights_sha256.json"  # <prep>/: sha256 of resolved weights files, by path + size + mtime
# 04
IMPORTANCE = "importance.parquet"
HEADS = "heads"
# 04 fitted stackers (lib.tabular.stacker_io): <exp>/stacker/stacker.json + fold{k}/ (arrays, boosters)
STACKER_DIR = "stacker"
STACKER_JSON = "stacker.json"        # format version, fingerprint of the training inputs, the layout, file names
STACKER_ARRAYS = "arrays.safetensors"  # fold{k}/: imputer / scaler / PCA / logistic regression arrays
STACKER_FORMAT_VERSION = 1           # `format_version` of stacker.json
STACKER_MODEL_EXT = {"xgb": "ubj", "lgbm": "txt"}  # XGBoost's UBJSON, LightGBM's text model format
# 05
SUBMISSION = "submission.csv"
THRESHOLDS = "thresholds.json"
DEPLOYMENT = "deployment.json"     # what 05 applies to test predictions: members, weights, priors, rule, thresholds
REPORT = "report.md"
REPORT_DIR = "report"
FIG_CONFUSION = "confusion.png"      # report/ figures
FIG_F1 = "f1_per_class.png"
FIG_THRESHOLDS = "threshold_curves.png"
FIG_TRAINING = "training_curves.png"
FIG_CV_SPREAD = "cv_spread.png"
FIG_SUBGROUPS = "subgroups.png"      # report/: the model card's per-subgroup forest plot
MODEL_CARD_JSON = "model_card.json"  # 05: what the model was trained on and how it measures, per subgroup
MODEL_CARD_MD = "model_card.md"
# bundles (tools/export_bundle.py writes one, 06_predict.py reads it; lib/core/bundle.py: bundle.json)
BUNDLE_JSON = "bundle.json"          # <bundle>/: versions, recipe, CV figures, every file with its sha256
BUNDLE_MODEL = "model.safetensors"   # <bundle>/<exp>/fold{k}/: a fold model's weights (02)
BUNDLE_MODEL_JSON = "model.json"     # ... and what rebuilds it (model config, arguments, spec, tabular state)
BUNDLE_PREP = "prep"                 # <bundle>/prep/: dataset.json, meta_encoders.json, config.yaml (01)
PREDICT_JSON = "predict.json"        # <output>/<exp>/ of 06: the bundle, the release, times
BUNDLE_ENCODER = "encoder.json"      # <bundle>/<exp>/features/<enc>/: the encoder's spec and identity (03)

CV_SCHEMA_VERSION = 1
CHECKPOINT_VERSION = 1               # `format_version` of fold{k}/checkpoint.pt and model.pt
MANIFEST_SCHEMA_VERSION = 1
VERSIONED = {  # module -> its distribution name(s): the libraries a manifest records the versions of
    "numpy": ("numpy",), "pandas": ("pandas",), "sklearn": ("scikit-learn",), "torch": ("torch",),
    "timm": ("timm",), "safetensors": ("safetensors",), "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "xgboost": ("xgboost",), "lightgbm": ("lightgbm",),
}
STAGES = {  # stage name -> (number, script)
    "prepare": ("01", "01_preprocess.py"),
    "train": ("02", "02_train_fold.py"),
    "features": ("03", "03_extract_features.py"),
    "stack": ("04", "04_stack.py"),
    "submit": ("05", "05_submit.py"),
    "predict": ("06", "06_predict.py"),
}
# config keys that change how fast or where a stage runs, not what it computes (not fingerprinted)
RUNTIME_KEYS = ("exp", "device", "threads", "paths", "cache.workers", "features.workers", "features.batch_size",
                "train.workers", "train.log_every", "train.folds", "train.keep_checkpoint", "submit.report",
                "stack.xgb.n_jobs", "stack.xgb.device", "stack.lgbm.n_jobs")


def features_file(enc: str, split: str, ext: str = "parquet") -> str:
    """`<enc>_<split>.<ext>` inside an experiment's features/ folder."""
    return f"{enc}_{split}.{ext}"


def cache_file(split: str, ext: str = "parquet") -> str:
    """`<split>.<ext>` inside one cache folder of 03, `<prep>/features/<enc>-<key>/`."""
    return f"{split}.{ext}"


TEST_BY_FOLD = "test_by_fold"   # the split name of per-fold-model test features (03): <name>_test_by_fold.parquet
FOLD_MODEL = "fold_model"       # its column: the fold whose model made the row


def rows_file(split: str, rows: str, ext: str = "parquet") -> str:
    """`<split>-<rows[:16]>.<ext>`: a 03 cache file named by the fingerprint of the rows it holds
    (`lib.data.dataset.table_fingerprint`), so another test release never reads it."""
    return f"{split}-{rows[:16]}.{ext}"


def finetune_fold_file(k: int) -> str:
    """`fold{k}.safetensors`: fold k's fine-tuned tail + head in a fine-tune cache folder (03)."""
    return f"{fold_name(k)}.safetensors"


def trunk_file(split: str, modality: str) -> str:
    """`<split>_<modality>.npy`: a trunk cache's activations (03, cut encoders)."""
    return f"{split}_{modality}.npy"


def head_file(kind: str, head: str) -> str:
    """`<kind>_<head>.parquet` inside heads/ (kind: oof | test)."""
    return f"{kind}_{head}.parquet"


def stacker_model_file(head: str, seed_index: int, class_index: int) -> str:
    """`<head>_s<seed index>_c<class index>.<ubj|txt>`: one binary booster of a fitted stacker (fold{k}/)."""
    return f"{head}_s{seed_index}_c{class_index}.{STACKER_MODEL_EXT[head]}"


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


def config_fingerprint(cfg: dict, scope: str = "experiment") -> str:
    """12 hex digits of sha1 over what decides a result, never RUNTIME_KEYS (how fast or where it runs).

    scope `experiment` (a manifest's fingerprint): the whole resolved config. scope `fold` (a fold's
    checkpoint.pt, model.pt and summary.json, see lib/training/fold.py): only what decides one fold
    model: `train`, `seed`, the folds settings, the data format and the prep folder the fold read
    (a path, so a runtime key for a manifest but the fold's input here); the other sections
    (features, stack, submit) do not invalidate a trained fold. scope `stack` (04's fitted stackers):
    the `stack` section and the top-level `seed`."""
    c = copy.deepcopy(cfg)
    for key in RUNTIME_KEYS:
        *parents, last = key.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    if scope == "fold":
        c = {"train": c["train"], "seed": c["seed"], "prep": str(cfg["paths"]["prep"]), "folds": c["folds"],
             "format": c["data"]["format"]}
    elif scope == "stack":
        c = {"stack": c["stack"], "seed": c["seed"]}
    elif scope != "experiment":
        raise ValueError(f"unknown fingerprint scope {scope!r} (experiment | fold | stack)")
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes (`sha1`: folds.csv and inputs; `sha256`: bundle files)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_sha1(path: str | Path) -> str:
    return file_digest(path, "sha1")


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


def _installed(dists: tuple[str, ...]) -> str | None:
    """The version of the first installed distribution of `dists` (read from its metadata: nothing imported)."""
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """python, lib and each library of VERSIONED that is installed: the imported module's `__version__`
    when it is loaded, else the installed distribution's (no library is imported for this)."""
    out = {"python": platform.python_version(), "lib": lib_version()}
    for name, dists in VERSIONED.items():
        mod = sys.modules.get(name)
        v = getattr(mod, "__version__", None) if mod is not None else None
        v = v or _installed(dists)
        if v:
            out[name] = str(v)
    return out


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`, as `lscpu` shows it), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def determinism(cfg: dict) -> dict:
    """What decides bit-for-bit results besides the config, the data and the code: the device (resolved
    when torch is loaded), torch's compute threads and CPU capability (the SIMD kernels it dispatches
    to), the GPU, the usable cores, the CPU model and the OS. torch is never imported for this: a stage
    that did not load it records null threads and capability."""
    torch = sys.modules.get("torch")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"device": str(cfg.get("device", "auto")), "threads": None, "cpu_capability": None,
           "cores": cores, "cpu": cpu_model(), "machine": platform.machine(), "platform": platform.platform()}
    if torch is None:
        return out
    if out["device"] == "auto":
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    out["threads"] = int(torch.get_num_threads())
    out["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    if out["device"].startswith("cuda") and torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
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
         "wall_seconds": round(float(wall_seconds), 2), "versions": versions(), "determinism": determinism(cfg),
         **(extra or {})}
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


def _member_table(cfg: dict, exp: str, name: str, rows: pd.DataFrame, classes: list[str], role: str,
                  hint: str, what: str) -> pd.DataFrame:
    """`<output>/<exp>/<name>` (a member's OOF or test probabilities), rows in `rows` order, ids asserted;
    refused (MissingArtifactError) when missing, without a manifest or made on another folds.csv."""
    folder = exp_folder(cfg, exp)
    if not (folder / name).exists():
        raise MissingArtifactError(f"{role} '{exp}': {folder / name} not found: run 02_train_fold.py or "
                                   f"04_stack.py for '{exp}'{hint} first")
    require_same_folds(cfg, folder, role, exp)
    df = read_table(folder / name)
    missing = [c for c in classes if c not in df.columns]
    if missing:
        raise PipelineError(f"{folder / name} lacks class columns {missing}")
    assert_same_ids(rows, df, f"member {exp}: {what}")
    return df.set_index(ID).loc[rows[ID].to_numpy()].reset_index()[[ID, *classes]]


def load_member(cfg: dict, exp: str, train: pd.DataFrame, test: pd.DataFrame | None,
                classes: list[str], role: str = "member") -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A member's OOF and test probabilities, rows in train/test order, ids asserted; refused
    (MissingArtifactError) when it is missing, has no manifest or was made on another folds.csv."""
    oof = _member_table(cfg, exp, OOF, train, classes, role, "", "OOF vs train lesions")
    return oof, None if test is None else load_member_test(cfg, exp, test, classes, role)


def load_member_test(cfg: dict, exp: str, test: pd.DataFrame, classes: list[str],
                     role: str = "member") -> pd.DataFrame:
    """A member's test probabilities alone (`<output>/<exp>/test.parquet`), rows in `test` order, ids
    asserted; refused (MissingArtifactError) when missing, without a manifest or made on another folds.csv."""
    return _member_table(cfg, exp, TEST, test, classes, role, " with the test split",
                         "test predictions vs test lesions")
