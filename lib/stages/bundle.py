"""Export a trained recipe as a bundle: one self-contained folder that `06_predict.py` scores new test
releases with, offline, without the training data (`tools/export_bundle.py` is the command).

Starting from a finished 05 experiment, the export walks what it blended (05 members -> 04 stackers
-> their 03 features and OOF members -> 02 fold models) and copies every fitted part, in safe
formats only (lib/core/bundle.py refuses anything else when the bundle is read):

    bundle.json                       format + artifact versions, data format, classes, modalities, the
                                      recipe's experiments in run order, CV figures, library versions,
                                      every file with its size and sha256
    model_card.md, model_card.json    (when 05 wrote them) what it was trained on, CV and subgroup figures
    prep/                             dataset.json, meta_encoders.json (01's encoders), config.yaml
    <exp>/config.yaml, cv.json        every experiment's resolved config and CV figures
    <02 exp>/fold{k}/                 model.safetensors + model.json (what rebuilds it)
    <03 exp>/features/                config.yaml; <encoder>/encoder.json (spec + weights identity);
                                      ft_<encoder>/fold{k}.safetensors + train.json (fine-tuned tails)
    <04 exp>/stacker/                 the fitted per-fold stackers (lib.tabular.stacker_io)
    <05 exp>/deployment.json          blend weights, priors, decision rule, thresholds

Encoder weights are not copied (they are installed packages or files named by the config; their
sha256 is recorded and checked at predict time). The bundle is written to a temporary folder and
renamed into place when complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lib.core import artifacts as A
from lib.core import bundle as B
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import read_json, write_json
from lib.core.runtime import check_writable
from lib.evaluation.ensemble import DEPLOYMENT_VERSION
from lib.training.cached_trunk import FINETUNE_FORMAT_VERSION
from lib.training.inference import fold_model_state
from lib.vision.trunk import TRUNK_FORMAT_VERSION

log = logging.getLogger(__name__)


def artifact_versions() -> dict[str, int]:
    """The artifact format versions a bundle records and the predict path requires equal."""
    return {"model": A.CHECKPOINT_VERSION, "trunk": TRUNK_FORMAT_VERSION, "finetune": FINETUNE_FORMAT_VERSION,
            "stacker": A.STACKER_FORMAT_VERSION, "deployment": DEPLOYMENT_VERSION, "cv_schema": A.CV_SCHEMA_VERSION}


def saved_config(folder: Path) -> dict:
    """The resolved config a stage saved next to its artifacts."""
    path = folder / A.CONFIG
    if not path.exists():
        raise MissingArtifactError(f"{path} not found: {folder} is not a finished experiment")
    with open(path) as f:
        return yaml.safe_load(f)


def _kind(folder: Path) -> str:
    m = A.read_manifest(folder)
    if m is None:
        raise MissingArtifactError(f"{folder / A.MANIFEST} not found: {folder} is not a finished experiment")
    return str(m["stage"])


def recipe_graph(submit_dir: Path) -> list[dict]:
    """The experiments a 05 experiment depends on, in run order (02, 03, 04, then 05): each
    {"exp", "kind" (train | features | stack | submit), "features_exp" (stack only)}."""
    out_root = submit_dir.parent
    if _kind(submit_dir) != "submit":
        raise PipelineError(f"{submit_dir} is not a 05 experiment (its manifest says stage {_kind(submit_dir)!r})")
    order: dict[str, dict] = {}

    def visit(exp: str) -> None:
        if exp in order:
            return
        folder = out_root / exp
        kind, cfg = _kind(folder), saved_config(folder)
        if kind == "stack":
            fexp = cfg["stack"]["features_exp"] or exp
            fcfg = saved_config(out_root / fexp / A.FEATURES) if cfg["stack"]["features"] else None
            for e in [*(fcfg["features"]["from_exps"] if fcfg else []), *cfg["stack"]["oof_exps"]]:
                visit(e)
            if fcfg is not None and f"{fexp}/{A.FEATURES}" not in order:
                order[f"{fexp}/{A.FEATURES}"] = {"exp": fexp, "kind": "features"}
            order[exp] = {"exp": exp, "kind": "stack", "features_exp": fexp if fcfg is not None else None}
        elif kind == "train":
            order[exp] = {"exp": exp, "kind": "train"}
        else:
            raise PipelineError(f"{folder}: a {kind} experiment cannot be a member of a bundle (train or stack)")
    sub = saved_config(submit_dir)
    for m in sub["submit"]["members"]:
        visit(m["exp"])
    rank = {"train": 0, "features": 1, "stack": 2}
    nodes = sorted(order.values(), key=lambda n: rank[n["kind"]])  # stable: dependencies keep their order
    return [*nodes, {"exp": sub["exp"], "kind": "submit"}]


def _copy(src: Path, dst: Path) -> None:
    if not src.exists():
        raise MissingArtifactError(f"{src} not found: the experiment is not finished (rerun its stage)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _export_train(src: Path, dst: Path) -> int:
    """A 02 experiment's fold models as safetensors + model.json; returns the number of folds."""
    from safetensors.torch import save_file

    folds = sorted(p for p in src.glob(A.fold_name("*")) if (p / A.MODEL).exists())
    if not folds:
        raise MissingArtifactError(f"{src}: no fold{{k}}/{A.MODEL}: train it with 02_train_fold.py first")
    for f in folds:
        state, meta = fold_model_state(f / A.MODEL)
        (dst / f.name).mkdir(parents=True, exist_ok=True)
        save_file(state, str(dst / f.name / A.BUNDLE_MODEL))
        write_json(meta, dst / f.name / A.BUNDLE_MODEL_JSON)
    return len(folds)


