#!/usr/bin/env python
"""Training throughput of the real stage-02 path vs an in-memory ceiling, and the speed levers.

    python tools/bench_train.py -c configs/milk10k_sample/train_fusion.yaml            # full table
    python tools/bench_train.py -c configs/milk10k_sample/train_fusion.yaml --quick    # smoke (few steps)

"real": cached JPEGs from disk -> LesionDataset (decode + augmentation) -> DataLoader -> model ->
loss -> backward -> AdamW (+ clipping, schedule, EMA), exactly stage 02's objects and step
(lib.training.fold.build_fold on the config's first fold, lib.training.loop.train_step). "synthetic":
the same model, loss and optimizer fed tensors already in memory (the compute ceiling). Images/s counts
every image (a fusion lesion = 2 images). Model: `train.model` of the config with random weights
(`weights: null`; speed does not depend on them). Levers, each changed alone from the baseline
(channels_last on, amp off, no compile, default threads, `train.workers` workers):
channels_last off, bf16 autocast, torch.compile, torch threads 1/2, DataLoader workers 0/1/2.
Prints a markdown table (and writes it to --out if given). Run it on an idle machine.
Like 02_train_fold.py it defaults OMP_WAIT_POLICY to PASSIVE; compare with
`OMP_WAIT_POLICY=ACTIVE python tools/bench_train.py ...` (libgomp's busy-wait default).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as 02_train_fold.py; before torch is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.config.cli import setup_logging  # noqa: E402
from lib.config.load import load_config  # noqa: E402
from lib.core.runtime import torch_device  # noqa: E402
from lib.data.dataset import load_dataset  # noqa: E402
from lib.training import distributed as D  # noqa: E402
from lib.training.data import make_loader, to_device  # noqa: E402
from lib.training.fold import build_fold  # noqa: E402
from lib.training.loop import FoldRun, train_step  # noqa: E402

log = logging.getLogger("bench_train")


def setup(cfg: dict, size: int, channels_last: bool = True, amp: str = "off", compile_: bool = False,
          workers: int | None = None) -> FoldRun:
    """The stage-02 objects (lib.training.fold.build_fold) of the config's first fold, random weights,
    with the lever settings applied to a copy of the config."""
    c = copy.deepcopy(cfg)
    t = c["train"]
    t["model"]["weights"] = None
    t.update(img_size=size, channels_last=channels_last, amp=amp, compile=compile_)
    if workers is not None:
        t["workers"] = workers
    info, train, _ = load_dataset(c)
    k = int(sorted(train["fold"].unique())[0])
    return build_fold(c, info, train, None, k, D.Dist(device=torch_device(c)))


def synthetic_batches(run: FoldRun):
    """One batch of random images (+ the real metadata / labels) on the device, repeated forever."""
    bs = run.batch_size
    dl = make_loader(torch.utils.data.Subset(run.ds_tr, list(range(bs))), 0, 0, batch_size=bs)
    b = to_device(next(iter(dl)), run.device, run.channels_last)
    b = {k: (v.new_empty(v.shape).normal_() if k.startswith("img_") else v) for k, v in b.items()}
    if run.channels_last:
        b = {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v) for k, v in b.items()}
    return iter(lambda: b, None)


def real_batches(run: FoldRun):
    """The fold's training loader (decode + augmentation), epoch after epoch, on the device."""
    e = 0
    while True:
        run.sampler.set_epoch(e)
        for batch in run.loader:
            yield to_device(batch, run.device, run.channels_last)
        e += 1


def measure(cfg: dict, size: int, mode: str, steps: int, warmup: int, channels_last: bool = True,
            amp: str = "off", compile_: bool = False, threads: int = 0, workers: int | None = None) -> float:
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        run = setup(cfg, size, channels_last, amp, compile_, workers)
        run.model.train()
        batches = synthetic_batches(run) if mode == "synthetic" else real_batches(run)
        n, t0 = 0, None
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            b = next(batches)
            train_step(run, b, last=True)
            if i >= warmup:
                n += len(b["idx"]) * len(run.mods)
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="configs/milk10k_sample/train_fusion.yaml")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 160])
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 warmup, no compile")
    p.add_argument("--skip", nargs="*", default=[], help="levers to skip: channels_last bf16 compile threads workers")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    a = p.parse_args(argv)
    setup_logging(False)
    if a.quick:
        a.steps, a.warmup, a.skip = 2, 1, list(a.skip) + ["compile"]
    cfg = load_config(a.config, list(a.overrides))
    cfg = copy.deepcopy(cfg)
    arch = cfg["train"]["model"]["arch"]
    w0 = int(cfg["train"]["workers"])
    rows: list[tuple] = []

    def add(case: str, size: int, mode: str, **kw) -> float:
        t = time.time()
        ips = measure(cfg, size, mode, a.steps, a.warmup, **kw)
        rows.append((case, size, mode, kw.get("channels_last", True), kw.get("amp", "off"),
                     kw.get("compile_", False), kw.get("threads", 0) or torch.get_num_threads(),
                     "-" if mode == "synthetic" else kw.get("workers", w0), ips))
        log.info("%-28s %4d px %-9s %7.1f img/s (%.0fs)", case, size, mode, ips, time.time() - t)
        return ips

    ceilings = {}
    for s in a.sizes:
        ceilings[s] = add("baseline", s, "synthetic")
        add("baseline", s, "real")
    s = a.sizes[0]
    if "channels_last" not in a.skip:
        add("channels_last off", s, "synthetic", channels_last=False)
    if "bf16" not in a.skip:
        add("bf16 autocast", s, "synthetic", amp="bf16")
    if "compile" not in a.skip:
        add("torch.compile", s, "synthetic", compile_=True)
    if "threads" not in a.skip:
        for th in (1, 2):
            add(f"threads {th}", s, "synthetic", threads=th)
    if "workers" not in a.skip:
        for w in (0, 1, 2):
            if w != w0:
                add(f"workers {w}", s, "real", workers=w)

    head = (f"Training throughput, {arch} ({cfg['train']['model']['kind']}"
            f"{'/' + cfg['train']['model']['fusion'] if cfg['train']['model']['kind'] == 'fusion' else ''}), "
            f"batch {cfg['train']['batch_size']}, {a.steps} timed steps, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"load {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}\n\n")
    table = ["| case | px | input | channels_last | amp | compile | threads | workers | img/s | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, size, mode, cl, amp, comp, th, w, ips in rows:
        ceil = ceilings.get(size)
        table.append(f"| {case} | {size} | {mode} | {'on' if cl else 'off'} | {amp} | {'on' if comp else 'off'} | "
                     f"{th} | {w} | {ips:.1f} | {100 * ips / ceil:.0f}% |" if ceil else "")
    text = head + "\n".join(table) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
