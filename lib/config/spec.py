"""Value specs: what a config key holds by default and which values it allows.

A schema is a nested dict: a dict is a section, a `Spec` is one key. `defaults_of(schema)` gives the
plain default dict; `check_section(schema, cfg)` raises `ConfigError` with one line naming the key,
the value and what is allowed, e.g. `config: train.epochs = 'four' is not allowed: expected an
integer >= 1`. Lists and mappings name the bad item (`train.tta[0]`, `stack.head_weights.xgb`).

Numbers: an int is accepted where a float is expected (never the reverse), booleans are never
numbers, and NaN / infinity are refused.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib.core.errors import ConfigError


def show(value: Any) -> str:
    """A value as the message shows it: YAML words for null / booleans, repr otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _num(x: float) -> str:
    return f"{x:g}"


def _bounds_text(lo: float | None, lo_open: bool, hi: float | None, hi_open: bool) -> str:
    """' >= 1', ' in [0, 1]', ' in (0, 1]', ... ('' when unbounded)."""
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _shape(value: Any) -> str:
    return "list" if isinstance(value, list) else "map" if isinstance(value, dict) else "scalar"


class Spec:
    """One key: its default and the values it allows. Subclasses define `ok` and `expected`."""

    default: Any = None
    shape = "scalar"          # what a value must look like for a container to report on its items

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def expected(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, where: str) -> None:
        if not self.ok(value):
            self.fail(value, where)

    def fail(self, value: Any, where: str, expected: str | None = None) -> None:
        raise ConfigError(f"config: {where} = {show(value)} is not allowed: expected {expected or self.expected()}")


# --------------------------------------------------------------------------- scalars
@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a boolean, not a float), optionally bounded: `Int(4, min=1)`."""
    default: int | None = None
    min: int | None = None
    max: int | None = None

    def ok(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max))

    def expected(self) -> str:
        return "an integer" + _bounds_text(self.min, False, self.max, False)


@dataclass(frozen=True)
class Float(Spec):
    """A finite number (ints accepted); `min`/`max` inclusive, `gt`/`lt` exclusive: `Float(1e-3, gt=0)`."""
    default: float | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt))

    def expected(self) -> str:
        lo, lo_open = (self.gt, True) if self.gt is not None else (self.min, False)
        hi, hi_open = (self.lt, True) if self.lt is not None else (self.max, False)
        return "a number" + _bounds_text(lo, lo_open, hi, hi_open)


def Prob(default: float | None = None) -> Float:  # noqa: N802 - reads like the other spec types
    """A probability in [0, 1]."""
    return Float(default, min=0, max=1)


@dataclass(frozen=True)
class Bool(Spec):
    """true or false (YAML booleans only; 0 / 1 / 'yes' strings are refused)."""
    default: bool | None = None

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)

    def expected(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Str(Spec):
    """A non-empty string (a name, a column, an architecture)."""
    default: str | None = None

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value != ""

    def expected(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class PathStr(Str):
    """A file or folder path (a non-empty string; existence is checked by the stage that reads it)."""

    def expected(self) -> str:
        return "a path (non-empty string)"


@dataclass(frozen=True)
class Choice(Spec):
    """One of a fixed set of values: `Choice("ce", LOSSES)`."""
    default: Any = None
    options: Sequence[Any] = ()

    def ok(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)

    def expected(self) -> str:
        names = [str(o) for o in self.options]
        return names[0] if len(names) == 1 else "one of " + ", ".join(names)


@dataclass(frozen=True)
class Pattern(Spec):
    """A string matching a regular expression (whole string), described in words: `Pattern("auto", r"...", "...")`."""
    default: str | None = None
    regex: str = ".*"
    words: str = ""

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def expected(self) -> str:
        return self.words or f"a string matching {self.regex}"


@dataclass(frozen=True)
class Range(Spec):
    """A pair [low, high] of numbers with low <= high, each within the bounds of `item`."""
    default: list | None = None
    item: Float = field(default_factory=Float)

    def ok(self, value: Any) -> bool:
        return (isinstance(value, list) and len(value) == 2 and all(self.item.ok(v) for v in value)
                and value[0] <= value[1])

    def expected(self) -> str:
        return f"a pair [low, high] with low <= high, each {self.item.expected()}"


# --------------------------------------------------------------------------- combinators
@dataclass(frozen=True)
class Nullable(Spec):
    """null or the inner spec; the default is null unless given: `Nullable(Str(), "pypi:efficientnet-lite0")`."""
    inner: Spec = field(default_factory=Spec)
    default: Any = None

    @property
    def shape(self) -> str:  # type: ignore[override]
        return self.inner.shape

    def expected(self) -> str:
        return "null or " + self.inner.expected()

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            _check_alternatives([self.inner], value, where, self.expected())


@dataclass(frozen=True, init=False)
class OneOf(Spec):
    """Any one of several specs: `OneOf(Choice("all", ["all"]), Int(min=0), ListOf(Int(min=0)), default="all")`."""
    alternatives: tuple[Spec, ...] = ()
    default: Any = None
    words: str = ""           # what is allowed, in words; default: the alternatives joined by ", or "

    def __init__(self, *alternatives: Spec, default: Any = None, words: str = "") -> None:
        object.__setattr__(self, "alternatives", tuple(alternatives))
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "words", words)

    @property
    def shape(self) -> str:  # type: ignore[override]
        """The container shape when exactly one alternative is a container (its messages name items)."""
        shapes = [a.shape for a in self.alternatives if a.shape != "scalar"]
        return shapes[0] if len(shapes) == 1 else "scalar"

    def expected(self) -> str:
        return self.words or ", or ".join(a.expected() for a in self.alternatives)

    def check(self, value: Any, where: str) -> None:
        _check_alternatives(list(self.alternatives), value, where, self.expected())


def _check_alternatives(alts: list[Spec], value: Any, where: str, expected: str) -> None:
    """Pass when one alternative accepts `value`. When exactly one alternative is a container of the
    value's shape (a list for a list), its own message names the bad item; otherwise name them all."""
    errors = []
    for a in alts:
        try:
            a.check(value, where)
            return
        except ConfigError as e:
            errors.append((a, e))
    same = [e for a, e in errors if a.shape != "scalar" and a.shape == _shape(value)]
    if len(same) == 1:
        raise same[0]
    raise ConfigError(f"config: {where} = {show(value)} is not allowed: expected {expected}")