def _finetune_cache(prep: Path, features: Path, name: str) -> Path:
    """The fine-tune cache folder (`<prep>/features/ft_<enc>-<key>/`) whose OOF logits 03 linked into
    the experiment's features folder (the same file)."""
    linked = features / A.features_file(name, "train")
    for cand in (prep / A.FEATURES).glob(f"{name}-*"):
        train = cand / A.cache_file("train")
        if train.exists() and linked.exists() and os.path.samefile(train, linked):
            return cand
    raise MissingArtifactError(f"{linked}: its fine-tune cache under {prep / A.FEATURES} (fold models) not found; "
                               "rerun 03_extract_features.py")


def _export_features(fdir: Path, dst: Path, prep: Path) -> None:
    """A 03 features folder: its config, each encoder's spec + identity, fine-tuned fold tails."""
    cfg = saved_config(fdir)
    _copy(fdir / A.CONFIG, dst / A.CONFIG)
    for enc in cfg["features"]["encoders"]:
        spec = read_json(fdir / A.features_file(enc["name"], "train", "json"))
        write_json({k: v for k, v in spec.items() if k not in ("rows", "seconds", "images_per_s", "trunk_cache")},
                   dst / enc["name"] / A.BUNDLE_ENCODER)
        if enc["finetune"]:
            name = f"ft_{enc['name']}"
            cache = _finetune_cache(prep, fdir, name)
            for p in sorted(cache.glob(A.finetune_fold_file("*"))):
                _copy(p, dst / name / p.name)
            _copy(cache / A.cache_file("train", "json"), dst / name / A.cache_file("train", "json"))


def _export_node(node: dict, out_root: Path, tmp: Path, prep: Path) -> None:
    exp, kind = node["exp"], node["kind"]
    src, dst = out_root / exp, tmp / exp
    if kind == "features":
        _export_features(src / A.FEATURES, dst / A.FEATURES, prep)
        return
    for name in (A.CONFIG, A.CV):
        _copy(src / name, dst / name)
    if kind == "train":
        node["folds"] = _export_train(src, dst)
    elif kind == "stack":
        if not (src / A.STACKER_DIR).is_dir():
            raise MissingArtifactError(f"{src / A.STACKER_DIR} not found: rerun 04_stack.py for '{exp}' (it keeps its fitted "
                                       "stackers since bundles exist)")
        shutil.copytree(src / A.STACKER_DIR, dst / A.STACKER_DIR)
    elif kind == "submit":
        _copy(src / A.DEPLOYMENT, dst / A.DEPLOYMENT)
        for name in (A.MODEL_CARD_JSON, A.MODEL_CARD_MD):
            if (src / name).exists():
                _copy(src / name, tmp / name)
        fig = src / A.REPORT_DIR / A.FIG_SUBGROUPS
        if fig.exists():
            _copy(fig, tmp / A.FIG_SUBGROUPS)


def _prep_of(submit_dir: Path) -> Path:
    """The prep folder the recipe was trained on (its saved `paths.prep`; relative to where it ran, else
    beside the output folder)."""
    prep = Path(saved_config(submit_dir)["paths"]["prep"])
    if not prep.is_dir() and not prep.is_absolute():
        prep = submit_dir.parent / A.BUNDLE_PREP / prep.name
    if not (prep / A.DATASET).exists():
        raise MissingArtifactError(f"{prep / A.DATASET} not found: the recipe's prep folder (01) is needed to export")
    return prep


def _summary(submit_dir: Path, prep: Path, graph: list[dict]) -> dict:
    """bundle.json without its file list."""
    info, cv = read_json(prep / A.DATASET), read_json(submit_dir / A.CV)
    base = saved_config(prep)
    sub = cv.get("submit", {})
    return {"format_version": B.BUNDLE_FORMAT_VERSION, "artifact_versions": artifact_versions(),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": A.versions(),
            "data": {k: info.get(k) for k in ("format", "task", "classes", "modalities", "cache_tag", "meta_columns",
                                              "monet_columns", "group")} | {"cache": base["cache"]},
            "n_train": info.get("n_train"), "recipe": {"submit": graph[-1]["exp"], "experiments": graph},
            "cv": {"expected_score": sub.get("expected_score"), "nesting": sub.get("expected_score_nesting"),
                   "decision": sub.get("decision"), "macro_dice_nested": sub.get("honest_cv", {}).get("macro_dice_nested"),
                   "bootstrap": sub.get("honest_cv", {}).get("bootstrap")}}


def export_bundle(submit_dir: str | Path, dest: str | Path) -> dict:
    """Write the bundle of the finished 05 experiment `submit_dir` to `dest` (absent or empty); returns
    bundle.json. Nothing is left at `dest` unless the whole bundle was written."""
    t0 = time.time()
    submit_dir, dest = Path(submit_dir), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PipelineError(f"{dest} exists and is not empty: give a new folder for the bundle")
    graph = recipe_graph(submit_dir)
    prep = _prep_of(submit_dir)
    check_writable(dest.parent)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in (A.DATASET, A.META_ENCODERS, A.CONFIG):
            _copy(prep / name, tmp / A.BUNDLE_PREP / name)
        for node in graph:
            _export_node(node, submit_dir.parent, tmp, prep)
        doc = {**_summary(submit_dir, prep, graph), "files": B.file_records(tmp)}
        doc["bytes"] = sum(r["bytes"] for r in doc["files"].values())
        write_json(doc, tmp / B.BUNDLE_JSON)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle %s: %d experiments, %d files, %.1f MB in %.1f s", dest, len(graph), len(doc["files"]),
             doc["bytes"] / 1e6, time.time() - t0)
    return doc
