"""tools/bench_extract.py: the fp32 peak formula and the FLOP count it divides by (the benchmark
itself runs on a quiet machine: the lead's job, not the fast loop's)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ROOT, load_file

bench = load_file(ROOT / "tools" / "bench_extract.py")


def test_peak_is_cores_x_clock_x_lanes_x_fma_x_units(monkeypatch) -> None:
    class Out:
        stdout = "Model name: Test CPU\nFlags: fpu sse avx2 fma avx512f\nCPU max MHz: 3000.0000\n"
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Out())
    c = bench.cpu_facts(None, 2, 4)
    assert c["model"] == "Test CPU" and c["isa"] == "AVX-512" and c["flops_per_cycle"] == 16 * 2 * 2
    assert c["peak"] == pytest.approx(4 * 3.0e9 * 64) and "4 cores x 3.00 GHz x 16 lanes" in c["formula"]
    Out.stdout = "Model name: Old CPU\nFlags: fpu sse avx2 fma\nCPU max MHz: 2000\n"
    c = bench.cpu_facts(2.5, 1, 2)   # --ghz wins over lscpu
    assert c["isa"] == "AVX2+FMA" and c["peak"] == pytest.approx(2 * 2.5e9 * 8 * 2 * 1)


def test_trunk_flops_count_a_multiply_add_as_two() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert bench.trunk_flops(conv, 16) == 2 * 3 * 8 * 9 * 16 * 16
