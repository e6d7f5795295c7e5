"""ONNX Runtime for frozen forward passes: a trunk up to its cut (or a whole pooled encoder), or a
finished fold model (`lib.training.inference.finished_forward`), exported once to ONNX, cached,
checked against PyTorch, and run through an ONNX Runtime CPU session.

`features.runtime` picks the engine (`resolve_runtime`): `torch`, `onnxruntime`, or `auto` (ONNX
Runtime on CPU when the package is installed, PyTorch on CUDA). `onnx_forward(module, ...)` returns
an `OnnxForward` (input in, tensor out, like the module) or None, after one warning line, when the
module does not export or ONNX Runtime does not reproduce PyTorch: the caller then keeps the module.
The input is one tensor (a trunk: `x [B, 3, H, W]`) or a dict of named tensors, each with the batch
first (a fold model's batch: `img_<modality>`, `meta`, ...; the module is called with the dict and
exported with one graph input per name). The check runs on at least two rows (the sample repeated
if needed): the export traces one row, so a batch size baked into the graph is caught.

Export: the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset `OPSET`,
dynamic batch). The dynamo exporter needs `onnxscript` and is slower; the legacy one works offline
with torch 2.14. Cache: `<prep>/onnx/<name>-<key>.onnx`, the key holding the encoder spec (arch,
weights and their identity, preprocessing) and the cut, the opset, the torch and onnxruntime
versions and `ONNX_FORMAT_VERSION`; written to a temp file and moved into place only after the
session built from it matched PyTorch on real images (max abs difference <= `ATOL`). A cached file
is checked the same way on every load: an unreadable (truncated, corrupt) or mismatching file is
rebuilt with one warning line; wrong activations are never cached or used.

Threads: the session's intra-op pool gets the threads the stage set once (`lib.core.runtime.cpu_count`
or `threads`); spinning is off, so the decoding thread beside it (`lib.vision.embed.prefetch`) gets
the cores while the pool waits. `import onnxruntime` happens only inside functions.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from lib.core.errors import ConfigError
from lib.vision.embed import spec_key

log = logging.getLogger(__name__)

ONNX_FORMAT_VERSION = 1      # bump when what an exported file holds changes meaning
OPSET = 17
ATOL = 1e-4                  # max abs difference of the outputs, ONNX Runtime vs PyTorch, at export

Inputs = torch.Tensor | dict[str, torch.Tensor]   # one input `x`, or named inputs (batch first)


def import_onnxruntime(why: str = "features.runtime = onnxruntime") -> ModuleType:
    """The onnxruntime module; ConfigError naming the package when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"config: {why} needs the onnxruntime package, which is not installed: "
                          "pip install onnxruntime (or set features.runtime: torch)") from None
    return onnxruntime


def resolve_runtime(runtime: str, device: str) -> str:
    """`torch` or `onnxruntime` for a frozen forward pass on `device` (`features.runtime`)."""
    if runtime == "torch":
        return "torch"
    if runtime == "onnxruntime":
        if device != "cpu":
            raise ConfigError(f"config: features.runtime = onnxruntime runs on the CPU, but device is {device} "
                              "(use features.runtime: auto or torch)")
        import_onnxruntime()
        return "onnxruntime"
    if device != "cpu":
        return "torch"
    try:
        import_onnxruntime()
    except ConfigError:
        log.info("onnxruntime is not installed: frozen forward passes run in PyTorch")
        return "torch"
    return "onnxruntime"


def onnx_key(key_spec: dict) -> str:
    """Cache key of an exported file: `key_spec` (encoder spec, cut) + opset, versions, format."""
    ort = import_onnxruntime()
    return spec_key({**key_spec, "opset": OPSET, "onnx_format": ONNX_FORMAT_VERSION,
                     "torch": torch.__version__, "onnxruntime": ort.__version__})


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).contiguous().numpy())


def feeds(session: Any, x: Inputs) -> dict[str, np.ndarray]:
    """The session's inputs from `x`: the tensor (one-input graph) or the dict's tensors of the
    graph's input names (a dict entry the graph does not read is not fed)."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(x, torch.Tensor):
        return {names[0]: _array(x)}
    return {n: _array(x[n]) for n in names}


class OnnxForward:
    """A frozen module's forward through an ONNX Runtime session: `x [B, 3, H, W]` (or the dict of
    named inputs it was exported with) -> tensor (CPU, float32), a drop-in for the module in
    `embed_paths` / `trunk_activations` / `lib.training.inference.infer`."""

    def __init__(self, session: Any, max_abs_diff: float) -> None:
        self.session, self.max_abs_diff = session, max_abs_diff

    def __call__(self, x: Inputs) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, feeds(self.session, x))[0])


def make_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session on `threads` intra-op threads (no spinning, one inter-op thread)."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class _NamedInputs(nn.Module):
    """`module(dict(zip(names, xs)))` as a module of positional tensors (what the exporter traces)."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module, self.names = module, list(names)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.module(dict(zip(self.names, xs)))


