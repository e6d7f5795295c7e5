"""A fold's resumable checkpoint (`checkpoint.pt`) with a format version and the config fingerprint.

`Checkpointer(path, fingerprint).save(run)` writes atomically everything a resumed run needs to
repeat the interrupted one exactly: model / optimizer / scheduler / scaler / EMA states, the epoch,
optimizer step, history, early-stopping state and the RNG states (torch, numpy, random, CUDA).
`restore(run)` refuses, with a one-line `MissingArtifactError` that says what to do, a checkpoint of
another format version (or none) or of another config.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.core.artifacts import (
    CHECKPOINT,
    CHECKPOINT_VERSION,  # stored as `format_version` in checkpoint.pt and model.pt
)
from lib.core.errors import MissingArtifactError
from lib.core.io import atomic_path
from lib.training.loop import FoldRun, module_state

log = logging.getLogger(__name__)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    """Save / load / delete one fold's checkpoint.pt, bound to the run's config fingerprint."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint

    @classmethod
    def of(cls, run: FoldRun) -> Checkpointer:
        return cls(run.out / CHECKPOINT, run.fingerprint)

    def exists(self) -> bool:
        return self.path.exists()

    def _fix(self) -> str:
        return f"delete {self.path} or rerun without --resume to start over"

    def save(self, run: FoldRun) -> None:
        """Write the state after `run.epoch` completed epochs (atomic)."""
        ck = {"format_version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
              "model": module_state(run.model), "optimizer": run.opt.state_dict(),
              "scheduler": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
              "ema": None if run.ema is None else module_state(run.ema.module),
              "epoch": run.epoch, "step": run.step, "history": run.history, "best": run.best,
              "bad_epochs": run.bad, "rng": rng_state(), "config": run.cfg}
        with atomic_path(self.path) as tmp:
            torch.save(ck, tmp)

    def load(self) -> dict[str, Any]:
        """The checkpoint dict, after checking its format version and fingerprint."""
        if not self.path.exists():
            raise MissingArtifactError(f"{self.path} not found: rerun without --resume to start over")
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise MissingArtifactError(f"{self.path} cannot be read ({type(e).__name__}); {self._fix()}") from e
        version = ck.get("format_version") if isinstance(ck, dict) else None
        if version != CHECKPOINT_VERSION:
            raise MissingArtifactError(f"{self.path} has checkpoint format version {version} (this code reads "
                                       f"{CHECKPOINT_VERSION}); {self._fix()}")
        if ck.get("fingerprint") != self.fingerprint:
            raise MissingArtifactError(f"{self.path} was trained with another config (fingerprint "
                                       f"{ck.get('fingerprint')} vs {self.fingerprint}); {self._fix()}")
        return ck

    def restore(self, run: FoldRun) -> None:
        """Load the checkpoint into `run` (states, progress, RNG)."""
        ck = self.load()
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        run.sched.load_state_dict(ck["scheduler"])
        run.scaler.load_state_dict(ck["scaler"])
        if run.ema is not None:
            run.ema.module.load_state_dict(ck["ema"])
        run.epoch, run.history, run.best, run.bad, run.step = (ck["epoch"], ck["history"], ck["best"],
                                                               ck["bad_epochs"], ck["step"])
        set_rng_state(ck["rng"])

    def delete(self) -> None:
        if self.path.exists():
            self.path.unlink()
