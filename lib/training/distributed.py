"""Data-parallel plumbing for one fold across processes (`torchrun`): nccl on GPU, gloo on CPU.

Launched by torchrun (env WORLD_SIZE > 1) the process group is initialized here; otherwise every
helper degrades to the one-process case. Only rank 0 writes artifacts (`Dist.main`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lib.core.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> Dist:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device."""
    if not launched():
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise PipelineError(f"torchrun local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.info("DDP rank %d/%d on %s (%s)", rank, world, device, backend)
    if rank != 0:  # one copy of the progress log
        logging.getLogger().setLevel(logging.WARNING)
    return Dist(rank, world, local, device, backend)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def gather_rows(d: Dist, idx: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (row positions, values) concatenated and sorted by position."""
    if d.enabled:
        parts: list[Any] = [None] * d.world
        dist.all_gather_object(parts, (idx, rows))
        idx = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    return idx[order], rows[order]


def shard(n: int, d: Dist) -> np.ndarray:
    """This rank's positions of an evaluation set of n rows (strided, no padding)."""
    return np.arange(d.rank, n, d.world)


def cleanup(d: Dist, ok: bool = False) -> None:
    """Tear the process group down. After a successful run (`ok`) every rank first meets at a barrier,
    so none still talks to the store rank 0 hosts when it goes (a rank left behind aborted at exit,
    `terminate called without an active exception`, under load in CI); after an error no barrier (the
    other ranks may never reach it: torchrun stops them)."""
    if d.enabled and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


class GlobalBatchSampler:
    """Batches of (row, epoch) pairs: the global order of an epoch is computed identically on every
    rank (from `order_fn(epoch)`), cut into global batches of `global_batch` rows (the last partial
    batch dropped), and rank r takes the r-th contiguous slice of each. The union over ranks of
    micro-batch j is therefore exactly the one-process micro-batch j."""

    def __init__(self, order_fn, n_rows: int, global_batch: int, d: Dist) -> None:
        if global_batch % d.world:
            raise PipelineError(f"train.batch_size {global_batch} must be divisible by the number of "
                                f"processes {d.world}")
        self.order_fn, self.n, self.gb, self.d = order_fn, n_rows, global_batch, d
        self.per_rank = global_batch // d.world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.gb

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.asarray(self.order_fn(self.epoch))
        lo = self.d.rank * self.per_rank
        for j in range(len(self)):
            chunk = order[j * self.gb + lo: j * self.gb + lo + self.per_rank]
            yield [(int(i), self.epoch) for i in chunk]
