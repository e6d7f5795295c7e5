"""lib.config: strict schema (suggestions, list-item schemas), override parsing, `base:` include chains,
derived paths, save/load round trip, the script wrapper's exit codes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lib.config import cli, load, schema
from lib.config.schema import FINETUNE_SPEC
from lib.core import artifacts as A
from lib.core.errors import ConfigError, PipelineError

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, sort_keys=False))
    return path


# --------------------------------------------------------------------------- strict keys
def test_defaults_load_and_resolve():
    cfg = load.load_config()
    assert cfg["data"]["format"] == "milk10k"
    assert cfg["paths"]["prep"] == str(Path("output") / "prep" / "milk10k_sample")


@pytest.mark.parametrize("override, where, hint", [
    ("cache.szie=128", "cache.szie", "size"),
    ("folds.nsplits=3", "folds.nsplits", "n_splits"),
    ("dta.root=x", "dta", "data"),
    ("train.model.dropuot=0.1", "train.model.dropuot", "dropout"),
])
def test_unknown_key_names_path_and_suggests(override, where, hint):
    with pytest.raises(PipelineError) as e:
        load.load_config(None, [override])
    msg = str(e.value)
    assert f"unknown key '{where}'" in msg
    assert f"did you mean '{hint}'" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(PipelineError, match=r"unknown key 'zzzzzz'$"):
        load.load_config(None, ["zzzzzz=1"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = write(tmp_path / "x.yaml", {"cache": {"qualty": 80}})
    with pytest.raises(PipelineError, match=r"unknown key 'cache.qualty'.*'quality'"):
        load.load_config(p)


# --------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("text, expected", [
    ("a.b=3", {"a": {"b": 3}}),
    ("a=3.5", {"a": 3.5}),
    ("a.b.c=[1,2]", {"a": {"b": {"c": [1, 2]}}}),
    ("a=[id, hflip]", {"a": ["id", "hflip"]}),
    ("a=hello", {"a": "hello"}),
    ("a='3'", {"a": "3"}),
    ("a=true", {"a": True}),
    ("a=null", {"a": None}),
    ("a=x=y", {"a": "x=y"}),               # only the first '=' splits
    ("a=/tmp/some dir/out", {"a": "/tmp/some dir/out"}),
    ("a=1e-3", {"a": 1e-3}),               # YAML 1.1 would keep this a string
    ("a=-2.5E+2", {"a": -250.0}),
    ("a=1.5e2", {"a": 150.0}),             # YAML 1.1 needs a sign in the exponent
    ("a=.5e-1", {"a": 0.05}),
    ("a=1e3x", {"a": "1e3x"}),
    ("a={b: 1}", {"a": {"b": 1}}),
])
def test_parse_override(text, expected):
    out = load.parse_override(text)
    assert out == expected
    assert type(next(iter(_leaves(out)))) is type(next(iter(_leaves(expected))))


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict) and v:
            yield from _leaves(v)
        else:
            yield v


def test_override_without_equals_is_an_error():
    with pytest.raises(PipelineError, match="key.sub=value"):
        load.parse_override("cache.size")


def test_overrides_apply_in_order_and_keep_siblings():
    cfg = load.load_config(None, ["cache.size=128", "cache.size=64", "folds.n_splits=3", "features.tta=[id,vflip]"])
    assert cfg["cache"]["size"] == 64
    assert cfg["cache"]["quality"] == 90          # sibling kept
    assert cfg["folds"] == {"n_splits": 3, "seed": 42, "group": None}
    assert cfg["features"]["tta"] == ["id", "vflip"]


def test_scientific_learning_rate_override_is_a_float():
    cfg = load.load_config(None, ["train.lr=3e-4"])
    assert isinstance(cfg["train"]["lr"], float) and cfg["train"]["lr"] == pytest.approx(3e-4)


def test_scientific_value_in_yaml_file_is_a_float(tmp_path):
    p = write(tmp_path / "x.yaml", "train:\n  lr: 5e-4\n")
    assert load.load_config(p)["train"]["lr"] == pytest.approx(5e-4)


# --------------------------------------------------------------------------- list item schemas
def test_encoder_items_filled_from_item_schema():
    cfg = load.load_config(None, ["features.encoders=[{name: a, arch: resnet18}]"])
    assert cfg["features"]["encoders"] == [{"name": "a", "arch": "resnet18", "weights": None, "size": None,
                                            "hub": False, "tta": None, "cut": None,
                                            "finetune": False,
                                            "finetune_with": {k: None for k in FINETUNE_SPEC}}]


def test_encoder_finetune_with_is_strict_and_typed(tmp_path):
    enc = {"name": "a", "arch": "x", "cut": "c", "finetune": True}
    cfg = load.load_config(write(tmp_path / "ok.yaml", {"features": {"encoders": [
        {**enc, "finetune_with": {"epochs": 3, "tail_lr": 1e-4}}]}}))
    own = cfg["features"]["encoders"][0]["finetune_with"]
    assert own["epochs"] == 3 and own["tail_lr"] == pytest.approx(1e-4) and own["lr"] is None
    with pytest.raises(PipelineError, match=r"unknown key 'features\.encoders\[0\]\.finetune_with\.epoch'.*'epochs'"):
        load.load_config(write(tmp_path / "typo.yaml", {"features": {"encoders": [{**enc, "finetune_with": {"epoch": 3}}]}}))
    with pytest.raises(ConfigError, match=r"features\.encoders\[0\]\.finetune_with\.epochs = 0 is not allowed"):
        load.load_config(write(tmp_path / "bad.yaml", {"features": {"encoders": [{**enc, "finetune_with": {"epochs": 0}}]}}))

    # validate() on a hand-built config: a partial section is filled, a scalar / unknown key is one line
    load.validate(cfg)
    cfg["features"]["encoders"][0]["finetune_with"] = {"epochs": 2}
    load.validate(cfg)
    cfg["features"]["encoders"][0]["finetune_with"] = None
    load.validate(cfg)
    for bad, msg in ((3, r"finetune_with = 3 is not allowed: expected a mapping"),
                     ({"epoch": 2}, r"unknown key 'features\.encoders\[0\]\.finetune_with\.epoch'")):
        cfg["features"]["encoders"][0]["finetune_with"] = bad
        with pytest.raises(ConfigError, match=msg):
            load.validate(cfg)


def test_encoder_item_unknown_key(tmp_path):
    p = write(tmp_path / "x.yaml", {"features": {"encoders": [{"name": "a", "arch": "x"},
                                                              {"name": "b", "arhc": "y"}]}})
    with pytest.raises(PipelineError, match=r"unknown key 'features\.encoders\[1\]\.arhc'.*'arch'"):
        load.load_config(p)


def test_encoder_item_must_be_mapping():
    with pytest.raises(ConfigError, match=r"^config: features\.encoders\[0\] = 'lite0' is not allowed: "
                                          r"expected a mapping with keys name, arch, weights, size, hub, tta, cut, finetune, finetune_with$"):
        load.load_config(None, ["features.encoders=[lite0]"])


def test_encoder_names_unique_and_non_empty():
    with pytest.raises(ConfigError, match=r"features\.encoders = .* expected items with distinct names \(repeated: a\)"):
        load.load_config(None, ["features.encoders=[{name: a, arch: x}, {name: b, arch: y}, {name: a, arch: z}]"])
    with pytest.raises(ConfigError, match=r"features\.encoders\[0\]\.name = null is not allowed: expected a non-empty"):
        load.load_config(None, ["features.encoders=[{arch: resnet18}]"])


def test_submit_members_accept_strings():
    cfg = load.load_config(None, ["submit.members=[expA, {exp: expB, weight: 0.3}]"])
    assert cfg["submit"]["members"] == [{"exp": "expA", "weight": None}, {"exp": "expB", "weight": 0.3}]


def test_free_form_image_cols_mapping_is_replaced_not_checked():
    cfg = load.load_config(None, ["data.generic.image_cols={derm: d, clin: c}"])
    assert cfg["data"]["generic"]["image_cols"] == {"derm": "d", "clin": "c"}


# --------------------------------------------------------------------------- enums / derived paths
def test_bad_enums():
    with pytest.raises(ConfigError, match=r"^config: data\.format = 'foo' is not allowed: expected one of milk10k, "):
        load.load_config(None, ["data.format=foo"])
    with pytest.raises(ConfigError, match=r"^config: cache\.mode = 'crop' is not allowed: expected one of short_side, pad"):
        load.load_config(None, ["cache.mode=crop"])


@pytest.mark.parametrize("root, name", [
    ("input/milk10k_sample", "milk10k_sample"),
    ("input/milk10k_sample/", "milk10k_sample"),
    ("../shared/data/milk10k", "milk10k"),
    ("/abs/path/ham", "ham"),
])
def test_prep_path_derived_from_output_and_data_root(tmp_path, root, name):
    cfg = load.load_config(None, [f"data.root={root}", f"paths.output={tmp_path}"])
    assert Path(cfg["paths"]["prep"]) == tmp_path / "prep" / name
    assert A.prep_dir(cfg) == tmp_path / "prep" / name
    assert A.exp_dir(cfg) == tmp_path / "default"


def test_explicit_prep_path_wins(tmp_path):
    cfg = load.load_config(None, [f"paths.prep={tmp_path / 'p'}", "paths.output=elsewhere"])
    assert A.prep_dir(cfg) == tmp_path / "p"


# --------------------------------------------------------------------------- base includes
def test_base_include_chain(tmp_path):
    write(tmp_path / "shared" / "root.yaml", {"seed": 1, "cache": {"size": 128, "quality": 80},
                                              "folds": {"n_splits": 3}})
    write(tmp_path / "mid.yaml", {"base": "shared/root.yaml", "seed": 2, "cache": {"size": 192}})
    write(tmp_path / "other.yaml", {"exp": "from_other", "folds": {"seed": 9}})
    leaf = write(tmp_path / "exp" / "leaf.yaml", {"base": ["../mid.yaml", "../other.yaml"], "exp": "leaf"})
    cfg = load.load_config(leaf, ["cache.quality=70"])
    assert cfg["seed"] == 2                                # mid overrides root
    assert cfg["cache"]["size"] == 192 and cfg["cache"]["quality"] == 70   # nested merge + CLI last
    assert cfg["folds"] == {"n_splits": 3, "seed": 9, "group": None}       # two bases merged
    assert cfg["exp"] == "leaf"                            # the file itself beats its bases


def test_base_errors(tmp_path):
    a = write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(PipelineError, match="circular base include"):
        load.load_config(a)
    c = write(tmp_path / "c.yaml", {"base": "missing.yaml"})
    with pytest.raises(PipelineError, match=r"file not found: .*missing\.yaml"):
        load.load_config(c)
    d = write(tmp_path / "d.yaml", "cache: [unclosed\n")
    with pytest.raises(PipelineError, match=r"d\.yaml: invalid YAML"):
        load.load_config(d)
    e = write(tmp_path / "e.yaml", "- a\n- b\n")
    with pytest.raises(PipelineError, match="top level must be a mapping"):
        load.load_config(e)


def test_shipped_configs_load():
    for p in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = load.load_config(p)
        assert cfg["data"]["root"]


# --------------------------------------------------------------------------- save / load
def test_save_config_round_trip(tmp_path):
    cfg = load.load_config(ROOT / "configs" / "milk10k_sample" / "stack.yaml",
                        [f"paths.output={tmp_path}", "train.lr=2e-4", "features.tta=[all8]"])
    path = A.save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load.load_config(path) == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]   # no temp files left


# --------------------------------------------------------------------------- CLI wrapper
def test_cli_flags_become_overrides(tmp_path):
    cfg, ns = cli.cli_config(["--data", "somewhere/ham", "--output", str(tmp_path), "--exp", "e1",
                            "cache.size=96"], "desc")
    assert cfg["data"]["root"] == "somewhere/ham"
    assert cfg["exp"] == "e1" and cfg["cache"]["size"] == 96
    assert A.prep_dir(cfg) == tmp_path / "prep" / "ham"


def test_run_script_turns_pipeline_error_into_exit_2(capsys):
    def main(cfg):
        raise PipelineError("bad thing in file.csv line 3")

    assert cli.run_script(main, ["cache.size=32"], "d") == 2
    err = capsys.readouterr().err
    assert "error: bad thing in file.csv line 3" in err and "Traceback" not in err
    assert cli.run_script(lambda cfg: None, [], "d") == 0
    assert cli.run_script(lambda cfg: None, ["cache.bogus=1"], "d") == 2


def test_section_given_a_value_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"config: 'train\.sampler' is a section; set its keys \(kind, power"):
        load.load_config(None, ["train.sampler=balanced"])
    with pytest.raises(PipelineError, match=r"config: 'cache' is a section"):
        load.load_config(write(tmp_path / "x.yaml", "cache: 5\n"))
    cfg = load.load_config(write(tmp_path / "y.yaml", "cache:\n  # size: 128\nseed: 3\n"))   # empty section
    assert cfg["cache"] == schema.defaults()["cache"] and cfg["seed"] == 3


def test_encoder_cross_key_rules_fail_at_load_naming_the_bad_item(tmp_path):
    good = {"name": "a", "arch": "x", "cut": "c", "finetune": True}
    p = write(tmp_path / "x.yaml", {"features": {"encoders": [good, {"name": "b", "arch": "y", "finetune": True}]}})
    with pytest.raises(ConfigError, match=r"^config: features\.encoders\[1\]\.finetune = true \(item 'b'\) is not "
                                          r"allowed: finetune needs cut") as e:
        load.load_config(p)
    assert "\n" not in str(e.value)
    p = write(tmp_path / "y.yaml", {"features": {"encoders": [good, {"name": "b", "arch": "y",
                                                                     "finetune_with": {"epochs": 2}}]}})
    with pytest.raises(ConfigError, match=r"features\.encoders\[1\]\.finetune_with = .*finetune_with is set but "
                                          r"finetune is false"):
        load.load_config(p)
    cfg = load.load_config(None)          # validate() on a hand-built config checks the same rules
    cfg["features"]["encoders"] = [{**schema.ENCODER_ITEM, **good}, {**schema.ENCODER_ITEM, "name": "b",
                                                                      "arch": "y", "finetune": True}]
    with pytest.raises(ConfigError, match=r"encoders\[1\]\.finetune = true"):
        load.validate(cfg)


def test_features_runtime_is_a_choice_and_loads_without_onnxruntime():
    import subprocess
    import sys
    assert load.load_config(None)["features"]["runtime"] == "auto"
    with pytest.raises(ConfigError, match=r"^config: features\.runtime = 'onnx' is not allowed: expected one of "
                                          r"auto, torch, onnxruntime$"):
        load.load_config(None, ["features.runtime=onnx"])
    code = ("import sys\nfrom lib.config.load import load_config\n"
            "load_config(None, ['features.runtime=onnxruntime'])\nprint('onnxruntime' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
