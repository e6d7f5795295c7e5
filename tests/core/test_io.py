"""lib.core.io: atomic writes (nothing half-written, no temp files on failure), table readers, id guards."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib.core import io as IO
from lib.core.errors import PipelineError


def ids(*xs):
    return pd.DataFrame({"lesion_id": list(xs), "v": np.arange(len(xs), dtype=float)})


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- atomic writes
def test_atomic_path_moves_on_success(tmp_path):
    target = tmp_path / "sub" / "a.txt"           # parent created on demand
    with IO.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("hello")
        assert not target.exists()                 # invisible until the block succeeds
    assert target.read_text() == "hello"
    assert files(target.parent) == ["a.txt"]


def test_atomic_path_exception_leaves_no_temp_and_no_target(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with IO.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert files(tmp_path) == []


def test_atomic_path_exception_keeps_old_content(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with IO.atomic_path(target) as tmp:
            tmp.write_text("new but partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert files(tmp_path) == ["a.txt"]


def test_failed_writer_leaves_nothing(tmp_path):
    bad = pd.DataFrame({"lesion_id": ["a"], "x": [object()]})   # pyarrow cannot serialize this
    with pytest.raises(Exception):
        IO.write_parquet(bad, tmp_path / "t.parquet")
    with pytest.raises(TypeError):
        IO.write_json({"x": object()}, tmp_path / "t.json")
    assert files(tmp_path) == []


def test_writers_round_trip(tmp_path):
    df = pd.DataFrame({"lesion_id": ["007", "010"], "p": [0.25, np.nextafter(0.5, 1)]}, index=[5, 9])
    IO.write_parquet(df, tmp_path / "t.parquet")
    IO.write_csv(df, tmp_path / "t.csv")
    for name in ("t.parquet", "t.csv"):
        back = IO.read_table(tmp_path / name)
        assert back["lesion_id"].tolist() == ["007", "010"]   # ids stay strings (leading zeros kept)
        assert list(back.index) == [0, 1]
        assert back["p"].iloc[1] > 0.5
    IO.write_json({"a": np.arange(3), "b": tmp_path, "c": 1.5}, tmp_path / "x.json")
    assert IO.read_json(tmp_path / "x.json") == {"a": [0, 1, 2], "b": str(tmp_path), "c": 1.5}
    IO.write_yaml({"z": 1, "a": [1, 2]}, tmp_path / "x.yaml")
    assert (tmp_path / "x.yaml").read_text().splitlines()[0] == "z: 1"     # insertion order kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_text_overwrites(tmp_path):
    IO.write_text("1", tmp_path / "a")
    IO.write_text("2", tmp_path / "a")
    assert (tmp_path / "a").read_text() == "2" and files(tmp_path) == ["a"]
    json.loads(IO.write_json({"k": 1}, tmp_path / "b.json").read_text())


def test_read_table_missing_names_file(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.parquet: file not found"):
        IO.read_table(tmp_path / "nope.parquet")


# --------------------------------------------------------------------------- id guards
def test_assert_same_ids_passes_for_permutation():
    IO.assert_same_ids(ids("a", "b", "c"), ids("c", "a", "b"), "t")


def test_assert_same_ids_missing_and_extra():
    with pytest.raises(PipelineError, match=r"t: id mismatch, 1 only left .*'c'.*0 only right"):
        IO.assert_same_ids(ids("a", "b", "c"), ids("a", "b"), "t")
    with pytest.raises(PipelineError, match=r"0 only left .*1 only right .*'z'"):
        IO.assert_same_ids(ids("a", "b"), ids("a", "b", "z"), "t")
    with pytest.raises(PipelineError, match=r"1 only left .*'b'.*1 only right .*'z'"):
        IO.assert_same_ids(ids("a", "b"), ids("a", "z"), "t")


@pytest.mark.parametrize("side", ["left", "right"])
def test_assert_same_ids_duplicates(side):
    a, b = ids("a", "b", "a"), ids("a", "b")
    if side == "right":
        a, b = b, a
    with pytest.raises(PipelineError, match=rf"t \({side}\): duplicate lesion_id \['a'\]"):
        IO.assert_same_ids(a, b, "t")


def test_assert_same_ids_order():
    with pytest.raises(PipelineError, match="different order"):
        IO.assert_same_ids(ids("a", "b", "c"), ids("a", "c", "b"), "t", ordered=True)
    IO.assert_same_ids(ids("a", "b", "c"), ids("a", "b", "c"), "t", ordered=True)


def test_assert_same_ids_missing_column():
    with pytest.raises(PipelineError, match="no 'lesion_id' column"):
        IO.assert_same_ids(ids("a"), pd.DataFrame({"id": ["a"]}), "t")


def test_merge_on_id_aligns_by_id_not_row_order():
    left = ids("a", "b", "c")
    right = pd.DataFrame({"lesion_id": ["c", "a", "b"], "w": [30.0, 10.0, 20.0]})
    m = IO.merge_on_id(left, right, "t")
    assert m["lesion_id"].tolist() == ["a", "b", "c"]      # left order kept
    assert m["w"].tolist() == [10.0, 20.0, 30.0]


def test_merge_on_id_errors():
    right = pd.DataFrame({"lesion_id": ["a", "b"], "w": [1.0, 2.0]})
    with pytest.raises(PipelineError, match="id mismatch"):
        IO.merge_on_id(ids("a", "b", "c"), right, "t")
    with pytest.raises(PipelineError, match="duplicate"):
        IO.merge_on_id(ids("a", "b"), pd.DataFrame({"lesion_id": ["a", "b", "b"], "w": [1.0, 2, 3]}), "t")
    with pytest.raises(PipelineError, match="both tables have columns \\['v'\\]"):
        IO.merge_on_id(ids("a", "b"), ids("b", "a"), "t")
    # how='left': right may hold more ids, never fewer, never duplicates
    m = IO.merge_on_id(ids("a"), right, "t", how="left")
    assert m["w"].tolist() == [1.0]
    with pytest.raises(PipelineError, match=r"1 ids missing on the right, e\.g\. \['c'\]"):
        IO.merge_on_id(ids("a", "c"), right, "t", how="left")
    with pytest.raises(PipelineError, match="duplicate"):
        IO.merge_on_id(ids("a"), pd.DataFrame({"lesion_id": ["a", "a"], "w": [1.0, 2]}), "t", how="left")


def test_write_json_writes_nan_as_null(tmp_path):
    p = IO.write_json({"a": float("nan"), "b": [1.0, np.float64("inf")], "c": np.array([np.nan, 2.0])},
                      tmp_path / "x.json")
    assert json.loads(p.read_text()) == {"a": None, "b": [1.0, None], "c": [None, 2.0]}
