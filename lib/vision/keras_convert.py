"""sklesion's Keras 3 model -> timm `legacy_xception` + `SklesionHead`, converted once and cached.

`convert_sklesion()` reads the `model.keras` of the installed `sklesion` package (Xception trained on
HAM10000), maps its layers onto timm `legacy_xception` (TF-style 'same' max-pools, BN eps 1e-3) and
its Dense/BN head onto `SklesionHead`, and caches the result as
`$SKL_CACHE_DIR/sklesion-<version>_legacy_xception.pth` (Keras is not needed once it exists).
Keras is imported lazily, only here (`import_keras`); nothing else in the package imports it.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.core.io import atomic_path
from lib.vision.checkpoints import (
    create_timm,
    dist_version,
    load_checked,
    package_dir,
    read_weights_file,
)

log = logging.getLogger(__name__)

SKLESION_ARCH = "legacy_xception"
SKLESION_CLASSES = ("AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC")  # sklesion output order
# HAM10000 `localization` -> sklesion location group. The package does not ship this mapping;
# this is our best reading of its 5 groups (acral is ambiguous and goes to 'unknown').
HAM_TO_SKLESION_LOC = {
    "upper extremity": "arm", "hand": "arm",
    "scalp": "head-or-neck", "face": "head-or-neck", "ear": "head-or-neck", "neck": "head-or-neck",
    "lower extremity": "leg-or-genital", "foot": "leg-or-genital", "genital": "leg-or-genital",
    "back": "trunk", "trunk": "trunk", "chest": "trunk", "abdomen": "trunk",
}
_CONVERTER_VERSION = 1


def cache_dir() -> Path:
    """Folder for converted weights: env `SKL_CACHE_DIR`, default `~/.cache/skin_lesion_pipeline`."""
    return Path(os.environ.get("SKL_CACHE_DIR") or Path.home() / ".cache" / "skin_lesion_pipeline")


class SklesionHead(nn.Module):
    """sklesion's classifier: pooled Xception features [B,2048] + metadata [B,10] -> 7 probabilities.

    Keras graph: image: Dropout -> Dense(264, relu) -> BN; meta: Dense(224, relu) -> BN ->
    Dense(64, relu) -> BN; concat(image, meta) -> Dropout -> Dense(32, relu) -> BN -> Dense(7, softmax).
    Class order: `SKLESION_CLASSES`. Metadata vectors come from `encode_meta`.
    """

    def __init__(self, meta_spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        bn = lambda n: nn.BatchNorm1d(n, eps=1e-3)  # noqa: E731
        self.img_fc, self.img_bn = nn.Linear(2048, 264), bn(264)
        self.meta_fc1, self.meta_bn1 = nn.Linear(10, 224), bn(224)
        self.meta_fc2, self.meta_bn2 = nn.Linear(224, 64), bn(64)
        self.fc, self.bn = nn.Linear(328, 32), bn(32)
        self.out = nn.Linear(32, len(SKLESION_CLASSES))
        self.meta_spec = meta_spec or {}

    def logits(self, feats: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        img = self.img_bn(torch.relu(self.img_fc(feats)))
        m = self.meta_bn2(torch.relu(self.meta_fc2(self.meta_bn1(torch.relu(self.meta_fc1(meta))))))
        return self.out(self.bn(torch.relu(self.fc(torch.cat([img, m], dim=1)))))

    def forward(self, feats: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(feats, meta), dim=1)

    def encode_meta(self, sex: str | None, localization: str | None,
                    age: float | None) -> torch.Tensor:
        """[10] vector as sklesion builds it: one-hot sex(3) + location(5), age/age_max, age_missing.
        `localization` may be a HAM10000 value (mapped by HAM_TO_SKLESION_LOC) or a sklesion group."""
        spec = self.meta_spec
        sexes, locs = spec["sex"], spec["loc"]
        sex = sex if sex in sexes else "unknown"
        loc = HAM_TO_SKLESION_LOC.get(localization or "", localization)
        loc = loc if loc in locs else "unknown"
        missing = age is None or (isinstance(age, float) and math.isnan(age))
        a = spec["age_mean"] if missing else float(age)
        v = [float(s == sex) for s in sexes] + [float(s == loc) for s in locs]
        return torch.tensor(v + [a / spec["age_max"], float(missing)], dtype=torch.float32)


def build_sklesion_head() -> SklesionHead:
    """The converted sklesion classifier head (eval mode), from the cache (converted if needed)."""
    obj = read_weights_file(convert_sklesion())
    head = SklesionHead(obj["meta"]["meta_spec"])
    load_checked(head, obj["head"], source="sklesion head", keep_head=True)
    return head.eval()


def sklesion_spec() -> dict[str, Any]:
    """Preprocessing spec of the converted model (mean/std from its Keras Normalization layer)."""
    meta = read_weights_file(convert_sklesion())["meta"]
    # sklesion resizes the whole image (tf.image.resize, bilinear) to 254x254: no crop.
    return dict(size=int(meta["size"]), mean=[float(v) for v in meta["mean"]],
                std=[float(v) for v in meta["std"]], interpolation="bilinear", resize_mode="squash",
                crop_pct=1.0)


def sklesion_package_file(name: str = "model.keras") -> Path:
    """A file of the installed `sklesion` package (PipelineError with the pip command if absent)."""
    path = package_dir("sklesion", "sklesion", no_deps=True) / name
    if not path.is_file():
        raise PipelineError(f"sklesion package file missing: {path}")
    return path


def import_keras() -> Any:
    """Import Keras 3 on the torch backend (set before the first import; tensorflow not needed)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as e:
        raise PipelineError(f"reading sklesion's model.keras needs Keras 3 with KERAS_BACKEND=torch: "
                            f"pip install keras ({e})") from None
    if keras.backend.backend() != "torch":
        log.warning("keras runs on backend %r, not torch", keras.backend.backend())
    return keras


