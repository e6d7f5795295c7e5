"""Process-level runtime facts: the torch device a config asks for, the usable CPU cores."""
from __future__ import annotations

import os

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
