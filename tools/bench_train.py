#!/usr/bin/env python
"""Training throughput of the real stage-02 path vs an in-memory ceiling, and the speed levers.

    python tools/bench_train.py -c configs/milk10k_sample/train_fusion.yaml            # full table
    python tools/bench_train.py -c configs/milk10k_sample/train_fusion.yaml --quick    # smoke (few steps)

"real": cached JPEGs from disk -> LesionDataset (decode + augmentation) -> DataLoader -> model ->
loss -> backward -> AdamW (+ clipping), exactly the objects lib.train uses. "synthetic": the same
model, loss and optimizer fed tensors already in memory (the compute ceiling). Images/s counts
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.config.cli import setup_logging
from lib.config.load import load_config
from lib.core.artifacts import prep_dir  # noqa: E402
from lib.data.dataset import load_dataset  # noqa: E402
from lib.training import data as TD  # noqa: E402
from lib.training import distributed as D  # noqa: E402
from lib.training import optim as TO  # noqa: E402
from lib.training.losses import Loss  # noqa: E402
from lib.vision.backbones import preprocess_spec  # noqa: E402
from lib.vision.models import build_model  # noqa: E402

log = logging.getLogger("bench_train")


def setup(cfg: dict, size: int, channels_last: bool):
    info, train, _ = load_dataset(cfg)
    tcfg, mcfg = cfg["train"], {**cfg["train"]["model"], "weights": None}
    classes = list(info["classes"])
    mods = TD.model_modalities(info, mcfg)
    tab = TD.Tabular(info, train)
    torch.manual_seed(0)
    model = build_model(mcfg, len(classes), len(tab.meta_cols), len(tab.monet_cols), list(info["modalities"]), size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(TO.param_groups(model, tcfg), lr=float(tcfg["lr"]))
    y = train[[f"y_{c}" for c in classes]].to_numpy(np.float32)
    loss_fn = Loss(tcfg["loss"], info.get("task", "multiclass"), y)
    spec = preprocess_spec(cfg["train"]["model"]["arch"], None)
    ds = TD.LesionDataset(train, prep_dir(cfg), mods, classes, tab, size, spec["mean"], spec["std"], train=True,
                         aug=tcfg["aug"], seed=0, modality_dropout=tcfg["modality_dropout"],
                         monet_dropout=tcfg["monet_dropout"])
    return model, opt, loss_fn, ds, y, len(mods)


def step(fwd, model, opt, loss_fn, b, amp_dtype, clip: float) -> None:
    with TO.autocast("cpu", amp_dtype):
        z = fwd(b)
    loss = loss_fn(z.float(), b["y"])
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(cfg: dict, size: int, mode: str, steps: int, warmup: int, channels_last: bool = True,
            amp: str = "off", compile_: bool = False, threads: int = 0, workers: int | None = None) -> float:
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, opt, loss_fn, ds, y, n_img = setup(cfg, size, channels_last)
        model.train()
        fwd = torch.compile(model) if compile_ else model
        amp_dtype = torch.bfloat16 if amp == "bf16" else None
        bs = int(cfg["train"]["batch_size"])
        clip = float(cfg["train"]["clip_grad"])
        if mode == "synthetic":
            dl = TD._loader(torch.utils.data.Subset(ds, list(range(bs))), 0, 0, batch_size=bs)
            b = TD.to_device(next(iter(dl)), "cpu", channels_last)
            b = {k: (v.new_empty(v.shape).normal_() if k.startswith("img_") else v) for k, v in b.items()}
            if channels_last:
                b = {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v) for k, v in b.items()}
            batches = iter(lambda: b, None)
        else:
            w = TD.resolve_workers(int(cfg["train"]["workers"] if workers is None else workers))
            sampler = D.GlobalBatchSampler(lambda e: TD.epoch_order(y, {"kind": "none", "power": 0}, 0, 0, e),
                                           len(y), min(bs, len(y)), D.Dist())
            dl = TD._loader(ds, w, 0, batch_sampler=sampler)

            def gen():
                e = 0
                while True:
                    sampler.set_epoch(e)
                    for batch in dl:
                        yield TD.to_device(batch, "cpu", channels_last)
                    e += 1
            batches = gen()
        n, t0 = 0, None
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            b = next(batches)
            step(fwd, model, opt, loss_fn, b, amp_dtype, clip)
            if i >= warmup:
                n += len(b["idx"]) * n_img
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
