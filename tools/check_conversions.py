#!/usr/bin/env python
"""Measure how exactly the converted weights reproduce their originals (run once, by hand).

* sklesion: original Keras model vs converted timm legacy_xception + SklesionHead on HAM10000 images
  (max |diff| of the 2048 pooled features and of the 7 probabilities, argmax agreement), plus two
  ablations that show why the converter needs TF 'same' max-pooling and BN eps 1e-3.
* efficientnet-lite{0,1,2}: ImageNet top-3 on scikit-learn's sample photos; with --lite-ref (a folder
  holding the `efficientnet_lite_pytorch` package, e.g. `pip download --no-deps efficientnet_lite_pytorch`
  unzipped) also the max |logit diff| against that reference implementation.

    python tools/check_conversions.py --ham ../shared/data/ham10000 --n 32 --out output/conversions.json
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lib.core.io import write_json  # noqa: E402
from lib.vision import backbones  # noqa: E402
from lib.vision import keras_convert as K  # noqa: E402
from lib.vision import weights as W  # noqa: E402
from tools._common import run_tool, setup_logging  # noqa: E402
from lib.vision.transforms import build_eval_transform  # noqa: E402

log = logging.getLogger("check_conversions")


def check_sklesion(ham: Path, n: int, batch: int) -> dict:
    import pandas as pd
    from PIL import Image

    keras = K.import_keras()
    km = K.load_sklesion_keras()
    head = K.build_sklesion_head()
    model = backbones.build_backbone("legacy_xception", "pypi:sklesion")
    plain = backbones.build_backbone("legacy_xception", "pypi:sklesion")  # ablation: torch-style max-pool
    for blk in (plain.block1, plain.block2, plain.block3, plain.block12):
        blk.rep[-1] = nn.MaxPool2d(3, 2, 1)
    eps = backbones.build_backbone("legacy_xception", "pypi:sklesion")  # ablation: PyTorch BN eps
    for m in eps.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    spec = backbones.preprocess_spec("legacy_xception", "pypi:sklesion")
    rows = pd.read_csv(ham / "HAM10000_metadata.csv").sample(n, random_state=0)
    out: dict = {"n": n, "feat_max_abs": 0.0, "feat_max": 0.0, "prob_max_abs": 0.0, "agree": 0,
                 "match_dx": 0, "ablation_torch_pool_feat_max_abs": 0.0, "ablation_bn_eps_feat_max_abs": 0.0}
    for i in range(0, n, batch):
        part = rows.iloc[i:i + batch]
        imgs = np.stack([np.asarray(Image.open(ham / "images" / f"{r.image_id}.jpg").convert("RGB")
                                    .resize((254, 254), Image.BILINEAR), np.float32) for r in part.itertuples()])
        meta = torch.stack([head.encode_meta(r.sex, r.localization, r.age) for r in part.itertuples()])
        kf = keras.ops.convert_to_numpy(km.get_layer("xception")(km.get_layer("normalization")(imgs),
                                                                  training=False))
        kp = keras.ops.convert_to_numpy(km([imgs, meta.numpy()], training=False))
        x = ((torch.from_numpy(imgs) / 255 - torch.tensor(spec["mean"])) / torch.tensor(spec["std"]))
        x = x.permute(0, 3, 1, 2).float()
        with torch.no_grad():
            f = model(x)
            p = head(f, meta)
            f_pool, f_eps = plain(x), eps(x)
        upd = {"feat_max_abs": np.abs(f.numpy() - kf).max(), "feat_max": np.abs(kf).max(),
               "prob_max_abs": np.abs(p.numpy() - kp).max(),
               "ablation_torch_pool_feat_max_abs": np.abs(f_pool.numpy() - kf).max(),
               "ablation_bn_eps_feat_max_abs": np.abs(f_eps.numpy() - kf).max()}
        for k, v in upd.items():
            out[k] = max(out[k], float(v))
        out["agree"] += int((p.argmax(1).numpy() == kp.argmax(1)).sum())
        out["match_dx"] += sum(K.SKLESION_CLASSES[j] == d.upper() for j, d in zip(kp.argmax(1), part["dx"]))
        log.info("sklesion: %d/%d images", min(i + batch, n), n)
    return out


def check_lite(ref: Path | None) -> dict:
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    info, out = ImageNetInfo(), {}
    if ref is not None:
        sys.path.insert(0, str(ref))
        from efficientnet_lite_pytorch import EfficientNet
    for n in W.LITE_SIZES:
        arch, weights = f"tf_efficientnet_lite{n}", f"pypi:efficientnet-lite{n}"
        model, spec = backbones.build_backbone(arch, weights, keep_head=True), backbones.preprocess_spec(arch, weights)
        res: dict = {"spec": spec}
        for img in ("china.jpg", "flower.jpg"):
            with torch.no_grad():
                x = build_eval_transform(spec, full_frame=False)(load_sample_image(img))  # timm's recipe
                prob = model(x[None]).softmax(1)[0]
            top = prob.topk(3)
            res[img] = [(int(j), info.index_to_description(int(j)), round(float(v), 3))
                        for v, j in zip(top.values, top.indices)]
        if ref is not None:
            r = EfficientNet.from_pretrained(f"efficientnet-lite{n}",
                                             weights_path=str(W.pypi_weights_path(weights))).eval()
            x = torch.randn(4, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                res["ref_logit_max_abs"] = float((r(x) - model(x)).abs().max())
        out[f"lite{n}"] = res
        log.info("lite%d: %s", n, res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ham", type=Path, default=Path("../shared/data/ham10000"))
    ap.add_argument("--n", type=int, default=32, help="HAM10000 images for the sklesion check")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lite-ref", type=Path, default=None)
    ap.add_argument("--skip-sklesion", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    setup_logging("%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return run_tool(lambda: check_all(args))


def check_all(args: argparse.Namespace) -> None:
    res = {"lite": check_lite(args.lite_ref)}
    if not args.skip_sklesion:
        res["sklesion"] = check_sklesion(args.ham, args.n, args.batch)
        res["sklesion"]["cache"] = str(K.convert_sklesion())
        log.info("sklesion: %s", res["sklesion"])
    if args.out:
        write_json(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