def export_onnx(module: nn.Module, example: Inputs, path: Path) -> None:
    """`module` -> ONNX at `path` (eval mode: a container left in train mode, e.g. `split_at`'s
    Sequential, would export its batch norms in training form), dynamic batch, opset `OPSET`. A dict
    `example` gives one graph input per name (the module is called with the dict)."""
    if isinstance(example, torch.Tensor):
        names, args = ["x"], (example.contiguous(),)
    else:
        names, args = list(example), tuple(t.contiguous() for t in example.values())
        module = _NamedInputs(module, names)
    module.eval()
    axes = {n: {0: "batch"} for n in [*names, "y"]}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")   # the exporter's deprecation / tracer notices, its graph dump on failure
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["y"],
                          opset_version=OPSET, dynamic_axes=axes, dynamo=False)


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}"


def checked_session(path: Path, sample: Inputs, ref: np.ndarray, threads: int,
                    atol: float = ATOL) -> tuple[Any | None, float, str]:
    """(session, max abs diff, '') when the file loads and reproduces `ref` on `sample` within
    `atol`; (None, diff, why) otherwise."""
    try:
        session = make_session(path, threads)
        got = session.run(None, feeds(session, sample))[0]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises assorted errors on a bad file
        return None, float("nan"), f"unreadable ({_one_line(e)})"
    if got.shape != ref.shape:
        return None, float("nan"), f"output shape {got.shape} != PyTorch's {ref.shape}"
    d = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    if not np.isfinite(d) or d > atol:
        return None, d, f"max abs difference {d:.2e} > {atol:g} against PyTorch"
    return session, d, ""


def onnx_path(folder: Path, desc: str, key_spec: dict) -> Path:
    """Where the exported file of `desc` under `key_spec` lives: `folder/<desc>-<key>.onnx`."""
    return Path(folder) / f"{desc}-{onnx_key(key_spec)}.onnx"


def _rows(x: Inputs, n: int | None = None) -> Inputs:
    """`x` on the CPU in float32, its first `n` rows (all when None), at least two (repeated)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", torch.float32).contiguous()[:n]
        return t if n is not None or len(t) > 1 else torch.cat([t, t])
    return one(x) if isinstance(x, torch.Tensor) else {k: one(t) for k, t in x.items()}


def onnx_forward(module: nn.Module, desc: str, key_spec: dict, folder: Path, sample: Inputs,
                 threads: int, atol: float = ATOL) -> OnnxForward | None:
    """The ONNX Runtime twin of `module` (frozen, on CPU), from `folder/<desc>-<key>.onnx` or
    exported there; checked on `sample` (real images; a tensor or a dict of named tensors, see the
    module's doc); None (one warning line) when it does not export or does not reproduce PyTorch
    within `atol`."""
    sample = _rows(sample)
    with torch.no_grad():
        ref = module.eval()(sample).float().numpy().astype(np.float64)
    path = onnx_path(folder, desc, key_spec)
    if path.exists():
        session, d, why = checked_session(path, sample, ref, threads, atol)
        if session is not None:
            log.info("%s: ONNX Runtime from the cached %s (max abs diff %.1e)", desc, path.name, d)
            return OnnxForward(session, d)
        log.warning("%s: cached ONNX file %s is %s; rebuilding it", desc, path, why)
        path.unlink(missing_ok=True)
    return _export_checked(module, desc, path, sample, ref, threads, atol)


def _export_checked(module: nn.Module, desc: str, path: Path, sample: Inputs, ref: np.ndarray,
                    threads: int, atol: float) -> OnnxForward | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            export_onnx(module, _rows(sample, 1), Path(tmp))
        except Exception as e:  # noqa: BLE001 - any export failure means: stay on PyTorch
            log.warning("%s: does not export to ONNX (%s); running it in PyTorch", desc, _one_line(e))
            return None
        session, d, why = checked_session(Path(tmp), sample, ref, threads, atol)
        if session is None:
            log.warning("%s: the ONNX export is %s; running it in PyTorch, nothing cached", desc, why)
            return None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: exported to ONNX (%s, max abs diff %.1e vs PyTorch)", desc, path.name, d)
    return OnnxForward(session, d)
