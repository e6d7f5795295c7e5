"""lib.vision.models: shapes, features(), modality / concept dropout semantics, stochastic depth, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from lib.config.schema import TRAIN_DEFAULTS as DEFAULTS
from lib.core.errors import PipelineError
from lib.vision.models import build_model, set_drop_path

MODS = ["dermoscopic", "clinical"]
C, M, K, S = 5, 4, 6, 64


def mcfg(**kw) -> dict:
    m = copy.deepcopy(DEFAULTS["model"])
    m.update(arch="test_efficientnet", weights=None, hidden=24, xattn_dim=16, xattn_heads=2, xattn_queries=2,
             drop_path=0.0)
    m.update(kw)
    return m


def batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"img_dermoscopic": torch.randn(b, 3, S, S, generator=g),
            "img_clinical": torch.randn(b, 3, S, S, generator=g),
            "meta": torch.randn(b, M, generator=g), "monet": torch.rand(b, K, generator=g),
            "monet_mask": torch.ones(b, K), "keep": torch.ones(b, 2)}


@pytest.mark.parametrize("kind,fusion,shared", [("single", "concat", True), ("fusion", "concat", True),
                                                ("fusion", "concat", False), ("fusion", "xattn", True),
                                                ("fusion", "xattn", False)])
def test_shapes_and_features(kind, fusion, shared):
    torch.manual_seed(0)
    model = build_model(mcfg(kind=kind, fusion=fusion, shared_encoder=shared), C, M, K, MODS, S).eval()
    b = batch()
    with torch.no_grad():
        z, f = model(b), model.features(b)
    assert z.shape == (3, C) and f.shape == (3, 24)
    assert torch.allclose(model.head(f), z, atol=1e-6)
    assert len(model.encoder_items()) == (1 if kind == "single" or shared else 2)
    model.train()
    assert model(b).shape == (3, C)  # multi-sample dropout path


@pytest.mark.parametrize("fusion", ["concat", "xattn"])
def test_dropped_branch_and_hidden_concepts_are_ignored(fusion):
    torch.manual_seed(0)
    model = build_model(mcfg(fusion=fusion), C, M, K, MODS, S).eval()
    b1, b2 = batch(seed=1), batch(seed=1)
    b2["img_clinical"] = torch.randn_like(b2["img_clinical"])
    b1["keep"][:, 1] = b2["keep"][:, 1] = 0  # clinical branch dropped: its pixels must not matter
    b1["monet_mask"][:, :2] = b2["monet_mask"][:, :2] = 0  # hidden concepts: their scores must not matter
    b2["monet"][:, :2] = 0.123
    with torch.no_grad():
        assert torch.allclose(model(b1), model(b2), atol=1e-5)
        b3 = batch(seed=1)
        assert not torch.allclose(model(b1), model(b3), atol=1e-5)


def test_without_tabular_inputs():
    model = build_model(mcfg(kind="single", use_meta=False, use_monet=False), C, M, K, MODS, S).eval()
    assert model.tab is None
    b = batch()
    del b["meta"], b["monet"], b["monet_mask"]
    assert model(b).shape == (3, C)
    xm = build_model(mcfg(fusion="xattn", use_meta=False, use_monet=False), C, M, K, MODS, S).eval()
    assert xm.cross_vc is None and xm(batch()).shape == (3, C)


def test_drop_path_is_set():
    model = build_model(mcfg(kind="single", drop_path=0.2), C, M, K, MODS, S)
    enc = model.encoders["image"]
    from timm.layers import DropPath

    rates = [m.drop_prob for m in enc.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) < 0.2 and set_drop_path(enc, 0.0) == 0


def test_build_errors():
    with pytest.raises(PipelineError, match="kind"):
        build_model(mcfg(kind="triple"), C, M, K, MODS, S)
    with pytest.raises(PipelineError, match="two image modalities"):
        build_model(mcfg(kind="fusion"), C, M, K, ["dermoscopic"], S)
    with pytest.raises(PipelineError, match="modality"):
        build_model(mcfg(kind="single", modality="xray"), C, M, K, MODS, S)
    with pytest.raises(PipelineError, match="fusion"):
        build_model(mcfg(fusion="sum"), C, M, K, MODS, S)
    with pytest.raises(PipelineError, match="unknown backbone"):
        build_model(mcfg(arch="not_a_net"), C, M, K, MODS, S)
    with pytest.raises(PipelineError, match="not found"):
        build_model(mcfg(weights="/nonexistent/w.pth"), C, M, K, MODS, S)
