"""The one evaluation transform, built from a backbone's preprocessing spec, and image datasets on it.

A spec (`lib.vision.backbones.preprocess_spec`, stored in each fold's model.pt with the training
`size`) is a JSON-able dict: `size`, `mean`, `std` (of [0,1]-scaled RGB), `resize_mode`,
`interpolation`, `crop_pct`. `build_eval_transform(spec)` turns it into
`uint8 RGB HWC -> float32 [3, size, size]`, the deterministic view (before TTA) used by validation,
OOF, test inference, fold-model features and frozen-encoder features alike.

How each field is honoured:
* `resize_mode`: `shortest` (default) resizes the short side to `size` and takes the central square;
  `squash` resizes the whole image to `size` x `size` (aspect not kept; what sklesion was trained with).
* `interpolation`: the kernel used when an image is enlarged (`bicubic` -> cv2.INTER_CUBIC,
  `bilinear` -> INTER_LINEAR, `nearest` -> INTER_NEAREST). Shrinking always uses cv2.INTER_AREA, which
  averages (anti-aliases) like PIL's resize, where cv2's cubic/linear kernels would alias.
  Whether an image is shrunk is decided on its short side.
* `crop_pct`: NOT applied by the pipeline (`full_frame=True`): the model sees the whole prepared
  image, the scale-1.0 end of training's RandomResizedCrop, and a lesion's border is never cut.
  It is the weights' own (ImageNet) recipe, honoured only by reference checks (`full_frame=False`:
  resize to round(size / crop_pct), then the central `size` crop).
A spec without `resize_mode` / `interpolation` / `crop_pct` (an old model.pt: size/mean/std only)
gets `shortest` / the mode's default kernel (`bicubic`; `bilinear` for `squash`) / 1.0.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lib.core.errors import ConfigError
from lib.data.cache import read_rgb

RESIZE_MODES = ("shortest", "squash")
DEFAULT_INTERPOLATION = {"shortest": "bicubic", "squash": "bilinear"}
UPSAMPLE = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}

EvalTransform = Callable[[np.ndarray], torch.Tensor]


def full_spec(spec: Mapping[str, Any], size: int | None = None) -> dict[str, Any]:
    """The view fields of `spec` with defaults filled (JSON-able: lists, floats); `size` overrides."""
    mode = spec.get("resize_mode") or "shortest"
    if mode not in RESIZE_MODES:
        raise ConfigError(f"preprocessing spec: resize_mode {mode!r} unknown (known: {list(RESIZE_MODES)})")
    interp = spec.get("interpolation") or DEFAULT_INTERPOLATION[mode]
    if interp not in UPSAMPLE:
        raise ConfigError(f"preprocessing spec: interpolation {interp!r} unknown (known: {list(UPSAMPLE)})")
    mean, std = [float(v) for v in spec["mean"]], [float(v) for v in spec["std"]]
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"preprocessing spec: mean/std need 3 values, got {mean} / {std}")
    crop = float(spec.get("crop_pct") or 1.0)
    if not 0 < crop <= 1:
        raise ConfigError(f"preprocessing spec: crop_pct {crop} not in (0, 1]")
    return {"size": int(size or spec["size"]), "mean": mean, "std": std, "resize_mode": mode,
            "interpolation": interp, "crop_pct": crop}


def resize_view(img: np.ndarray, size: int, resize_mode: str = "shortest",
                interpolation: str | None = None) -> np.ndarray:
    """uint8 HWC -> uint8 size x size: `shortest` (short side + central crop) or `squash`."""
    interp = UPSAMPLE[interpolation or DEFAULT_INTERPOLATION[resize_mode]]
    h, w = img.shape[:2]
    s = size / min(h, w)
    kernel = cv2.INTER_AREA if s < 1 else interp
    if resize_mode == "squash":
        return cv2.resize(img, (size, size), interpolation=kernel)
    if abs(s - 1) > 1e-6:
        img = cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=kernel)
    return center_crop(img, size)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 -> CHW float32 normalized with mean/std given on the [0, 1] scale."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


class _EvalTransform:
    """Picklable (DataLoader workers) callable of `build_eval_transform`."""

    def __init__(self, spec: dict[str, Any], full_frame: bool) -> None:
        self.spec, self.full_frame = spec, full_frame

    def view(self, img: np.ndarray) -> np.ndarray:
        """uint8 HWC -> the uint8 size x size view (before normalization)."""
        s = self.spec
        size = s["size"] if self.full_frame else round(s["size"] / s["crop_pct"])
        out = resize_view(img, size, s["resize_mode"], s["interpolation"])
        return out if size == s["size"] else center_crop(out, s["size"])

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return to_tensor(self.view(img), self.spec["mean"], self.spec["std"])


def build_eval_transform(spec: Mapping[str, Any], full_frame: bool = True) -> EvalTransform:
    """`uint8 RGB HWC -> float32 [3, S, S]` for a spec (see the module doc for how fields are honoured).
    `full_frame=False` also applies `crop_pct` (reference checks of the weights' own recipe only)."""
    return _EvalTransform(full_spec(spec), full_frame)


class EvalImages(Dataset):
    """Image paths -> tensors of the evaluation view of `spec` (before TTA)."""

    def __init__(self, paths: Sequence[str], spec: Mapping[str, Any]) -> None:
        self.paths, self.transform = list(paths), build_eval_transform(spec)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(read_rgb(self.paths[i]))
