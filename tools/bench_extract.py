#!/usr/bin/env python
"""Frozen-trunk speed, engine by engine, and the real loader against the in-memory ceiling.

    python tools/bench_extract.py --prep output/prep/milk10k_split --n 256 --threads 2 --workers 0 1

Per trunk of the MILK10k dev recipe (`lite0`: tf_efficientnet_lite0 @ 224 cut at conv_head;
`sklesion`: legacy_xception @ 254 cut at conv4.pointwise), on the first `--n` dermoscopic images of
the prep folder, decoded once into memory:

* engines: torch eager (NCHW), torch channels_last, `torch.compile` (channels_last), ONNX Runtime
  (CPU EP, the pipeline's session: `lib.vision.onnx_trunk`) and OpenVINO with
  INFERENCE_PRECISION_HINT f32 (optional: "not installed" otherwise), each in img/s (one view per
  image) and as a share of the machine's fp32 peak, with the max abs difference of its activations
  against torch eager;
* the loader: decoding + resizing alone (`lib.vision.embed.image_batches`, per `--workers`), and the
  real path (loader + ONNX Runtime trunk) against the ONNX Runtime in-memory rate (the ceiling);
* same answer: the embeddings (trunk -> tail -> pooling, float32) from ONNX Runtime vs PyTorch:
  max abs difference and the lowest cosine similarity over the images.

fp32 peak (FLOP/s) = cores x clock (Hz) x FLOPs per cycle per core, where FLOPs per cycle per core
= SIMD fp32 lanes (AVX-512: 16, AVX2: 8) x 2 (a fused multiply-add is 2 FLOPs) x FMA units per core
(`--fma-units`, default 2; e.g. AVX-512 with 2 units: 64 FLOPs/cycle/core). cores = the threads the
engines run on (`--threads`, default: the cores this process may use); clock = `--ghz`, else lscpu's
max MHz, else /proc/cpuinfo's MHz. The trunk's FLOPs per image are counted by
`torch.utils.flop_counter` (a multiply-add = 2 FLOPs). ISA: lscpu's flags; PyTorch reports its own
kernel level (`ATEN_CPU_CAPABILITY=avx2` forces AVX2); ONNX Runtime's MLAS picks its kernels from
CPUID at run time and exposes no switch or query, so the level shown for it is the best the flags
allow.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lib.core.runtime import cpu_count  # noqa: E402
from lib.vision import backbones  # noqa: E402
from lib.vision import onnx_trunk as O  # noqa: E402
from lib.vision.embed import encoder_spec, image_batches  # noqa: E402
from lib.vision.trunk import split_at  # noqa: E402

TRUNKS = {"lite0": ("tf_efficientnet_lite0", "pypi:efficientnet-lite0", 224, "conv_head"),
          "sklesion": ("legacy_xception", "pypi:sklesion", None, "conv4.pointwise")}
ENGINES = ("eager", "channels_last", "compile", "onnxruntime", "openvino")


def cpu_facts(ghz: float | None, fma_units: int, cores: int) -> dict:
    """lscpu's model name, the widest fp32 SIMD ISA of its flags, the clock, and the fp32 peak."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}
    flags = set(field.get("Flags", "").split())
    isa, lanes = ("AVX-512", 16) if "avx512f" in flags else ("AVX2+FMA", 8) if {"avx2", "fma"} <= flags \
        else ("SSE", 4)
    if ghz is None:
        mhz = field.get("CPU max MHz") or field.get("CPU MHz")
        if not mhz:
            m = re.search(r"cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text())
            mhz = m.group(1) if m else "0"
        ghz = float(mhz) / 1000
    per_cycle = lanes * 2 * fma_units
    return {"model": field.get("Model name", "?"), "isa": isa, "ghz": ghz, "cores": cores,
            "flops_per_cycle": per_cycle, "peak": cores * ghz * 1e9 * per_cycle,
            "formula": f"{cores} cores x {ghz:.2f} GHz x {lanes} lanes x 2 (FMA) x {fma_units} FMA units "
                       f"= {cores * ghz * per_cycle:.0f} GFLOP/s"}


def trunk_flops(trunk: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        trunk(torch.zeros(1, 3, size, size))
    return float(fc.get_total_flops())


def rate(fn, x: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    """img/s of `fn` over `x` in batches (after one warm-up batch), and its output of the first batch."""
    with torch.no_grad():
        first = fn(x[:batch]).float().numpy()
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            fn(x[s:s + batch])
    return len(x) / (time.perf_counter() - t0), first


def engine_fn(name: str, trunk: torch.nn.Module, x: torch.Tensor, threads: int, onnx_path: Path):
    """A callable tensor -> tensor for engine `name`, or a string saying why there is none."""
    if name == "eager":
        return trunk.to(memory_format=torch.contiguous_format)
    cl = trunk.to(memory_format=torch.channels_last)
    if name == "channels_last":
        return lambda t: cl(t.contiguous(memory_format=torch.channels_last))
    if name == "compile":
        try:
            c = torch.compile(cl)
            c(x[:2].contiguous(memory_format=torch.channels_last))
        except Exception as e:  # noqa: BLE001 - a missing compiler etc.: say so in the table
            return f"failed: {type(e).__name__}"
        return lambda t: c(t.contiguous(memory_format=torch.channels_last))
    if name == "onnxruntime":
        return O.OnnxForward(O.make_session(onnx_path, threads), 0.0)
    return openvino_fn(onnx_path, threads)


def openvino_fn(onnx_path: Path, threads: int):
    try:
        import openvino as ov
    except ImportError:
        return "not installed"
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    return lambda t: torch.from_numpy(np.asarray(compiled(np.ascontiguousarray(t.numpy()))[0]))


def bench_trunk(name: str, a: argparse.Namespace, paths: list[str], cpu: dict, tmp: Path) -> list[str]:
    arch, weights, size, cut = TRUNKS[name]
    spec = {**encoder_spec({"arch": arch, "weights": weights, "size": size}, ["id"], "bench")}
    model = backbones.build_backbone(arch, weights).eval()
    trunk, tail, pool = split_at(model, cut)
    x = torch.stack([b for batch in image_batches(paths, spec, a.batch, 0) for b in batch])
    flops = trunk_flops(trunk, spec["size"])
    onnx_path = tmp / f"{name}.onnx"
    O.export_onnx(trunk, x[:1], onnx_path)
    out = [f"\n### {name}: {arch} @ {spec['size']} px, cut {cut}, {flops / 1e9:.2f} GFLOP/img, "
           f"{len(x)} images, batch {a.batch}\n", "| engine | img/s | % of fp32 peak | max abs diff vs eager |",
           "|---|---|---|---|"]
    ref = None
    for e in a.engines:
        fn = engine_fn(e, trunk, x, cpu["cores"], onnx_path)
        if isinstance(fn, str):
            out.append(f"| {e} | {fn} | - | - |")
            continue
        r, first = rate(fn, x, a.batch)
        ref = first if e == "eager" else ref
        diff = "-" if ref is None or e == "eager" else f"{np.abs(first - ref).max():.1e}"
        out.append(f"| {e} | {r:.1f} | {100 * r * flops / cpu['peak']:.1f}% | {diff} |")
    out += loader_rows(trunk, x, paths, spec, a, onnx_path, cpu["cores"])
    out += agreement(trunk, tail, pool, x, onnx_path, cpu["cores"], a.batch)
    return out


def loader_rows(trunk, x, paths, spec, a, onnx_path: Path, threads: int) -> list[str]:
    """Decoding alone and loader + ONNX Runtime trunk, against the in-memory ONNX Runtime rate."""
    ort = O.OnnxForward(O.make_session(onnx_path, threads), 0.0)
    ceiling, _ = rate(ort, x, a.batch)
    rows = ["", "| loader (workers) | decode + resize img/s | with the ONNX Runtime trunk img/s | / in-memory ceiling |",
            "|---|---|---|---|"]
    for w in a.workers:
        t0 = time.perf_counter()
        n = sum(len(b) for b in image_batches(paths, spec, a.batch, w))
        decode = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in image_batches(paths, spec, a.batch, w):
                ort(b)
        real = n / (time.perf_counter() - t0)
        rows.append(f"| {w} ({'prefetch thread' if w == 0 else 'processes'}) | {decode:.1f} | {real:.1f} | "
                    f"{real / ceiling:.2f} (ceiling {ceiling:.1f}) |")
    return rows


def agreement(trunk, tail, pool, x, onnx_path: Path, threads: int, batch: int) -> list[str]:
    """Embeddings (trunk -> tail -> pool) with the trunk in ONNX Runtime vs PyTorch."""
    ort = O.OnnxForward(O.make_session(onnx_path, threads), 0.0)
    with torch.no_grad():
        a = torch.cat([pool(tail(trunk(x[s:s + batch]))).flatten(1) for s in range(0, len(x), batch)]).numpy()
        b = torch.cat([pool(tail(ort(x[s:s + batch]))).flatten(1) for s in range(0, len(x), batch)]).numpy()
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return ["", f"Embeddings, ONNX Runtime vs PyTorch: max abs diff {np.abs(a - b).max():.2e}, "
                f"lowest cosine similarity {cos.min():.8f} ({len(a)} images)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", default="output/prep/milk10k_sample")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--trunks", nargs="+", default=list(TRUNKS), choices=list(TRUNKS))
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0, help="0 = the cores this process may use")
    p.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: from lscpu)")
    p.add_argument("--fma-units", type=int, default=2, help="FMA units per core for the peak")
    a = p.parse_args(argv)
    threads = a.threads or cpu_count()
    torch.set_num_threads(threads)
    prep = Path(a.prep)
    paths = [str(prep / x) for x in pd.read_parquet(prep / "train.parquet")["path_dermoscopic"].tolist()[: a.n]]
    cpu = cpu_facts(a.ghz, a.fma_units, threads)
    ort = O.import_onnxruntime("bench_extract.py")
    print(f"\nCPU: {cpu['model']}, ISA {cpu['isa']} (lscpu flags), {threads} threads; PyTorch {torch.__version__} "
          f"kernels {torch.backends.cpu.get_cpu_capability()}; ONNX Runtime {ort.__version__} (MLAS picks its "
          f"kernels by CPUID: {cpu['isa']} here)")
    print(f"fp32 peak = cores x clock x SIMD lanes x 2 (FMA) x FMA units = {cpu['formula']}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.trunks:
            print("\n".join(bench_trunk(name, a, paths, cpu, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
