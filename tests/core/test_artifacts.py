"""lib.core.artifacts: file names, folder resolution, config fingerprint, manifest content, the folds
check, the transitive stage times and the cv.json document (no stage run: tiny files in tmp)."""
from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest

from lib.config.load import load_config
from lib.core import artifacts as A
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import read_json, write_text


def _cfg(tmp_path: Path, exp: str = "e1", *ov: str) -> dict:
    return load_config(None, [f"paths.output={tmp_path}", f"paths.prep={tmp_path / 'prep' / 'd'}", f"exp={exp}",
                              *ov])


def _folds(cfg: dict, text: str = "lesion_id,fold\nA,0\nB,1\n") -> None:
    write_text(text, A.prep_dir(cfg) / A.FOLDS)


def test_names_and_folders(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert (A.OOF, A.TEST, A.CV, A.MANIFEST, A.CONFIG, A.FOLDS, A.DATASET) == (
        "oof.parquet", "test.parquet", "cv.json", "manifest.json", "config.yaml", "folds.csv", "dataset.json")
    assert (A.SUBMISSION, A.THRESHOLDS, A.REPORT) == ("submission.csv", "thresholds.json", "report.md")
    assert A.features_file("lite0", "train") == "lite0_train.parquet"
    assert A.features_file("lite0", "test", "json") == "lite0_test.json"
    assert A.head_file("oof", "xgb") == "oof_xgb.parquet" and A.fold_name(3) == "fold3"
    assert A.cache_file("train") == "train.parquet" and A.cache_file("test", "json") == "test.json"
    assert A.trunk_file("test", "clinical") == "test_clinical.npy"
    assert A.rows_file("test", "0123456789abcdef" * 2) == "test-0123456789abcdef.parquet"
    assert A.rows_file("train", "ab" * 20, "json") == f"train-{'ab' * 8}.json"
    assert A.finetune_fold_file(2) == "fold2.safetensors" and A.FOLD_TEST_ROWS == "test_logits.json"
    assert (A.CHECKPOINT, A.MODEL, A.FOLD_SUMMARY_JSON, A.HISTORY) == ("checkpoint.pt", "model.pt", "summary.json",
                                                                       "history.csv")
    assert A.exp_folder(cfg) == A.exp_dir(cfg) == tmp_path / "e1"
    assert A.exp_folder(cfg, "other") == tmp_path / "other"
    assert A.features_dir(cfg) == tmp_path / "e1" / "features"
    assert A.features_dir(cfg, "x") == tmp_path / "x" / "features"
    assert A.fold_dir(cfg, 2) == tmp_path / "e1" / "fold2" and A.fold_dir(cfg, 0, "x") == tmp_path / "x" / "fold0"
    assert A.prep_dir(cfg) == tmp_path / "prep" / "d"
    assert [n for n, _ in A.STAGES.values()] == ["01", "02", "03", "04", "05", "06"]


def test_config_fingerprint_ignores_runtime_keys_only(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fp = A.config_fingerprint(cfg)
    assert len(fp) == 12 and A.config_fingerprint(copy.deepcopy(cfg)) == fp
    for ov in ("exp=other", "threads=2", "device=cpu", "train.workers=3", f"paths.output={tmp_path / 'z'}",
               "features.batch_size=7", "stack.xgb.n_jobs=1"):
        assert A.config_fingerprint(_cfg(tmp_path, "e1", ov)) == fp, ov
    for ov in ("seed=1", "train.epochs=9", "folds.seed=3", "stack.pca_components=5"):
        assert A.config_fingerprint(_cfg(tmp_path, "e1", ov)) != fp, ov
    assert cfg == _cfg(tmp_path)  # the config itself is not modified


def _fold_fingerprint_before_one_function(cfg: dict) -> str:
    """lib/training/fold.py's own fingerprint before it moved here (kept so existing fold{k}/ stay valid)."""
    t = {k: v for k, v in cfg["train"].items() if k not in ("workers", "log_every", "folds", "keep_checkpoint")}
    key = {"train": t, "seed": cfg["seed"], "prep": str(cfg["paths"]["prep"]), "folds": cfg["folds"],
           "format": cfg["data"]["format"]}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def test_fold_fingerprint_scope(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fp = A.config_fingerprint(cfg, scope="fold")
    assert fp == _fold_fingerprint_before_one_function(cfg) and fp != A.config_fingerprint(cfg)
    shipped = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*train*.yaml"))
    assert shipped
    for p in shipped:
        c = load_config(p)
        assert A.config_fingerprint(c, scope="fold") == _fold_fingerprint_before_one_function(c), p
    # runtime keys and the sections a fold does not read leave it; what trains the fold changes it
    for ov in ("exp=other", "train.workers=3", "train.folds=[1]", "train.keep_checkpoint=true", "train.log_every=5",
               f"paths.output={tmp_path / 'z'}", "stack.pca_components=5", "submit.blend=rank", "cache.size=64"):
        assert A.config_fingerprint(_cfg(tmp_path, "e1", ov), scope="fold") == fp, ov
    for ov in ("seed=1", "train.epochs=9", "folds.seed=3", f"paths.prep={tmp_path / 'other'}", "data.format=ham10000"):
        assert A.config_fingerprint(_cfg(tmp_path, "e1", ov), scope="fold") != fp, ov
    with pytest.raises(ValueError, match="scope"):
        A.config_fingerprint(cfg, scope="folds")


def test_manifest_content(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _folds(cfg)
    A.write_manifest(cfg, A.prep_dir(cfg), "prepare", [], 1.234, exp="d")
    inp = A.input_record(cfg, A.prep_dir(cfg), "prep")
    assert inp == {"role": "prep", "exp": "d", "stage": "prepare", "path": "prep/d",
                   "fingerprint": A.config_fingerprint(cfg), "folds_sha1": A.folds_sha1(cfg), "wall_seconds": 1.23}
    p = A.write_manifest(cfg, A.exp_dir(cfg), "stack", [inp], 5.0, extra={"note": "x"})
    m = read_json(p)
    assert p == tmp_path / "e1" / "manifest.json" and not list(p.parent.glob("*.tmp"))
    assert m["stage"] == "stack" and m["script"] == "04_stack.py" and m["exp"] == "e1" and m["path"] == "e1"
    assert m["fingerprint"] == A.config_fingerprint(cfg) and m["inputs"] == [inp] and m["note"] == "x"
    assert m["folds_sha1"] == A.file_sha1(A.prep_dir(cfg) / A.FOLDS) and len(m["folds_sha1"]) == 40
    assert m["wall_seconds"] == 5.0 and datetime.fromisoformat(m["created_utc"]).utcoffset().total_seconds() == 0
    assert m["versions"]["python"].count(".") == 2 and m["versions"]["lib"]
    assert {"numpy", "pandas", "xgboost", "lightgbm", "timm", "onnxruntime"} <= set(m["versions"])
    assert {"device", "threads", "cpu_capability", "cpu", "machine", "platform"} <= set(m["determinism"])
    with pytest.raises(ValueError):
        A.write_manifest(cfg, A.exp_dir(cfg), "nope", [], 1.0)
    assert A.input_record(cfg, tmp_path / "nothing", "member")["fingerprint"] is None


def test_require_same_folds(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _folds(cfg)
    member = A.exp_folder(cfg, "m")
    (member / "fold0").mkdir(parents=True)
    with pytest.raises(MissingArtifactError, match="member 'm' .* no manifest.json .* rerun 02_train_fold.py"):
        A.require_same_folds(cfg, member, "member", "m")
    A.write_manifest(cfg, member, "train", [], 1.0, exp="m")
    assert A.require_same_folds(cfg, member, "member", "m")["exp"] == "m"
    old = A.folds_sha1(cfg)
    _folds(cfg, "lesion_id,fold\nA,1\nB,0\n")  # the same lesions, other folds
    with pytest.raises(MissingArtifactError) as e:
        A.require_same_folds(cfg, member, "member", "m")
    msg = str(e.value)
    assert old[:8] in msg and A.folds_sha1(cfg)[:8] in msg and "02_train_fold.py" in msg and "\n" not in msg
    assert isinstance(e.value, PipelineError)


def test_guess_stage_of_a_folder_without_manifest(tmp_path: Path) -> None:
    for stage, name in (("submit", A.SUBMISSION), ("stack", A.IMPORTANCE), ("features", "x_train.parquet"),
                        ("train", "fold0")):
        d = tmp_path / stage
        d.mkdir()
        (d / name).mkdir() if name == "fold0" else (d / name).write_text("")
        assert A.guess_stage(d) == stage


def test_stage_times_follow_inputs_transitively(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _folds(cfg)
    prep = A.prep_dir(cfg)
    A.write_manifest(cfg, prep, "prepare", [], 2.0, exp="d")
    p_in = A.input_record(cfg, prep, "prep")
    A.write_manifest(cfg, A.exp_folder(cfg, "tr"), "train", [p_in], 30.0, exp="tr")
    A.write_manifest(cfg, A.features_dir(cfg, "st"), "features", [p_in], 5.0, exp="st/features",
                     extra={"parts": {"lite0 embeddings": 3.0, "ft_lite0 fine-tune": 1.5}})
    A.write_manifest(cfg, A.exp_folder(cfg, "st"), "stack", [
        p_in, A.input_record(cfg, A.features_dir(cfg, "st"), "features"),
        A.input_record(cfg, A.exp_folder(cfg, "tr"), "oof_exp")], 7.0, exp="st")
    inputs = [A.input_record(cfg, A.exp_folder(cfg, e), "member") for e in ("st", "tr", "no_manifest")]
    rows = A.stage_times(cfg, inputs)
    assert [(r["number"], r["stage"], r["exp"], r["wall_seconds"]) for r in rows] == [
        ("01", "prepare", "d", 2.0), ("02", "train", "tr", 30.0), ("03", "features", "st/features", 5.0),
        ("03", "· lite0 embeddings", "st/features", 3.0), ("03", "· ft_lite0 fine-tune", "st/features", 1.5),
        ("04", "stack", "st", 7.0)]
    assert [bool(r.get("part")) for r in rows] == [False, False, False, True, True, False]


def test_cv_document_common_keys() -> None:
    doc = A.cv_document("stack", "e", "multiclass", {"n": 3, "task": "multiclass", "macro_dice_05": 0.5},
                        stack={"blocks": {}})
    assert list(doc)[:3] == ["schema_version", "stage", "exp"] and doc["task"] == "multiclass"
    assert doc["schema_version"] == A.CV_SCHEMA_VERSION and doc["n"] == 3 and doc["stack"] == {"blocks": {}}
    with pytest.raises(ValueError, match="clash"):
        A.cv_document("stack", "e", "multiclass", {"n": 3}, n=4)


def test_determinism_record_reads_torch_only_when_it_is_loaded(monkeypatch) -> None:
    """The manifest's determinism block: device, threads and CPU capability from torch when a stage
    has loaded it; lib.core never imports torch for it (null fields instead)."""
    import sys

    import torch

    d = A.determinism({"device": "auto"})
    assert d["device"] in ("cpu", "cuda") and d["threads"] == torch.get_num_threads()
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and d["cpu"]
    monkeypatch.delitem(sys.modules, "torch")
    d = A.determinism({"device": "auto"})
    assert (d["device"], d["threads"], d["cpu_capability"]) == ("auto", None, None)
    assert "torch" not in sys.modules
    assert A.versions()["torch"].split("+")[0] == torch.__version__.split("+")[0]   # read from its metadata
