"""One strict YAML config system: defaults + experiment file (+ `base:` includes) + CLI overrides.

Every key must exist in the defaults (unknown keys are an error, with a suggestion). Lists of
dicts (e.g. `features.encoders`) are checked against their item schema. The resolved config is
saved next to every artifact.
"""
from __future__ import annotations

import copy
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from lib.config.schema import LIST_ITEMS, defaults
from lib.core.errors import PipelineError

log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-3`), which PyYAML keeps as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
    if d["format"] not in ("milk10k", "ham10000", "isic2019", "isic2020", "isic2024", "scin", "generic"):
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


