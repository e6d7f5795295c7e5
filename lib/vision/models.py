"""Trainable classifiers on `lib.backbones` encoders.

A batch is a dict of tensors:
- `img_<modality>`: normalized images [B, 3, S, S] (one per modality the model uses),
- `meta`: metadata features [B, M] (may have M = 0), `monet`: MONET concept scores [B, K] (missing
  ones already filled), `monet_mask`: [B, K] 1 = score present and kept (0 = missing or dropped by
  concept dropout), `keep`: [B, n_images] 1 = image branch kept (0 = zeroed by modality dropout).

Models (`build_model`):
- `SingleImageModel` (kind `single`): one image (`model.modality`) -> pooled encoder features,
  optionally concatenated with the tabular branch (metadata + MONET) -> neck -> head.
- `FusionModel` (kind `fusion`): dermoscopic + clinical encoders (one shared or two separate) and
  the tabular branch, fused by
  * `concat`: late fusion [f_derm * keep, f_clin * keep, tab] -> neck -> multi-sample-dropout head;
  * `xattn` (tri-modal cross-attention in the spirit of SkinM2Former / TMCT): encoder tokens are
    projected to `xattn_dim`; (1) dermoscopic tokens attend to clinical tokens; (2) all visual
    tokens attend to context tokens (one token per MONET concept: score * w_k + e_k, or a learned
    "missing" token when absent/dropped; plus one metadata token); (3) `xattn_queries` learnable
    queries pool [visual, context] tokens; flattened queries -> neck -> head.
  A dropped image branch is zeroed (concat: its features; xattn: its projected tokens, which keep
  their modality embedding).
- `features(batch)` is the neck output (the penultimate vector, `hidden` wide) used by stage 03
  (`features.from_exps`); `forward(batch)` -> logits [B, C].
- Multi-sample dropout (`msd` > 1): training logits are the mean of the shared classifier over
  `msd` dropout masks of the neck; at eval, dropout is off and the head is applied once.
No BatchNorm outside the encoders (LayerNorm only), so heads do not depend on batch composition.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lib.config.schema import FUSIONS, MODEL_KINDS
from lib.core.errors import PipelineError
from lib.vision.backbones import build_backbone, forward_tokens

log = logging.getLogger(__name__)

KINDS = MODEL_KINDS


def set_drop_path(encoder: nn.Module, rate: float) -> int:
    """Stochastic depth on a built encoder: modules' `drop_path` / `drop_path1` / `drop_path2`
    children get DropPath(rate * i / n) for the i-th of n such blocks (timm's linear rule).
    Returns how many blocks got one (0 for encoders without such attributes)."""
    from timm.layers import DropPath

    if rate <= 0:
        return 0
    blocks = [m for m in encoder.modules()
              if any(isinstance(getattr(m, a, None), nn.Module) for a in ("drop_path", "drop_path1", "drop_path2"))]
    for i, m in enumerate(blocks):
        r = rate * i / max(len(blocks), 1)
        for a in ("drop_path", "drop_path1", "drop_path2"):
            if isinstance(getattr(m, a, None), nn.Module):
                setattr(m, a, DropPath(r) if r > 0 else nn.Identity())
    return len(blocks)


def _mlp(d_in: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d_out, d_out), nn.SiLU())


class TabularBranch(nn.Module):
    """[meta, monet * mask, mask] -> MLP -> [B, hidden]."""

    def __init__(self, n_meta: int, n_monet: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.n_meta, self.n_monet = n_meta, n_monet
        self.mlp = _mlp(n_meta + 2 * n_monet, hidden, dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.n_meta:
            parts.append(batch["meta"])
        if self.n_monet:
            m = batch["monet_mask"]
            parts += [batch["monet"] * m, m]
        return self.mlp(torch.cat(parts, 1))


class MSDHead(nn.Module):
    """Classifier with multi-sample dropout: mean over `n` dropout masks when training."""

    def __init__(self, d: int, n_classes: int, dropout: float, n: int) -> None:
        super().__init__()
        self.drop, self.n = nn.Dropout(dropout), max(1, int(n))
        self.fc = nn.Linear(d, n_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.n == 1:
            return self.fc(self.drop(h))
        return torch.stack([self.fc(self.drop(h)) for _ in range(self.n)]).mean(0)


class _Base(nn.Module):
    """Shared plumbing: encoders, tabular branch, neck -> head, features()."""

    kind = "base"

    def __init__(self, mcfg: dict[str, Any], n_classes: int, n_meta: int, n_monet: int) -> None:
        super().__init__()
        self.mcfg = dict(mcfg)
        self.n_meta = n_meta if mcfg["use_meta"] else 0
        self.n_monet = n_monet if mcfg["use_monet"] else 0
        self.hidden = int(mcfg["hidden"])
        self.n_classes = n_classes

    def _encoder(self, weights: str | None) -> nn.Module:
        enc = build_backbone(self.mcfg["arch"], weights, hub=bool(self.mcfg["hub"]))
        set_drop_path(enc, float(self.mcfg["drop_path"]))
        return enc

    def encoder_items(self) -> list[tuple[str, nn.Module]]:
        """(parameter-name prefix, encoder) pairs (for layer decay, freezing, BN modes)."""
        return [(f"encoders.{k}.", v) for k, v in self.encoders.items()]

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(batch))


class SingleImageModel(_Base):
    kind = "single"

    def __init__(self, mcfg: dict[str, Any], n_classes: int, n_meta: int, n_monet: int,
                 weights: str | None) -> None:
        super().__init__(mcfg, n_classes, n_meta, n_monet)
        self.modality = mcfg["modality"]
        self.modalities = [self.modality]
        self.encoders = nn.ModuleDict({"image": self._encoder(weights)})
        nf = int(self.encoders["image"].num_features)
        self.tab = TabularBranch(self.n_meta, self.n_monet, self.hidden, mcfg["dropout"]) \
            if self.n_meta + self.n_monet else None
        d = nf + (self.hidden if self.tab is not None else 0)
        self.neck = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.hidden), nn.SiLU())
        self.head = MSDHead(self.hidden, n_classes, mcfg["dropout"], mcfg["msd"])

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        f = self.encoders["image"](batch[f"img_{self.modality}"]).float()
        if self.tab is not None:
            f = torch.cat([f, self.tab(batch)], 1)
        return self.neck(f)


class XAttnBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to keys/values) + feed-forward, both residual."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        k = self.ln_kv(kv)
        q = q + self.attn(self.ln_q(q), k, k, need_weights=False)[0]
        return q + self.ff(self.ln_ff(q))


class FusionModel(_Base):
    kind = "fusion"

    def __init__(self, mcfg: dict[str, Any], n_classes: int, n_meta: int, n_monet: int,
                 modalities: list[str], weights: str | None, img_size: int) -> None:
        super().__init__(mcfg, n_classes, n_meta, n_monet)
        if len(modalities) != 2 or mcfg["modality"] not in modalities:
            raise PipelineError(f"config: train.model.kind=fusion needs exactly two image modalities including "
                                f"train.model.modality={mcfg['modality']!r}; the data has {modalities} "
                                "(use train.model.kind=single)")
        if mcfg["fusion"] not in FUSIONS:
            raise PipelineError(f"config: train.model.fusion '{mcfg['fusion']}' unknown (known: {list(FUSIONS)})")
        primary = mcfg["modality"]
        self.modalities = [primary] + [m for m in modalities if m != primary]  # primary attends to the other
        self.fusion = mcfg["fusion"]
        self.shared = bool(mcfg["shared_encoder"])
        names = ["shared"] if self.shared else self.modalities
        self.encoders = nn.ModuleDict({n: self._encoder(weights) for n in names})
        nf = int(next(iter(self.encoders.values())).num_features)
        drop, h = float(mcfg["dropout"]), self.hidden
        if self.fusion == "concat":
            self.tab = TabularBranch(self.n_meta, self.n_monet, h, drop) if self.n_meta + self.n_monet else None
            d = 2 * nf + (h if self.tab is not None else 0)
            self.neck = nn.Sequential(nn.LayerNorm(d), nn.Dropout(drop), nn.Linear(d, h), nn.SiLU())
        else:
            D, heads, nq = int(mcfg["xattn_dim"]), int(mcfg["xattn_heads"]), int(mcfg["xattn_queries"])
            if D % heads:
                raise PipelineError(f"config: train.model.xattn_dim {D} must be divisible by xattn_heads {heads}")
            tdim = self._token_dim(img_size)
            self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(tdim), nn.Linear(tdim, D))
                                       for m in self.modalities})
            self.type_embed = nn.Parameter(torch.zeros(2, D))
            nn.init.trunc_normal_(self.type_embed, std=0.02)
            if self.n_monet:
                self.concept_w = nn.Parameter(torch.randn(self.n_monet, D) * 0.02)
                self.concept_embed = nn.Parameter(torch.randn(self.n_monet, D) * 0.02)
                self.concept_missing = nn.Parameter(torch.randn(self.n_monet, D) * 0.02)
            self.meta_tok = _mlp(self.n_meta, D, drop) if self.n_meta else None
            self.cross_dc = XAttnBlock(D, heads, drop)
            self.cross_vc = XAttnBlock(D, heads, drop) if self.n_meta + self.n_monet else None
            self.query_embed = nn.Parameter(torch.randn(nq, D) * 0.02)
            self.pool = XAttnBlock(D, heads, drop)
            self.neck = nn.Sequential(nn.LayerNorm(nq * D), nn.Dropout(drop), nn.Linear(nq * D, h), nn.SiLU())
        self.head = MSDHead(h, n_classes, drop, mcfg["msd"])

    @torch.no_grad()
    def _token_dim(self, size: int) -> int:
        enc = next(iter(self.encoders.values()))
        was = enc.training
        enc.eval()
        t = forward_tokens(enc, torch.zeros(1, 3, size, size))
        enc.train(was)
        return int(t.shape[-1])

    def _encode(self, batch: dict[str, torch.Tensor], tokens: bool) -> list[torch.Tensor]:
        fn = (lambda e, x: forward_tokens(e, x)) if tokens else (lambda e, x: e(x))
        xs = [batch[f"img_{m}"] for m in self.modalities]
        if self.shared:
            out = fn(self.encoders["shared"], torch.cat(xs, 0)).float()
            return list(out.split([x.shape[0] for x in xs], 0))   # shape, not len(): traced as a dynamic size by the ONNX export
        return [fn(self.encoders[m], x).float() for m, x in zip(self.modalities, xs)]

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = batch["keep"].float()
        if self.fusion == "concat":
            fs = [f * keep[:, i:i + 1] for i, f in enumerate(self._encode(batch, tokens=False))]
            if self.tab is not None:
                fs.append(self.tab(batch))
            return self.neck(torch.cat(fs, 1))
        td, tc = (self.proj[m](t) * keep[:, i, None, None] + self.type_embed[i]
                  for i, (m, t) in enumerate(zip(self.modalities, self._encode(batch, tokens=True))))
        ctx = []
        if self.n_monet:
            s, mk = batch["monet"].unsqueeze(-1), batch["monet_mask"].unsqueeze(-1)
            ctx.append(mk * (s * self.concept_w + self.concept_embed) + (1 - mk) * self.concept_missing)
        if self.meta_tok is not None:
            ctx.append(self.meta_tok(batch["meta"]).unsqueeze(1))
        td = self.cross_dc(td, tc)
        vis = torch.cat([td, tc], 1)
        if ctx:
            c = torch.cat(ctx, 1)
            vis = self.cross_vc(vis, c)
            vis = torch.cat([vis, c], 1)
        q = self.pool(self.query_embed.unsqueeze(0).expand(vis.shape[0], -1, -1), vis)
        return self.neck(q.flatten(1))


def build_model(mcfg: dict[str, Any], n_classes: int, n_meta: int, n_monet: int, modalities: list[str],
                img_size: int, weights: str | None = "config") -> _Base:
    """The `train.model` section -> a model (train mode). `weights='config'` uses `mcfg['weights']`;
    None builds the architecture with random encoders (to load a saved state dict into)."""
    if mcfg["kind"] not in KINDS:
        raise PipelineError(f"config: train.model.kind '{mcfg['kind']}' unknown (known: {list(KINDS)})")
    if mcfg["modality"] not in modalities:
        raise PipelineError(f"config: train.model.modality '{mcfg['modality']}' is not an image of this "
                            f"data set {modalities}")
    w = mcfg["weights"] if weights == "config" else weights
    if mcfg["kind"] == "single":
        model: _Base = SingleImageModel(mcfg, n_classes, n_meta, n_monet, w)
    else:
        model = FusionModel(mcfg, n_classes, n_meta, n_monet, modalities, w, img_size)
    return model.train()
