"""Stage 06: score a test release with a bundle (`tools/export_bundle.py` wrote it), offline, without
the training data: raw test images -> submission.csv.

    python 06_predict.py --bundle BUNDLE --test-data RELEASE [--output output] [--exp predict] [device=cuda ...]

Before anything is written the bundle is verified (lib/core/bundle.py: versions, checksums, no file
that can run code), the test release is read and validated like 01 reads it (its layout must be the
bundle's data format; it must hold every modality the bundle needs), and every encoder's installed
weights must be the bundle's (sha256). Then, in `<output>/<exp>/`, the recipe's test side runs as the
training run ran it: 01's image cache and metadata encoding (the bundle's encoders), 02's fold models
with their TTA, 03's encoders and fine-tuned tails, 04's fitted stackers, 05's blend, priors and
decision; `submission.csv` is written last (atomically). Every cache is keyed by the test rows, so a
rerun on the same release reuses the finished parts. Only runtime settings may be overridden
(`device`, `threads`, `features.runtime`, batch sizes, workers).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.config.load import load_config
from lib.core import artifacts as A
from lib.core import bundle as B
from lib.core.errors import PipelineError
from lib.core.io import ID, atomic_path, read_json, write_json, write_parquet
from lib.core.runtime import check_writable, torch_device
from lib.data import formats
from lib.evaluation.ensemble import deployed_probs
from lib.stages import features as F
from lib.stages import stack as S
from lib.stages.bundle import artifact_versions
from lib.stages.prepare import prepare_test
from lib.stages.submit import write_test_submission
from lib.training import distributed as D
from lib.training.inference import (
    fold_test_pass,
    load_bundled_fold_model,
    prediction_table,
    probabilities,
)

log = logging.getLogger(__name__)

RUNTIME_OVERRIDES = ("device", "threads", "features.runtime", "features.batch_size", "features.workers",
                     "train.workers", "train.batch_size", "cache.workers", "stack.xgb.device", "stack.xgb.n_jobs",
                     "stack.lgbm.n_jobs", "paths.weights_cache")


def _config(path: Path, test_root: Path, work: Path, overrides: list[str]) -> dict:
    """A bundled config with this run's paths (the work folder, the test release) and runtime overrides."""
    bad = [o for o in overrides if o.split("=", 1)[0].strip() not in RUNTIME_OVERRIDES]
    if bad:
        raise PipelineError(f"override {bad[0]!r}: at predict time only runtime settings may change "
                            f"({', '.join(RUNTIME_OVERRIDES)}); the rest is the bundle's")
    paths = [f'paths.output="{work}"', f'paths.prep="{work / A.BUNDLE_PREP}"', f'data.root="{test_root}"',
             f'data.test_root="{test_root}"', "paths.weights_cache=null"]
    return load_config(path, [*paths, *overrides])


def _node_config(bundle: Path, node: dict, test_root: Path, work: Path, overrides: list[str]) -> dict:
    folder = bundle / node["exp"] / (A.FEATURES if node["kind"] == "features" else "")
    return _config(folder / A.CONFIG, test_root, work, overrides)


def read_release(base: dict, info: dict, test_root: Path) -> formats.Raw:
    """The test release, read and validated by its format's reader; refused when it is not a release of
    the bundle's format, lacks a modality the bundle needs or names other classes."""
    fmt = info["format"]
    raw = formats.read_split(base, "test")
    if raw is None:
        raise PipelineError(f"{test_root}: no {fmt} test release there (the bundle was trained on {fmt} data; "
                            "docs/data_formats.md lists each layout)")
    missing = [m for m in info["modalities"] if m not in raw.modalities]
    if missing:
        raise PipelineError(f"{test_root}: the test release lacks the {missing} images the bundle needs "
                            f"(it has {raw.modalities})")
    if fmt == "generic" and list(raw.classes) != list(info["classes"]):
        raise PipelineError(f"{test_root}: the test release's classes {raw.classes} are not the bundle's {info['classes']}")
    if len(raw.table) == 0:
        raise PipelineError(f"{test_root}: the test release has no rows")
    return raw


def check_encoders(bundle: Path, nodes: list[dict], cfgs: dict[str, dict]) -> None:
    """Every bundled encoder's weights are installed and are the bundle's (checked before any write)."""
    with tempfile.TemporaryDirectory() as tmp:
        for node in nodes:
            if node["kind"] != "features":
                continue
            for enc in cfgs[_key(node)]["features"]["encoders"]:
                rec = read_json(bundle / node["exp"] / A.FEATURES / enc["name"] / A.BUNDLE_ENCODER)
                F.check_bundled_encoder(enc, rec, Path(tmp) / A.WEIGHTS_SHA256)


def _key(node: dict) -> str:
    return f"{node['exp']}/{A.FEATURES}" if node["kind"] == "features" else node["exp"]


