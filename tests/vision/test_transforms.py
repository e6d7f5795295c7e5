"""lib.images: resize + center crop sizes and content, tensor normalization, the eval dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.core.errors import PipelineError
from lib.vision import transforms as I
from tests.helpers import rgb, write_jpeg


@pytest.mark.parametrize("h, w", [(300, 200), (200, 300), (50, 40), (40, 50), (224, 224), (224, 500),
                                  (13, 1000), (1000, 7), (225, 224), (2, 2)])
@pytest.mark.parametrize("size", [224, 32])
def test_resize_center_crop_size(h, w, size):
    out = I.resize_center_crop(rgb(h, w), size)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8


def test_exact_size_is_untouched():
    img = rgb(64, 64)
    assert np.array_equal(I.resize_center_crop(img, 64), img)


def test_crop_is_centered_landscape_and_portrait():
    land = np.zeros((100, 300, 3), np.uint8)
    land[:, 100:200] = 255                     # the central square is white, the sides black
    out = I.resize_center_crop(land, 50)
    assert out.shape == (50, 50, 3) and out.min() == 255
    portrait = np.zeros((300, 100, 3), np.uint8)
    portrait[100:200] = 255
    assert I.resize_center_crop(portrait, 100).min() == 255


def test_small_image_upscaled():
    small = np.full((10, 20, 3), 77, np.uint8)
    out = I.resize_center_crop(small, 64)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - 77).max() <= 1


def test_to_tensor_normalization():
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 51
    mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
    t = I.to_tensor(img, mean, std)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.full((4, 6), (1.0 - 0.5) / 0.5))
    assert torch.allclose(t[1], torch.full((4, 6), (0.0 - 0.25) / 0.25))
    assert torch.allclose(t[2], torch.full((4, 6), (0.2 - 0.2) / 0.1), atol=1e-6)
    assert img[..., 0].max() == 255                  # input not modified


def test_to_tensor_non_contiguous_input_keeps_layout():
    img = rgb(8, 10)[:, ::-1]                        # a negative-stride view
    t = I.to_tensor(img, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(t, torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255)


def test_eval_images_dataset(tmp_path):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", 30 + 10 * i, 50, seed=i) for i in range(3)]
    ds = I.EvalImages([str(p) for p in paths], 24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert len(ds) == 3
    for i in range(3):
        assert ds[i].shape == (3, 24, 24) and ds[i].dtype == torch.float32
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match=r"bad\.jpg"):
        I.EvalImages([str(tmp_path / "bad.jpg")], 24, (0, 0, 0), (1, 1, 1))[0]


def test_eval_view_modes():
    img = rgb(60, 90, seed=1)
    assert np.array_equal(I.eval_view(img, 32), I.resize_center_crop(img, 32))
    squash = I.eval_view(img, 32, "squash")
    assert squash.shape == (32, 32, 3) and squash.dtype == np.uint8
    assert not np.array_equal(squash, I.resize_center_crop(img, 32))   # keeps the sides instead of cropping
    big = I.eval_view(rgb(10, 20), 64, "squash")
    assert big.shape == (64, 64, 3)
