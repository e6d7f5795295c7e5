"""Test-time augmentation views by name: the 8 dihedral transforms of a batch [B, C, H, W]."""
from __future__ import annotations

import torch

from lib.config.schema import TTA_ALIASES, TTA_VIEWS
from lib.core.errors import PipelineError

DIHEDRAL = TTA_VIEWS          # the 8 views and the aliases are defined once, in the config schema
ALIASES = TTA_ALIASES


def parse_views(names: list[str] | str) -> list[str]:
    """Expand aliases (`all8`, `flips`, `none`) and check names; order kept, duplicates dropped."""
    out: list[str] = []
    for n in [names] if isinstance(names, str) else names:
        for v in ALIASES.get(n, [n]):
            if v not in DIHEDRAL:
                raise PipelineError(f"unknown TTA view '{v}' (known: {list(DIHEDRAL)} or {list(ALIASES)})")
            if v not in out:
                out.append(v)
    return out or ["id"]


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Apply one dihedral view to the last two (spatial) dims."""
    if view == "id":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    if view == "rot90":
        return x.rot90(1, (-2, -1))
    if view == "rot180":
        return x.rot90(2, (-2, -1))
    if view == "rot270":
        return x.rot90(3, (-2, -1))
    if view == "transpose":
        return x.transpose(-2, -1)
    if view == "antitranspose":
        return x.rot90(2, (-2, -1)).transpose(-2, -1)
    raise PipelineError(f"unknown TTA view '{view}'")