def _predict_train(cfg: dict, info: dict, test: pd.DataFrame, src: Path, d: D.Dist) -> dict[int, np.ndarray]:
    """A 02 experiment's test side: each bundled fold model's TTA logits (`fold{k}/test_logits.parquet`),
    and `test.parquet`, the mean of their probabilities, as 02 writes them; returns {fold: logits}."""
    classes, task, dst = list(info["classes"]), info["task"], A.exp_dir(cfg)
    per_fold: dict[int, np.ndarray] = {}
    for fdir in sorted(src.glob(A.fold_name("*"))):
        meta = read_json(fdir / A.BUNDLE_MODEL_JSON)
        k = int(meta["fold"])
        out = dst / A.fold_name(k)
        out.mkdir(parents=True, exist_ok=True)
        model = load_bundled_fold_model(fdir / A.BUNDLE_MODEL, meta, d.device)
        logits = fold_test_pass(cfg, info, test, model, meta, out, d, f"{cfg['exp']} fold {k} test")
        per_fold[k] = logits.astype(np.float64)   # float32 -> float64 is exact: what the parquet holds
        write_parquet(prediction_table(test[ID], per_fold[k], classes), out / A.FOLD_TEST_LOGITS)
    probs = [probabilities(per_fold[k], task) for k in sorted(per_fold)]
    write_parquet(prediction_table(test[ID], np.mean(probs, 0), classes), dst / A.TEST)
    return per_fold


def _predict_submit(cfg: dict, info: dict, test: pd.DataFrame, src: Path, work: Path) -> Path:
    """05's test side: the bundled deployment (weights, priors, rule, thresholds) on the members' test
    predictions; writes `<exp>/test.parquet`, `<exp>/submission.csv` and `<work>/submission.csv`."""
    dep = read_json(src / A.DEPLOYMENT)
    tests = [A.load_member_test(cfg, m["exp"], test, dep["classes"]) for m in dep["members"]]
    te = deployed_probs(dep, tests)
    out = A.exp_dir(cfg)
    write_parquet(te, out / A.TEST)
    write_test_submission(cfg, info, test, te, dep, out)
    final = work / A.SUBMISSION
    with atomic_path(final) as tmp:
        shutil.copyfile(out / A.SUBMISSION, tmp)
    return final


def _run_node(node: dict, cfg: dict, info: dict, test: pd.DataFrame, bundle: Path, work: Path,
              logits: dict[str, dict[int, np.ndarray]]) -> None:
    kind, src = node["kind"], bundle / node["exp"]
    if kind == "train":
        logits[node["exp"]] = _predict_train(cfg, info, test, src, D.Dist(device=torch_device(cfg)))
    elif kind == "features":
        F.predict_test(cfg, info, test, src / A.FEATURES, logits)
    elif kind == "stack":
        te = S.predict_test(cfg, info, test, src / A.STACKER_DIR)
        write_parquet(te, A.exp_dir(cfg) / A.TEST)
    else:
        _predict_submit(cfg, info, test, src, work)


def run(bundle: str | Path, test_root: str | Path, output: str | Path, exp: str = "predict",
        overrides: list[str] | None = None) -> dict:
    """Stage 06 (see the module docstring); returns the run's summary (`<output>/<exp>/predict.json`)."""
    t0 = time.time()
    bundle, test_root, work = Path(bundle), Path(test_root), Path(output) / exp
    doc = B.open_bundle(bundle, artifact_versions())
    nodes = doc["recipe"]["experiments"]
    base = _config(bundle / A.BUNDLE_PREP / A.CONFIG, test_root, work, list(overrides or []))
    cfgs = {_key(n): _node_config(bundle, n, test_root, work, list(overrides or [])) for n in nodes}
    info = read_json(bundle / A.BUNDLE_PREP / A.DATASET)
    raw = read_release(base, info, test_root)
    check_encoders(bundle, nodes, cfgs)
    check_writable(work)                      # the first write: everything above only read
    test = prepare_test(base, raw, read_json(bundle / A.BUNDLE_PREP / A.META_ENCODERS))
    info["n_test"] = len(test)
    write_parquet(test, work / A.BUNDLE_PREP / A.PREP_TEST)
    write_json(info, work / A.BUNDLE_PREP / A.DATASET)
    write_json(read_json(bundle / A.BUNDLE_PREP / A.META_ENCODERS), work / A.BUNDLE_PREP / A.META_ENCODERS)
    parts: dict[str, float] = {"prepare": round(time.time() - t0, 1)}
    logits: dict[str, dict[int, np.ndarray]] = {}
    for node in nodes:
        t1, cfg = time.time(), cfgs[_key(node)]
        _run_node(node, cfg, info, test, bundle, work, logits)
        folder = A.exp_dir(cfg) / (A.FEATURES if node["kind"] == "features" else "")
        A.write_manifest(cfg, folder, "predict", [], time.time() - t1, exp=_key(node),
                         extra={"bundle": str(bundle.resolve()), "kind": node["kind"]})
        parts[f"{node['kind']} {_key(node)}"] = round(time.time() - t1, 1)
    wall = time.time() - t0
    summary = {"bundle": str(bundle.resolve()), "bundle_sha256": B.sha256_file(bundle / B.BUNDLE_JSON),
               "test_release": str(test_root.resolve()), "n_test": len(test), "seconds": round(wall, 1),
               "seconds_per_1000": round(wall * 1000 / max(len(test), 1), 1), "parts": parts,
               "submission": str(work / A.SUBMISSION), "determinism": A.determinism(base), "versions": A.versions()}
    write_json(summary, work / A.PREDICT_JSON)
    log.info("06_predict: %d lesions scored with %s in %.1f s (%.1f s per 1,000): %s", len(test), bundle, wall,
             summary["seconds_per_1000"], work / A.SUBMISSION)
    return summary
