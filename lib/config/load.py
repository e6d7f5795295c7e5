"""One strict YAML config system: defaults + experiment file (+ `base:` includes) + CLI overrides.

Every key must exist in the schema (unknown keys are an error, with a suggestion). Lists of
mappings (e.g. `features.encoders`) are checked against their item schema. Every value is then
checked against its spec (`lib.config.schema`), before any stage does work: a bad one is a
`ConfigError` naming the key, the value and what is allowed. The resolved config is saved next to
every artifact.
"""
from __future__ import annotations

import copy
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from lib.config.schema import SCHEMA, defaults
from lib.config.spec import ListOf, Record, check_section, show
from lib.core.errors import ConfigError

log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads the exponent floats PyYAML (YAML 1.1) keeps as strings: `1e-3`, `1.5e2`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge(base: dict, over: dict, schema: dict, where: str = "") -> dict:
    """THE config merge: deep-merge `over` into a copy of `base`, rejecting keys absent from `schema`
    (a section of specs; `where` names it in errors: `stack` for SCHEMA["stack"])."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}.{k}" if where else k
        if k not in schema:
            raise ConfigError(f"config: unknown key '{path}'{_suggest(k, list(schema))}")
        sch = schema[k]
        if isinstance(sch, dict):
            if v is None:  # an empty YAML section (`cache:` with every sub-key commented out)
                v = {}
            if not isinstance(v, dict):
                raise ConfigError(f"config: '{path}' is a section; set its keys ({', '.join(list(sch)[:6])}, ...), "
                                  f"not a value ({v!r})")
            out[k] = merge(out.get(k) or {}, v, sch, path)
        elif isinstance(sch, ListOf) and isinstance(sch.item, Record) and isinstance(v, (list, type(None))):
            out[k] = [_list_item(item, sch.item, f"{path}[{i}]") for i, item in enumerate(v or [])]
        else:
            out[k] = v
    return out


def _list_item(item: Any, record: Record, where: str) -> dict:
    """One item of a list of mappings, filled from its item schema (a bare string fills `shorthand`)."""
    if isinstance(item, str) and record.shorthand:
        item = {record.shorthand: item}
    if not isinstance(item, dict):
        record.fail(item, where)
    return merge(record.default, item, record.fields, where)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving `base:` (a path relative to the file, or a list of them)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config: circular base include at {path}")
    if not path.exists():
        raise ConfigError(f"config: file not found: {path}")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path}: top level must be a mapping")
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
        raise ConfigError(f"config override '{text}' must look like key.sub=value")
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
    """Defaults <- YAML file (with bases) <- CLI overrides; strict on keys and values; paths derived."""
    cfg = defaults()
    if path is not None:
        cfg = merge(cfg, _read_yaml(Path(path)), SCHEMA, "")
    for o in overrides or []:
        cfg = merge(cfg, parse_override(o), SCHEMA, "")
    return resolve(cfg)


def resolve(cfg: dict) -> dict:
    """Check every value, then fill derived values (prep dir)."""
    validate(cfg)
    cfg = copy.deepcopy(cfg)
    if cfg["paths"]["prep"] is None:
        name = Path(str(cfg["data"]["root"]).rstrip("/")).name or "data"
        cfg["paths"]["prep"] = str(Path(cfg["paths"]["output"]) / "prep" / name)
    return cfg


def validate(cfg: dict) -> None:
    """Every value against its spec, then the few rules that tie keys together; ConfigError on the first bad one."""
    check_section(SCHEMA, cfg)
    names = [e["name"] for e in cfg["features"]["encoders"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _bad("features.encoders", names, f"items with distinct names (repeated: {', '.join(dup)})")
    s = cfg["stack"]
    hw = s["head_weights"]
    if hw is not None and (set(hw) != set(s["heads"]) or sum(hw.values()) <= 0):
        _bad("stack.head_weights", hw, f"a weight >= 0 for each of stack.heads ({', '.join(s['heads'])}) "
                                       "with a positive sum, or null")
    d = cfg["data"]
    if d["task"] == "binary" and d["classes"] is not None and len(d["classes"]) != 1:
        _bad("data.classes", d["classes"], "exactly one class (the positive one) for data.task binary")
    m = cfg["train"]["model"]
    if m["kind"] == "fusion" and m["fusion"] == "xattn" and m["xattn_dim"] % m["xattn_heads"]:
        _bad("train.model.xattn_dim", m["xattn_dim"],
             f"a multiple of train.model.xattn_heads ({m['xattn_heads']})")


def _bad(where: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config: {where} = {show(value)} is not allowed: expected {expected}")
