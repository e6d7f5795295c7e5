"""lib.vision.onnx_trunk: the runtime choice, export + cache + check against PyTorch, the cache key,
and every bad input: a corrupt / truncated cached file is rebuilt, a module that does not export or
does not match stays on PyTorch (one warning line, nothing cached), a missing package is one line."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import timm
import torch

from lib.config import cli
from lib.core.errors import ConfigError
from lib.vision import onnx_trunk as O
from lib.vision.trunk import split_at

KEY = {"arch": "test_efficientnet", "weights": None, "size": 32, "identity": {"hub": False}, "cut": "blocks.1"}


def _trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    return split_at(m, "blocks.1")[0]


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_export_matches_torch_is_cached_and_reused(tmp_path, caplog) -> None:
    trunk = _trunk()
    f = O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    assert f is not None and f.max_abs_diff <= O.ATOL
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".onnx" and files[0].name.startswith("t-")
    x = _x(5, seed=2).contiguous(memory_format=torch.channels_last)   # another batch size, channels_last
    with torch.no_grad():
        ref = trunk(x)
    np.testing.assert_allclose(f(x).numpy(), ref.numpy(), atol=1e-4)
    mtime = files[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        g = O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    assert g is not None and files[0].stat().st_mtime_ns == mtime and "from the cached" in caplog.text
    assert not _warnings(caplog)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_or_truncated_cached_file_is_rebuilt_with_one_warning(tmp_path, caplog, damage) -> None:
    trunk = _trunk()
    O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    path = next(tmp_path.glob("*.onnx"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with caplog.at_level(logging.WARNING):
        f = O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "rebuilding" in msgs[0] and "\n" not in msgs[0]
    assert f is not None and path.read_bytes() == data and list(tmp_path.iterdir()) == [path]


def test_a_cached_file_of_other_weights_is_caught_by_the_check(tmp_path, caplog) -> None:
    trunk = _trunk()
    O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    with torch.no_grad():
        trunk[0].weight.mul_(1.5)                 # same key, other values: the load check sees it
    with caplog.at_level(logging.WARNING):
        f = O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1)
    assert len(_warnings(caplog)) == 1 and "max abs difference" in _warnings(caplog)[0]
    with torch.no_grad():
        np.testing.assert_allclose(f(_x()).numpy(), trunk(_x()).numpy(), atol=1e-4)


def test_a_mismatch_above_tolerance_at_export_caches_nothing(tmp_path, caplog, monkeypatch) -> None:
    trunk = _trunk()
    other = _trunk()
    with torch.no_grad():
        other[0].weight.add_(0.01)               # the exported file does not compute what `trunk` does
    real = O.export_onnx
    monkeypatch.setattr(O, "export_onnx", lambda module, example, path: real(other, example, path))
    with caplog.at_level(logging.WARNING):
        assert O.onnx_forward(trunk, "t", KEY, tmp_path, _x(), threads=1) is None
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "running it in PyTorch, nothing cached" in msgs[0] and "\n" not in msgs[0]
    assert list(tmp_path.iterdir()) == []


def test_a_module_that_does_not_export_falls_back_in_one_line(tmp_path, caplog, capsys) -> None:
    class Svd(torch.nn.Module):                 # linalg_svdvals has no ONNX export
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.svdvals(x.flatten(2))
    with caplog.at_level(logging.WARNING):
        assert O.onnx_forward(Svd(), "svd", {"cut": None}, tmp_path, _x(), threads=1) is None
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "does not export to ONNX" in msgs[0] and "svdvals" in msgs[0] and "\n" not in msgs[0]
    assert list(tmp_path.iterdir()) == [] and "graph" not in capsys.readouterr().out


def test_key_covers_spec_opset_versions_and_format(monkeypatch) -> None:
    k = O.onnx_key(KEY)
    assert O.onnx_key(dict(KEY)) == k
    assert O.onnx_key({**KEY, "identity": {"hub": False, "weights_sha256": "ab"}}) != k
    assert O.onnx_key({**KEY, "cut": "blocks.2"}) != k and O.onnx_key({**KEY, "size": 64}) != k
    for name, value in (("OPSET", O.OPSET + 1), ("ONNX_FORMAT_VERSION", O.ONNX_FORMAT_VERSION + 1)):
        with monkeypatch.context() as m:
            m.setattr(O, name, value)
            assert O.onnx_key(KEY) != k
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        assert O.onnx_key(KEY) != k
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert O.onnx_key(KEY) != k


def test_runtime_choice(monkeypatch) -> None:
    assert O.resolve_runtime("auto", "cpu") == "onnxruntime" and O.resolve_runtime("auto", "cuda") == "torch"
    assert O.resolve_runtime("torch", "cpu") == "torch" and O.resolve_runtime("onnxruntime", "cpu") == "onnxruntime"
    with pytest.raises(ConfigError, match="runs on the CPU, but device is cuda"):
        O.resolve_runtime("onnxruntime", "cuda")


def test_onnxruntime_not_installed_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` raises ImportError
    assert O.resolve_runtime("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match=r"needs the onnxruntime package, which is not installed: pip install onnxruntime"):
        O.resolve_runtime("onnxruntime", "cpu")
    rc = cli.run_script(lambda cfg: O.resolve_runtime(cfg["features"]["runtime"], "cpu"),
                        ["features.runtime=onnxruntime"], "d")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "onnxruntime" in err[0] and "Traceback" not in err[0]


def test_export_of_a_container_left_in_train_mode_is_the_eval_forward(tmp_path) -> None:
    trunk = _trunk()                       # split_at's Sequential: train mode, its children in eval mode
    assert trunk.training
    stats = trunk[1].running_mean.clone()
    O.export_onnx(trunk, _x(1), tmp_path / "t.onnx")
    got = O.make_session(tmp_path / "t.onnx", 1).run(None, {"x": _x().numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, trunk(_x()).numpy(), atol=1e-4)
    assert torch.equal(trunk[1].running_mean, stats)      # batch-norm statistics untouched


class _TwoInputs(torch.nn.Module):
    """A dict-batch module: reads `a` and `b`, ignores `unused`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(batch["a"]) * batch["b"]


def _ab(n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 4, generator=g), "b": torch.randn(n, 1, generator=g), "unused": torch.zeros(n, 5)}


def test_named_inputs_export_one_graph_input_each_and_are_fed_by_name(tmp_path) -> None:
    m = _TwoInputs()
    f = O.onnx_forward(m, "ab", {"cut": None}, tmp_path, _ab(3), threads=1)
    assert f is not None and [i.name for i in f.session.get_inputs()] == ["a", "b"]   # unused: not a graph input
    with torch.no_grad():
        np.testing.assert_allclose(f(_ab(7, seed=4)).numpy(), m(_ab(7, seed=4)).numpy(), atol=1e-6)
    assert list(tmp_path.iterdir()) == [O.onnx_path(tmp_path, "ab", {"cut": None})]


def test_a_batch_size_baked_in_at_export_is_caught_even_on_a_one_row_sample(tmp_path, caplog) -> None:
    class Baked(torch.nn.Module):              # len(x) is a constant in the traced graph (1: the export row)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), -1)[:, :5]
    with caplog.at_level(logging.WARNING):
        assert O.onnx_forward(Baked(), "baked", {"cut": None}, tmp_path, _x(1), threads=1) is None
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "nothing cached" in msgs[0] and list(tmp_path.iterdir()) == []