def load_sklesion_keras() -> Any:
    """Load the original sklesion Keras model (inputs: image [B,254,254,3] in 0..255, meta [B,10])."""
    path = sklesion_package_file()
    return import_keras().saving.load_model(str(path), compile=False)


def convert_sklesion(force: bool = False) -> Path:
    """Convert sklesion's Keras model to a cached .pth (once; Keras is not needed afterwards).

    File content: {"state_dict": timm legacy_xception weights (no fc), "head": SklesionHead weights,
    "meta": {"tf_same": True, "mean", "std", "size", "meta_spec", ...}}. Returns its path.
    """
    version = dist_version("sklesion", "sklesion", no_deps=True)
    out = cache_dir() / f"sklesion-{version}_{SKLESION_ARCH}.pth"
    if out.is_file() and not force:
        return out
    log.info("converting sklesion %s Keras model -> %s", version, out)
    try:
        km = load_sklesion_keras()
    except PipelineError as e:
        raise PipelineError(f"sklesion weights: no converted file {out.name} in {out.parent} and they cannot be "
                            f"converted here ({e}); convert once where Keras 3 is installed (python "
                            "tools/kaggle_install.py export-sklesion) and put the file in that folder, or point "
                            "paths.weights_cache / SKL_CACHE_DIR at the folder that holds it") from None
    xc = km.get_layer("xception")
    model = create_timm(SKLESION_ARCH, pretrained=False)
    model.reset_classifier(0)
    tf_same_ops_(model)
    sd = _keras_xception_to_timm(xc)
    load_checked(model, sd, source=f"sklesion {version} xception", keep_head=False)
    head = SklesionHead()
    load_checked(head, _keras_head_to_torch(km), source="sklesion head", keep_head=True)
    norm = km.get_layer("normalization")
    mean = torch.as_tensor(_np(norm.mean)).reshape(-1).double()
    var = torch.as_tensor(_np(norm.variance)).reshape(-1).double()
    # Keras Normalization: (x255 - mean) / sqrt(var)  ==  (x255/255 - mean/255) / (sqrt(var)/255)
    meta = dict(tf_same=True, arch=SKLESION_ARCH, source=f"sklesion=={version}",
                converter=_CONVERTER_VERSION, size=int(km.inputs[0].shape[1]),
                input_scale=255.0, mean=(mean / 255).tolist(), std=(var.sqrt() / 255).tolist(),
                classes=list(SKLESION_CLASSES), meta_spec=_sklesion_meta_spec())
    with atomic_path(out) as tmp:
        torch.save({"state_dict": model.state_dict(), "head": head.state_dict(), "meta": meta}, tmp)
    log.info("wrote %s", out)
    return out


