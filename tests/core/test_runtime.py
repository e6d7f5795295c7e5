"""lib.core.runtime: device choice, core count, seeds, and the writable-output check."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from lib.core import runtime
from lib.core.errors import PipelineError


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    assert runtime.check_writable(out) == out
    assert out.is_dir() and list(out.iterdir()) == []


def test_check_writable_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError) as e:
        runtime.check_writable(tmp_path / "f" / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "f" / "out") in msg and "not writable" in msg


def test_check_writable_read_only_probe_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(PipelineError, match=r"not writable \(Permission denied\).*--output"):
        runtime.check_writable(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_check_writable_read_only_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PipelineError, match="not writable"):
            runtime.check_writable(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_torch_device_cpu_and_missing_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.torch_device({"device": "auto"}) == "cpu"
    with pytest.raises(PipelineError, match="CUDA is not available"):
        runtime.torch_device({"device": "cuda"})
    assert runtime.torch_device({"device": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.torch_device({"device": "auto"}) == "cuda" and runtime.resolve_device("cuda:1") == "cuda:1"


def test_resolve_device_names_its_key_and_runs_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError (a stacking-only install)
    assert runtime.resolve_device("auto", "stack.xgb.device") == "cpu"
    assert runtime.resolve_device("cpu", "stack.xgb.device") == "cpu"
    with pytest.raises(PipelineError, match=r"^config: stack.xgb.device 'cuda' requested but CUDA is not available "
                                            r"\(use stack.xgb.device=cpu or auto\)$"):
        runtime.resolve_device("cuda", "stack.xgb.device")


def test_seed_for_is_stable_and_distinct() -> None:
    assert runtime.seed_for(1, 2) == runtime.seed_for(1, 2) != runtime.seed_for(2, 1)
    assert runtime.cpu_count() >= 1


def test_cpu_count_is_the_affinity_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    assert runtime.cpu_count() == 2                     # the cores this process may run on
    monkeypatch.delattr(runtime.os, "sched_getaffinity")
    assert runtime.cpu_count() == 64                    # platforms without affinity (macOS, Windows)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: None)
    assert runtime.cpu_count() == 1
