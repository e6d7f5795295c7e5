"""lib.vision.augment: the albumentations 2.x pipeline builds and runs, is reproducible per seed, and
disabled augmentation is the spec's evaluation view."""
from __future__ import annotations

import albumentations as alb
import numpy as np
import torch

from lib.config.schema import TRAIN_DEFAULTS as DEFAULTS
from lib.vision.augment import TrainTransform, train_pipeline
from lib.vision.transforms import build_eval_transform, resize_view, to_tensor

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SPEC = {"size": 40, "mean": MEAN, "std": STD}


def _img(h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_every_transform_builds_and_runs():
    aug = {**DEFAULTS["aug"], **{k: 1.0 for k in DEFAULTS["aug"] if k not in ("enabled", "crop_scale")}}
    pipe = train_pipeline(48, aug)
    names = {type(t).__name__ for t in pipe.transforms}
    assert {"RandomResizedCrop", "HorizontalFlip", "VerticalFlip", "Transpose", "RandomRotate90", "Affine",
            "ColorJitter", "CLAHE", "OneOf", "GaussNoise", "CoarseDropout"} <= names
    out = pipe(image=_img())["image"]
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    # probability 0 leaves a transform out entirely
    aug0 = {**aug, "clahe": 0.0, "noise": 0.0}
    names0 = {type(t).__name__ for t in train_pipeline(48, aug0).transforms}
    assert "CLAHE" not in names0 and "GaussNoise" not in names0
    assert isinstance(pipe, alb.Compose)


def test_seeded_reproducible_and_varied():
    tf = TrainTransform(SPEC, DEFAULTS["aug"])
    img = _img()
    a, b, c = tf(img, 1), tf(img, 1), tf(img, 2)
    assert a.shape == (3, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_disabled_is_the_eval_view_of_the_spec():
    img = _img()
    ref = to_tensor(resize_view(img, 40), MEAN, STD)
    assert torch.equal(build_eval_transform(SPEC)(img), ref)
    tf = TrainTransform(SPEC, {**DEFAULTS["aug"], "enabled": False})
    assert torch.equal(tf(img, 5), ref)
    squash = {**SPEC, "resize_mode": "squash"}
    tf = TrainTransform(squash, {**DEFAULTS["aug"], "enabled": False})
    assert torch.equal(tf(img, 5), to_tensor(resize_view(img, 40, "squash"), MEAN, STD))


def test_training_uses_spec_size_and_normalization():
    tf = TrainTransform({**SPEC, "size": 24, "mean": [0.0] * 3, "std": [1.0] * 3}, DEFAULTS["aug"])
    out = tf(_img(), 0)
    assert out.shape == (3, 24, 24) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
