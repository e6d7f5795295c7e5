"""lib.vision.backbones: the factory (random / local file / open_clip), tokens, specs and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.core.errors import PipelineError
from lib.vision import backbones
from lib.vision.transforms import build_eval_transform

# ------------------------------------------------------------------ factory basics and errors


def test_tiny_timm_features_tokens_and_spec():
    model = backbones.build_backbone("test_efficientnet", None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, tokens = model(x), backbones.forward_tokens(model, x)
    assert feats.shape == (2, model.num_features)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[1] == 4  # 64/32 = 2x2 grid
    spec = backbones.preprocess_spec("test_efficientnet", None)
    assert isinstance(spec["size"], int) and len(spec["mean"]) == len(spec["std"]) == 3
    ref = build_eval_transform(spec, full_frame=False)(np.zeros((50, 70, 3), np.uint8))
    assert ref.shape == (3, spec["size"], spec["size"])
    assert backbones.model_spec("test_efficientnet", None, 96) == {**spec, "size": 96}


def test_local_weights_roundtrip_ignores_classifier(tmp_path):
    src = backbones.build_backbone("test_efficientnet", None, keep_head=True)
    for fmt in ("pth", "safetensors"):
        path = tmp_path / f"w.{fmt}"
        sd = {k: v.contiguous() for k, v in src.state_dict().items()}
        if fmt == "pth":
            torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
        else:
            from safetensors.torch import save_file

            save_file(sd, str(path))
        model = backbones.build_backbone("test_efficientnet", str(path))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(model(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_unknown_arch_suggests_names():
    with pytest.raises(PipelineError, match="tf_efficientnet_lite0"):
        backbones.build_backbone("tf_efficientnet_lite9", None)
    with pytest.raises(PipelineError, match="unknown open_clip model 'ViT-Q-99'"):
        backbones.build_backbone("open_clip:ViT-Q-99", None)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PipelineError, match=r"test_efficientnet.*nope\.pth"):
        backbones.build_backbone("test_efficientnet", str(missing))
    with pytest.raises(PipelineError, match=r"nope\.pth"):  # a path is never taken for a hub tag
        backbones.build_backbone("test_efficientnet", str(missing), hub=True)


def test_mismatched_state_dict_names_keys(tmp_path):
    sd = backbones.build_backbone("test_efficientnet", None).state_dict()
    sd.pop("conv_stem.weight")
    sd["bn1.weight"] = torch.ones(3)
    sd["extra.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(PipelineError) as e:
        backbones.build_backbone("test_efficientnet", str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "bad.pth" in msg and "conv_stem.weight" in msg and "extra.weight" in msg
    assert "bn1.weight: file (3,)" in msg


def test_open_clip_visual_random_init():
    model = backbones.build_backbone("open_clip:ViT-B-32", None)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features) == (1, 512)
        assert backbones.forward_tokens(model, x).shape == (1, 49, 768)
    assert backbones.preprocess_spec("open_clip:ViT-B-32", None)["size"] == 224
