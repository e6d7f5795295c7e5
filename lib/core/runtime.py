"""Process-level runtime facts: the device a config asks for (torch and the stackers' boosters), the
usable CPU cores, whether an output folder can be written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lib.core.errors import PipelineError


def torch_device(cfg: dict) -> str:
    """The config's `device`, resolved by `resolve_device`."""
    return resolve_device(str(cfg.get("device", "auto")))


def resolve_device(dev: str, key: str = "device") -> str:
    """THE device choice: auto -> cuda when torch sees a GPU, else cpu (also when torch cannot be
    imported, e.g. a stacking-only install); cuda requested but absent -> error naming config `key`."""
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if dev == "auto":
        return "cuda" if cuda else "cpu"
    if dev.startswith("cuda") and not cuda:
        raise PipelineError(f"config: {key} '{dev}' requested but CUDA is not available (use {key}=cpu or auto)")
    return dev


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def seed_for(*parts: int) -> int:
    """A 32-bit seed from integer parts (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure `path` (a folder, created if absent) can be written; PipelineError in one line if not.

    Probes with a real temporary file: permission bits lie for root and on read-only mounts
    (e.g. a Kaggle `/kaggle/input/...` dataset).
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write_probe_"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise PipelineError(f"output folder {p} is not writable ({reason}): "
                            "pass a writable --output (on Kaggle: /kaggle/working/...)") from None
    return p