@dataclass(frozen=True)
class ListOf(Spec):
    """A list whose items all match `item`: `ListOf(Choice(None, TTA_NAMES), ["id", "hflip"])`."""
    item: Spec = field(default_factory=Spec)
    default: list = field(default_factory=list)
    min_len: int = 0
    unique: bool = False
    shape = "list"

    def expected(self) -> str:
        size = "a non-empty list" if self.min_len == 1 else (
            f"a list of at least {self.min_len} items" if self.min_len else "a list")
        distinct = " of distinct items" if self.unique else ""
        return f"{size}{distinct}, each item {self.item.expected()}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_len:
            self.fail(value, where)
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")
        if self.unique and len({show(v) for v in value}) != len(value):
            self.fail(value, where)


@dataclass(frozen=True)
class MapOf(Spec):
    """A mapping with free keys: `MapOf(Str(), Str(), {"dermoscopic": "image"})` (modality -> column)."""
    key: Spec = field(default_factory=Str)
    value: Spec = field(default_factory=Spec)
    default: dict = field(default_factory=dict)
    min_len: int = 0
    shape = "map"

    def expected(self) -> str:
        size = "a non-empty mapping" if self.min_len else "a mapping"
        return f"{size} of key ({self.key.expected()}) -> value ({self.value.expected()})"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict) or len(value) < self.min_len:
            self.fail(value, where)
        for k, v in value.items():
            if not self.key.ok(k):
                self.fail(value, where, f"keys {self.key.expected()} (not {show(k)})")
            self.value.check(v, f"{where}.{k}")


@dataclass(frozen=True)
class Record(Spec):
    """A mapping with fixed keys, each with its own spec: the items of a list such as `features.encoders`.
    `shorthand` names the key a bare string fills (`submit.members: [expA]` -> `{exp: expA}`).
    `rules` ties its keys together: `rules(item, where)` raises ConfigError (`rule_fail`) after
    every key passed its own spec, so a bad item fails at load, before any compute."""
    fields: dict = field(default_factory=dict)
    shorthand: str | None = None
    rules: tuple[Callable[[dict, str], None], ...] = ()
    shape = "map"

    @property
    def default(self) -> dict:  # type: ignore[override]
        return defaults_of(self.fields)

    def expected(self) -> str:
        return f"a mapping with keys {', '.join(self.fields)}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, where)
        filled = {k: _filled_section(s, value.get(k), f"{where}.{k}") if isinstance(s, dict)
                  else value.get(k, s.default) for k, s in self.fields.items()}
        check_section(self.fields, filled, where)
        for rule in self.rules:
            rule(filled, where)


def rule_fail(where: str, key: str, item: dict, why: str) -> None:
    """A cross-key rule's one line: `config: features.encoders[1].finetune = true (item 'sk') is not
    allowed: finetune needs cut ...`."""
    name = f" (item {item['name']!r})" if isinstance(item.get("name"), str) else ""
    raise ConfigError(f"config: {where}.{key} = {show(item.get(key))}{name} is not allowed: {why}")


def _filled_section(schema: dict, value: Any, where: str) -> dict:
    """A sub-section of a list item (e.g. `finetune_with`) as given, strict, with its defaults filled."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"config: {where} = {show(value)} is not allowed: expected a mapping with keys "
                          f"{', '.join(schema)}")
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise ConfigError(f"config: unknown key '{where}.{unknown[0]}' (keys: {', '.join(schema)})")
    return {**defaults_of(schema), **value}


# --------------------------------------------------------------------------- schema walkers
def defaults_of(schema: dict) -> dict:
    """The plain default dict of a schema (fresh copies: callers may mutate it)."""
    return {k: defaults_of(s) if isinstance(s, dict) else copy.deepcopy(s.default) for k, s in schema.items()}


def check_section(schema: dict, values: dict, where: str = "") -> None:
    """Check every key of a merged section (all keys present) against its spec; the first bad one raises."""
    for k, s in schema.items():
        path = f"{where}.{k}" if where else k
        if isinstance(s, dict):
            check_section(s, values[k], path)
        else:
            s.check(values[k], path)