def tf_same_ops_(model: nn.Module) -> None:
    """Make a timm Xception compute like Keras: BN eps 1e-3 and TF 'same' max-pooling.

    torch MaxPool2d(3, 2, padding=1) pads one pixel on both sides; TF 'same' pads (0, 1) for even
    inputs (and (1, 1) for odd ones), so windows differ by one pixel on even sizes (124, 62, 16 at
    254 px input).
    """
    from timm.layers.pool2d_same import MaxPool2dSame

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
            elif type(child) is nn.MaxPool2d:
                setattr(parent, name, MaxPool2dSame(child.kernel_size, child.stride))


def _np(x: Any) -> Any:
    return import_keras().ops.convert_to_numpy(x)


def _keras_bn(layer: Any, prefix: str) -> dict[str, torch.Tensor]:
    g, b, m, v = (torch.from_numpy(_np(w)) for w in layer.weights)  # gamma, beta, mean, variance
    return {f"{prefix}.weight": g, f"{prefix}.bias": b, f"{prefix}.running_mean": m,
            f"{prefix}.running_var": v, f"{prefix}.num_batches_tracked": torch.tensor(0)}


def _keras_conv(layer: Any, prefix: str) -> dict[str, torch.Tensor]:
    kind = type(layer).__name__
    ws = {w.path.rsplit("/", 1)[-1]: torch.from_numpy(_np(w)) for w in layer.weights}
    if kind == "Conv2D":  # HWIO -> OIHW
        return {f"{prefix}.weight": ws["kernel"].permute(3, 2, 0, 1).contiguous()}
    if kind == "SeparableConv2D":  # depthwise H,W,C,1 -> C,1,H,W ; pointwise 1,1,I,O -> O,I,1,1
        return {f"{prefix}.conv1.weight": ws["depthwise_kernel"].permute(2, 3, 0, 1).contiguous(),
                f"{prefix}.pointwise.weight": ws["pointwise_kernel"].permute(3, 2, 0, 1).contiguous()}
    raise PipelineError(f"unexpected Keras layer {layer.name} ({kind}) in sklesion xception")


