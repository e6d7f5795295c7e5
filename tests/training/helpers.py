"""Shared by the training tests: a tiny config on the prepared MILK10k sample (timm's
`test_efficientnet`, random init, 64 px, one epoch) and small loaders."""
from __future__ import annotations

from pathlib import Path

import torch

from lib.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "input" / "milk10k_sample"


def tiny(prep: Path, out: Path, exp: str, *extra: str) -> dict:
    ov = [f"paths.output={out}", f"paths.prep={prep / 'prep' / 'milk10k_sample'}", f"data.root={SAMPLE}",
          f"exp={exp}", "threads=1", "train.model.arch=test_efficientnet", "train.model.weights=null",
          "train.model.hidden=16", "train.model.xattn_dim=16", "train.model.xattn_heads=2",
          "train.model.xattn_queries=2", "train.model.msd=2", "train.img_size=64", "train.epochs=1",
          "train.batch_size=32", "train.workers=0", "train.tta=[id]", "train.val_every=0", *extra]
    return load_config(ROOT / "configs/milk10k_sample/base.yaml", ov)


def data(cfg: dict):
    from lib.data.dataset import load_dataset

    return load_dataset(cfg)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
