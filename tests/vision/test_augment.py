"""lib.augment: the albumentations 2.x pipeline builds and runs, is reproducible per seed, and the
evaluation view is the shared center crop."""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from lib.config.schema import TRAIN_DEFAULTS as DEFAULTS
from lib.vision.augment import TrainTransform, eval_transform, train_pipeline
from lib.vision.transforms import resize_center_crop, to_tensor

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


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
    assert isinstance(pipe, A.Compose)


def test_seeded_reproducible_and_varied():
    tf = TrainTransform(40, DEFAULTS["aug"], MEAN, STD)
    img = _img()
    a, b, c = tf(img, 1), tf(img, 1), tf(img, 2)
    assert a.shape == (3, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_disabled_and_eval_are_the_center_crop():
    img = _img()
    ref = to_tensor(resize_center_crop(img, 40), MEAN, STD)
    assert torch.equal(eval_transform(img, 40, MEAN, STD), ref)
    tf = TrainTransform(40, {**DEFAULTS["aug"], "enabled": False}, MEAN, STD)
    assert torch.equal(tf(img, 5), ref)
