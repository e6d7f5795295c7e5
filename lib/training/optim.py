"""Optimisation pieces: freezing, layer-wise LR decay groups, the warmup-cosine schedule, AMP."""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from lib.config.schema import AMP_MODES
from lib.core.errors import PipelineError

log = logging.getLogger(__name__)


def amp_setup(mode: str, device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    cuda = device.startswith("cuda")
    if mode == "auto":
        return (torch.float16, True) if cuda else (None, False)
    if mode == "off":
        return None, False
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        if not cuda:
            raise PipelineError("config: train.amp=fp16 needs CUDA; on CPU use off (default) or bf16")
        return torch.float16, True
    raise PipelineError(f"config: train.amp '{mode}' unknown ({' | '.join(AMP_MODES)})")


def autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _layer_maps(enc: nn.Module, coarse: bool) -> dict[str, int]:
    from timm.models import group_parameters

    names = [n for n, _ in enc.named_parameters()]
    if hasattr(enc, "group_matcher"):
        try:
            lm = group_parameters(enc, enc.group_matcher(coarse=coarse), reverse=True)
            if lm:
                top = max(lm.values())
                return {n: lm.get(n, top) for n in names}
        except Exception as e:  # noqa: BLE001 - unusual matchers: fall back to one group
            log.debug("group_matcher failed for %s: %s", type(enc).__name__, e)
    return {n: 0 for n in names}


def freeze_blocks(model: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the stem and the first n coarse blocks of every encoder; returns their BN modules."""
    if n <= 0:
        return []
    frozen_bn: list[nn.Module] = []
    for _, enc in model.encoder_items():
        lm = _layer_maps(enc, coarse=True)
        if len(set(lm.values())) <= 1:
            raise PipelineError(f"train.freeze_blocks: cannot tell the blocks of {type(enc).__name__} apart")
        for name, p in enc.named_parameters():
            if lm[name] <= n:
                p.requires_grad_(False)
        for m in enc.modules():
            ps = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and ps and not any(p.requires_grad for p in ps):
                frozen_bn.append(m)
    return frozen_bn


def set_train_mode(model: nn.Module, bn_mode: str, frozen_bn: list[nn.Module]) -> None:
    model.train()
    for m in frozen_bn:
        m.eval()
    if bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(model: nn.Module, tcfg: dict) -> list[dict]:
    """AdamW groups: encoder layer i of L -> lr * layer_decay ** (L - i); heads -> lr; no weight decay
    on 1-D parameters and embeddings/queries."""
    lr, wd, ld = float(tcfg["lr"]), float(tcfg["weight_decay"]), float(tcfg["layer_decay"])
    scale: dict[str, float] = {}
    for prefix, enc in model.encoder_items():
        lm = _layer_maps(enc, coarse=False)
        top = max(lm.values()) + 1
        scale.update({prefix + n: ld ** (top - i) for n, i in lm.items()})
    groups: dict[tuple, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = scale.get(n, 1.0)
        no_wd = p.ndim <= 1 or n.split(".")[-1] in ("type_embed", "query_embed", "concept_embed",
                                                     "concept_w", "concept_missing")
        g = groups.setdefault((round(s, 10), no_wd), {"params": [], "lr": lr * s, "lr_scale": s,
                                                       "weight_decay": 0.0 if no_wd else wd})
        g["params"].append(p)
    return list(groups.values())


def cosine_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f