def _keras_xception_to_timm(xc: Any) -> dict[str, torch.Tensor]:
    """Keras `keras.applications.Xception` layer names -> timm `legacy_xception` state dict."""
    pairs = [("block1_conv1", "conv1"), ("block1_conv1_bn", "bn1"),
             ("block1_conv2", "conv2"), ("block1_conv2_bn", "bn2")]
    for kb in range(2, 14):  # Keras block k == timm block k-1
        off = 0 if kb == 2 else 1  # timm rep starts with a ReLU except in block1
        for j in range(1, 4 if 5 <= kb <= 12 else 3):
            pairs += [(f"block{kb}_sepconv{j}", f"block{kb - 1}.rep.{3 * (j - 1) + off}"),
                      (f"block{kb}_sepconv{j}_bn", f"block{kb - 1}.rep.{3 * (j - 1) + off + 1}")]
    pairs += [("block14_sepconv1", "conv3"), ("block14_sepconv1_bn", "bn3"),
              ("block14_sepconv2", "conv4"), ("block14_sepconv2_bn", "bn4")]
    # residual 1x1 conv + BN (unnamed in Keras: conv2d, conv2d_1, ...) in graph order
    res_conv = [l for l in xc.layers if type(l).__name__ == "Conv2D" and not l.name.startswith("block")]
    res_bn = [l for l in xc.layers
              if type(l).__name__ == "BatchNormalization" and not l.name.startswith("block")]
    if len(res_conv) != 4 or len(res_bn) != 4:
        raise PipelineError(f"sklesion xception: expected 4 residual conv/BN layers, found "
                            f"{[l.name for l in res_conv]} / {[l.name for l in res_bn]}")
    for c, b, tb in zip(res_conv, res_bn, (1, 2, 3, 12)):
        pairs += [(c.name, f"block{tb}.skip"), (b.name, f"block{tb}.skipbn")]
    sd: dict[str, torch.Tensor] = {}
    for kname, tname in pairs:
        layer = xc.get_layer(kname)
        is_bn = type(layer).__name__ == "BatchNormalization"
        sd.update(_keras_bn(layer, tname) if is_bn else _keras_conv(layer, tname))
    n_weighted = sum(1 for l in xc.layers if l.weights)
    if n_weighted != len(pairs):
        raise PipelineError(f"sklesion xception has {n_weighted} weighted layers, mapped {len(pairs)}")
    return sd


def _keras_head_to_torch(km: Any) -> dict[str, torch.Tensor]:
    """Map the sklesion Dense/BN head (found by its graph wiring) onto SklesionHead."""
    def src(layer: Any, i: int = 0) -> str:
        return layer._inbound_nodes[0].input_tensors[i]._keras_history[0].name

    out = km.get_layer(km.outputs[0]._keras_history[0].name)  # Dense(7, softmax)
    bn = km.get_layer(src(out))
    fc = km.get_layer(src(bn))
    cat = km.get_layer(src(km.get_layer(src(fc))))  # fc <- dropout <- concatenate
    img_bn, meta_bn2 = (km.get_layer(src(cat, i)) for i in (0, 1))
    img_fc, meta_fc2 = km.get_layer(src(img_bn)), km.get_layer(src(meta_bn2))
    meta_bn1 = km.get_layer(src(meta_fc2))
    meta_fc1 = km.get_layer(src(meta_bn1))
    if src(km.get_layer(src(img_fc))) != "xception" or src(meta_fc1) != km.inputs[1]._keras_history[0].name:
        raise PipelineError("sklesion head graph is not the expected image+metadata MLP")
    sd: dict[str, torch.Tensor] = {}
    for name, layer in [("img_fc", img_fc), ("meta_fc1", meta_fc1), ("meta_fc2", meta_fc2),
                        ("fc", fc), ("out", out)]:
        k, b = (torch.from_numpy(_np(w)) for w in layer.weights)
        sd.update({f"{name}.weight": k.T.contiguous(), f"{name}.bias": b})
    for name, layer in [("img_bn", img_bn), ("meta_bn1", meta_bn1), ("meta_bn2", meta_bn2), ("bn", bn)]:
        sd.update(_keras_bn(layer, name))
    return sd


def _sklesion_meta_spec() -> dict[str, Any]:
    import pickle

    with open(sklesion_package_file("model_props.pkl"), "rb") as f:
        props = pickle.load(f)  # noqa: S301 - file of the installed package
    cls = [props["i_cl_map"][i].upper() for i in sorted(props["i_cl_map"])]
    if tuple(cls) != SKLESION_CLASSES:
        raise PipelineError(f"sklesion class order {cls} differs from {SKLESION_CLASSES}")
    oh = props["oh_map"]
    order = lambda m: [k for k, _ in sorted(m.items(), key=lambda kv: list(kv[1]).index(1))]  # noqa: E731
    return dict(sex=order(oh["sex"]), loc=order(oh["loc"]), age_mean=float(props["age_mean"]),
                age_max=float(props["age_max"]), img_shape=[int(s) for s in props["img_shape"]])

