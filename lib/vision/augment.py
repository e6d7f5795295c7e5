"""Image transforms for training (albumentations 2.x) and evaluation (the spec's eval view).

Training: RandomResizedCrop to `train.img_size` (scale `aug.crop_scale`), then flips, transpose,
90-degree rotations, Affine (shift/scale/rotate), color jitter, CLAHE, blur, Gaussian noise and
coarse dropout, each with its probability from `train.aug` (0 disables), then normalization with
the spec's mean/std (`lib.vision.backbones.preprocess_spec` with the training size).
`aug.enabled: false` trains on the evaluation view. Evaluation: `lib.vision.transforms.build_eval_transform`
of the same spec (the exact path of `EvalImages`, so OOF/test/features see the same pixels).

Reproducibility: `TrainTransform.__call__(img, seed)` reseeds the pipeline for every image, so an
augmented sample depends only on (seed, epoch, row, modality): not on DataLoader workers, ranks
or the order of loading.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import albumentations as alb
import cv2
import numpy as np
import torch

from lib.vision.transforms import build_eval_transform, to_tensor


def train_pipeline(size: int, aug: dict[str, Any]) -> alb.Compose:
    """The albumentations 2.x pipeline (uint8 RGB HWC in -> uint8 RGB size x size out, no normalize)."""
    lo, hi = aug["crop_scale"]
    t: list[alb.BasicTransform | alb.BaseCompose] = [
        alb.RandomResizedCrop(size=(size, size), scale=(float(lo), float(hi)), ratio=(0.75, 4 / 3),
                            interpolation=cv2.INTER_AREA, p=1.0)]

    def add(key: str, make) -> None:
        p = float(aug[key])
        if p > 0:
            t.append(make(p))

    add("hflip", lambda p: alb.HorizontalFlip(p=p))
    add("vflip", lambda p: alb.VerticalFlip(p=p))
    add("transpose", lambda p: alb.Transpose(p=p))
    add("rotate", lambda p: alb.RandomRotate90(p=p))
    add("shift_scale_rotate", lambda p: alb.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625),
                                                 rotate=(-45, 45), interpolation=cv2.INTER_LINEAR,
                                                 border_mode=cv2.BORDER_REFLECT_101, p=p))
    add("color_jitter", lambda p: alb.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=p))
    add("clahe", lambda p: alb.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=p))
    add("blur", lambda p: alb.OneOf([alb.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.2, 1.5)),
                                     alb.MotionBlur(blur_limit=(3, 5))], p=p))
    add("noise", lambda p: alb.GaussNoise(std_range=(0.02, 0.08), p=p))
    add("coarse_dropout", lambda p: alb.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                                                    hole_width_range=(0.05, 0.15), fill=0, p=p))
    return alb.Compose(t, seed=0)


class TrainTransform:
    """uint8 RGB image + seed -> normalized float tensor [3, S, S] (augmented when enabled).

    Built from a preprocessing spec (its `size`, `mean`, `std`; its eval view when `aug.enabled` is
    false); the augmentation parameters come from `train.aug`."""

    def __init__(self, spec: Mapping[str, Any], aug: dict[str, Any]) -> None:
        self.eval_tf = build_eval_transform(spec)
        self.size, self.mean, self.std = (self.eval_tf.spec[k] for k in ("size", "mean", "std"))
        self.enabled = bool(aug["enabled"])
        self.pipe = train_pipeline(self.size, aug) if self.enabled else None

    def __call__(self, img: np.ndarray, seed: int) -> torch.Tensor:
        if self.pipe is None:
            return self.eval_tf(img)
        self.pipe.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return to_tensor(self.pipe(image=img)["image"], self.mean, self.std)
