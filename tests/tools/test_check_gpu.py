"""tools/check_gpu.py: the report's logic on CPU (the GPU paths are not measured here: no GPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import load_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cg():
    return load_file(ROOT / "tools" / "check_gpu.py", "check_gpu")


def test_cpu_tiny_run_reports_every_field(cg, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gpu.json"
    assert cg.main(["--device", "cpu", "--tiny", "--steps", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep) >= {"device", "amp", "channels_last", "train", "extract", "ddp", "advice"}
    assert rep["device"]["device"] == "cpu" and rep["amp"]["auto_dtype"] == "off (fp32)"
    assert rep["train"]["images_s"] > 0 and rep["train"]["loss_finite"]
    assert rep["train"]["images_s"] == pytest.approx(2 * rep["train"]["lesions_s"], rel=0.01)  # two images per lesion
    assert rep["extract"]["images_s"] > 0 and rep["extract"]["features"] > 0
    assert rep["ddp"]["run"] is False and "check" not in rep["ddp"]
    assert "CPU recipe" in capsys.readouterr().out


def test_cuda_requested_without_cuda_is_one_line_exit_2(cg, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cg.torch.cuda, "is_available", lambda: False)
    assert cg.main(["--device", "cuda", "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA is not available" in err


def test_amp_choice_per_device(cg) -> None:
    cpu = cg.amp_choice("cpu")
    assert cpu["auto_dtype"] == "off (fp32)" and cpu["grad_scaler"] is False
    ampere = cg.amp_choice("cuda", bf16_supported=True)
    assert ampere["auto_dtype"] == "float16" and ampere["grad_scaler"] is True and "bf16" in ampere["try"]
    t4 = cg.amp_choice("cuda:0", bf16_supported=False)
    assert t4["grad_scaler"] is True and "keep train.amp=auto" in t4["try"]


@pytest.mark.parametrize("device,n,run,world", [("cpu", 0, False, 1), ("cuda", 1, False, 1), ("cuda", 2, True, 2),
                                                ("cuda:0", 4, True, 4)])
def test_ddp_plan_follows_visible_gpus(cg, device: str, n: int, run: bool, world: int) -> None:
    plan = cg.ddp_plan(device, n)
    assert plan["run"] is run and plan["world"] == world
    if run:
        assert plan["backend"] == "nccl" and f"--nproc_per_node={n}" in plan["reason"]


def test_ddp_runs_only_when_planned(cg, monkeypatch) -> None:
    monkeypatch.setattr(cg, "device_info", lambda d: {"device": d, "n_gpus": 2})
    monkeypatch.setattr(cg, "torch_device", lambda cfg: "cuda")
    monkeypatch.setattr(cg, "bench_train", lambda *a: {"batch": 8, "size": 64})
    monkeypatch.setattr(cg, "bench_extract", lambda *a: {})
    calls = []
    monkeypatch.setattr(cg, "ddp_check", lambda world: calls.append(world) or {"ok": True})
    rep = cg.check(cg._parser().parse_args(["--tiny"]))
    assert calls == [2] and rep["ddp"]["check"] == {"ok": True}
    cg.check(cg._parser().parse_args(["--tiny", "--no-ddp"]))
    assert calls == [2]


def _gpu_report(cap: str, bf16: bool, mem: float = 15.0) -> dict:
    return {"device": {"device": "cuda", "memory_gb": mem, "capability": cap, "bf16_supported": bf16},
            "amp": {"try": "x"}, "train": {"peak_mem_gb": 2.0, "batch": 32, "size": 224},
            "ddp": {"reason": "one GPU visible: no DDP needed"}}


def test_advice_batch_size_and_tensor_cores(cg) -> None:
    t4 = cg.advice(_gpu_report("7.5", False))
    assert any("train.batch_size=128" in a for a in t4)  # 0.8 * 15 GB / (2 GB / 32) = 192 -> 128
    assert not any("tensor cores" in a for a in t4)
    assert any("tensor cores" in a for a in cg.advice(_gpu_report("6.0", False)))  # P100
    assert not any("tensor cores" in a for a in cg.advice(_gpu_report("10.0", True)))  # compared as numbers
    assert "CPU recipe" in cg.advice({"device": {"device": "cpu"}})[0]


def test_training_steps_are_the_pipeline_s_train_step(cg, monkeypatch) -> None:
    """bench_train times lib.training.loop.train_step (not a copy): every step goes through it, and the
    fusion model's weights move."""
    from lib.training import loop

    calls = []

    def counted(run, batch, last):
        calls.append(last)
        return loop.train_step(run, batch, last)

    monkeypatch.setattr(cg, "train_step", counted)
    run = cg.fusion_setup("test_efficientnet", None, 64, "cpu")
    before = [p.detach().clone() for p in run.model.parameters() if p.requires_grad]
    monkeypatch.setattr(cg, "fusion_setup", lambda *a: run)
    rep = cg.bench_train("test_efficientnet", None, 64, 4, 2, "cpu")
    assert calls == [True, True, True] and rep["steps"] == 2 and rep["loss_finite"]
    after = [p for p in run.model.parameters() if p.requires_grad]
    assert any(not torch.equal(b, a) for b, a in zip(before, after)) and run.step == 3
