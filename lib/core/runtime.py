"""Process-level runtime facts: the torch device a config asks for, the usable CPU cores, whether an
output folder can be written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lib.core.errors import PipelineError


def torch_device(cfg: dict) -> str:
    """Resolve `device`: auto -> cuda when present else cpu; cuda requested but absent -> error."""
    import torch

    dev = str(cfg.get("device", "auto"))
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"config: device '{dev}' requested but CUDA is not available (use device=cpu or auto)")
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
