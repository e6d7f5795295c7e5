"""Bad values for 02-05: every config key (walked from lib/config/schema.py's SCHEMA, list items'
record fields included) given a value of the wrong type and, where its spec has bounds or choices, an
out-of-range one, is refused at load with one `config: <key> ...` line (the scripts load the config
before any compute and turn the error into that line and exit 2: checked end to end in
test_bad_values_e2e.py)."""
from __future__ import annotations

import json

import pytest

from lib.config import load, schema
from lib.config.spec import Choice, Float, Int, ListOf, Nullable, OneOf, Pattern, Range, Record, Spec
from lib.core.errors import ConfigError
from tests.faults.battery import record

NAN = float("nan")
WRONG_TYPE = {"__bad__": [[]]}   # a mapping of a list of a list: no scalar, list, record or map spec takes it
# a list item's record is filled around the bad field so that only that field is wrong
ITEM_BASE = {"features.encoders": {"name": "a", "arch": "x"}, "submit.members": {"exp": "a"}}


def _inner(spec: Spec) -> Spec:
    return spec.inner if isinstance(spec, Nullable) else spec


def out_of_range(spec: Spec) -> list:
    """Values of the right type that the spec's bounds or choices refuse."""
    s, vals = _inner(spec), []
    if isinstance(s, (Int, Float)):
        lo = s.min if s.min is not None else getattr(s, "gt", None)
        hi = s.max if s.max is not None else getattr(s, "lt", None)
        vals += [lo - 1 if isinstance(s, Int) else lo - 0.5] if lo is not None else []
        vals += [hi + 1 if isinstance(s, Int) else hi + 0.5] if hi is not None else []
        vals += [] if isinstance(s, Int) else [NAN]
    elif isinstance(s, (Choice, Pattern)):
        vals.append("__no_such_choice__")
    elif isinstance(s, Range):
        vals.append([1, 0])
    elif isinstance(s, ListOf) and not isinstance(s.item, Record):
        vals += [[WRONG_TYPE]] + ([[]] if s.min_len else [])
    elif isinstance(s, OneOf):
        vals.append("__no_such_choice__")
    return vals


def leaves(section: dict, where: str = "") -> list[tuple[str, Spec]]:
    out = []
    for k, s in section.items():
        key = f"{where}.{k}" if where else k
        out += leaves(s, key) if isinstance(s, dict) else [(key, s)]
    return out


def cases() -> list[tuple[str, str, object]]:
    """(key shown in the error, override, value) for every key and list-item field of the schema."""
    out = []
    for key, spec in leaves(schema.SCHEMA):
        for v in [WRONG_TYPE, *out_of_range(spec)]:
            out.append((key, key, v))
        s = _inner(spec)
        if isinstance(s, ListOf) and isinstance(s.item, Record):
            for field, fspec in leaves(s.item.fields):
                for v in [WRONG_TYPE, *out_of_range(fspec)]:
                    item = json.loads(json.dumps(ITEM_BASE[key]))
                    *parents, last = field.split(".")
                    node = item
                    for p in parents:
                        node = node.setdefault(p, {})
                    node[last] = v
                    out.append((f"{key}[0].{field}", key, [item]))
    return out


CASES = cases()


def test_the_walk_covers_every_key():
    keys = {k for k, _, _ in CASES}
    assert len(keys) > 150 and {"train.epochs", "stack.xgb.subsample", "features.encoders[0].cut",
                                "submit.members[0].weight", "features.encoders[0].finetune_with.lr"} <= keys


@pytest.mark.parametrize("shown, key, value", CASES, ids=[f"{c[0]}={json.dumps(c[2])[:40]}" for c in CASES])
def test_every_bad_value_is_one_line_naming_its_key(shown, key, value):
    override = f"{key}={'.nan' if value is NAN else json.dumps(value)}"
    try:
        load.load_config(None, [override])
    except ConfigError as e:
        msg = str(e)
    else:
        msg = ""
    ok = msg.startswith("config: ") and "\n" not in msg and shown in msg
    record("02-05", "bad config value", ok, 0, f"{override[:60]} -> {msg[:80]}")
    assert msg, f"{override} was accepted"
    assert "\n" not in msg and msg.startswith("config: "), msg
    assert shown in msg, (shown, msg)
