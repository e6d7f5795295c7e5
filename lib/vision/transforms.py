"""Image loading and the deterministic evaluation transform shared by features, training and TTA."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data.cache import read_rgb


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (area/cubic) and take the central `size` x `size` crop."""
    h, w = img.shape[:2]
    s = size / min(h, w)
    if abs(s - 1) > 1e-6:
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        img = cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=interp)
    h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 -> CHW float32 normalized with mean/std given on the [0, 1] scale."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def eval_view(img: np.ndarray, size: int, resize_mode: str = "shortest") -> np.ndarray:
    """The deterministic inference view: `squash` resizes the whole image to size x size (what
    sklesion was trained with); anything else resizes the short side and center-crops."""
    if resize_mode == "squash":
        s = size / min(img.shape[:2])
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return resize_center_crop(img, size)


class EvalImages(Dataset):
    """Paths -> normalized tensors of the inference view (before TTA)."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],
                 resize_mode: str = "shortest") -> None:
        self.paths, self.size, self.mean, self.std = list(paths), int(size), tuple(mean), tuple(std)
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = eval_view(read_rgb(self.paths[i]), self.size, self.resize_mode)
        return to_tensor(img, self.mean, self.std)
