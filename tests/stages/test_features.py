"""Stage 03 on the shipped sample with timm's tiny test model: outputs, ids, caching and reuse."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config.load import load_config
from lib.config.schema import ENCODER_ITEM
from lib.core import artifacts
from lib.core import artifacts as A
from lib.core.errors import ConfigError, PipelineError
from lib.core.io import read_json
from lib.data import dataset
from lib.stages import features, prepare
from lib.tabular.patient import patient_relative
from lib.vision import embed
from tests.helpers import other_test_release

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "tiny", "arch": "test_efficientnet", "weights": None, "size": 64}


def _cfg(out: Path, exp: str = "f1", *extra: str, **kw: object) -> dict:
    ov = [f"paths.output={out}", f"data.root={ROOT / 'input/milk10k_sample'}", "cache.size=96",
          f"exp={exp}", "features.batch_size=16", "features.workers=0", "threads=2", *extra]
    cfg = load_config(None, ov)
    cfg["features"]["encoders"] = [{**ENCODER_ITEM, **TINY, **kw}]
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("feat")
    prepare.run(_cfg(out))
    return out


def test_extract_writes_id_keyed_tables(prepared: Path) -> None:
    cfg = _cfg(prepared)
    features.run(cfg)
    info, train, test = dataset.load_dataset(cfg)
    tr = pd.read_parquet(prepared / "f1/features/tiny_train.parquet")
    te = pd.read_parquet(prepared / "f1/features/tiny_test.parquet")
    assert list(tr["lesion_id"]) == list(train["lesion_id"]) and list(te["lesion_id"]) == list(test["lesion_id"])
    derm = [c for c in tr.columns if c.startswith("emb_tiny_dermoscopic_")]
    clin = [c for c in tr.columns if c.startswith("emb_tiny_clinical_")]
    assert len(derm) == len(clin) > 0 and len(tr.columns) == 1 + 2 * len(derm)
    assert tr[derm].notna().all().all() and tr[derm].std().sum() > 0
    assert (prepared / "f1/features/config.yaml").exists()
    man = read_json(prepared / "f1/features/manifest.json")
    assert man["stage"] == "features" and man["exp"] == "f1/features" and man["folds_sha1"] == artifacts.folds_sha1(cfg)
    assert [(i["role"], i["stage"]) for i in man["inputs"]] == [("prep", "prepare")] and man["wall_seconds"] > 0
    meta = read_json(artifacts.features_dir(cfg) / artifacts.features_file("tiny", "train", "json"))
    assert meta["views"] == ["id", "hflip"] and meta["n_images"] == 2 * len(train)


def test_second_experiment_reuses_cached_embeddings(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    features.run(_cfg(prepared, "f1"))
    src = next((prepared / "prep").rglob("features/tiny-*/train-*.parquet"))
    mtime = src.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        features.run(_cfg(prepared, "f2"))
    assert src.stat().st_mtime_ns == mtime
    assert "cached embeddings reused" in caplog.text
    a = pd.read_parquet(prepared / "f1/features/tiny_train.parquet")
    b = pd.read_parquet(prepared / "f2/features/tiny_train.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_other_preprocessing_gets_other_cache_key(prepared: Path) -> None:
    cfg = _cfg(prepared)
    info, _, _ = dataset.load_dataset(cfg)
    enc = cfg["features"]["encoders"][0]
    k1 = embed.spec_key(embed.encoder_spec(enc, ["id", "hflip"], info["cache_tag"]))
    k2 = embed.spec_key(embed.encoder_spec(enc, ["id"], info["cache_tag"]))
    k3 = embed.spec_key(embed.encoder_spec(dict(enc, size=80), ["id", "hflip"], info["cache_tag"]))
    assert len({k1, k2, k3}) == 3


def test_tta_mean_equals_mean_of_views(prepared: Path) -> None:
    import numpy as np
    import torch

    from lib.vision import backbones

    cfg = _cfg(prepared)
    info, train, _ = dataset.load_dataset(cfg)
    model = backbones.build_backbone("test_efficientnet", None).eval()
    spec = {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    paths = [str(prepared / "prep/milk10k_sample" / p) for p in train["path_dermoscopic"][:5]]
    views = embed.embed_paths(model, paths, dict(spec, views=["id", "vflip"]), "cpu", 4, 0, "t", keep_views=True)
    mean = embed.embed_paths(model, paths, dict(spec, views=["id", "vflip"]), "cpu", 4, 0, "t")
    assert views.shape[:2] == (5, 2)
    np.testing.assert_allclose(views.mean(1), mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[:, 0], views[:, 1])


def test_missing_features_and_empty_encoders_are_clear_errors(prepared: Path) -> None:
    cfg = _cfg(prepared, "none")
    with pytest.raises(PipelineError, match="not found"):
        artifacts.load_features(cfg, ["nothing"], "train")
    cfg["features"]["encoders"] = []
    features.run(cfg)  # a metadata-only stack (no stack.features): nothing to extract, no error
    cfg["stack"]["features"] = ["tiny"]
    with pytest.raises(PipelineError, match="empty"):
        features.run(cfg)


def test_keep_views_writes_one_block_per_view(prepared: Path) -> None:
    cfg = _cfg(prepared, "kv")
    cfg["features"]["keep_views"] = True
    cfg["features"]["tta"] = ["id", "vflip"]
    features.run(cfg)
    tr = pd.read_parquet(prepared / "kv/features/tiny_train.parquet")
    a = [c for c in tr.columns if c.startswith("emb_tiny_dermoscopic_id_")]
    b = [c for c in tr.columns if c.startswith("emb_tiny_dermoscopic_vflip_")]
    assert len(a) == len(b) > 0
    assert not (tr[a].to_numpy() == tr[b].to_numpy()).all()


def test_patient_relative_by_hand_and_per_patient_only() -> None:
    import numpy as np

    x = pd.DataFrame({"a": [1.0, 2.0, 3.0, 10.0, np.nan], "b": [0.0, 0.0, 0.0, 1.0, 2.0]})
    g = np.array(["p", "p", "p", "q", "q"])
    r = patient_relative(x, g)
    np.testing.assert_allclose(r["pat_diff_a"][:4], [-1, 0, 1, 0])
    np.testing.assert_allclose(r["pat_z_a"][:3], [-1.224745, 0, 1.224745], atol=1e-5)
    assert np.isnan(r["pat_z_a"][4]) and r["pat_z_b"][:3].tolist() == [0, 0, 0]  # no spread -> 0
    np.testing.assert_allclose(r["pat_z_b"][3:], [-1, 1])
    np.testing.assert_allclose(r["pat_rank_a"][:3], [1 / 3, 2 / 3, 1], atol=1e-6)
    assert r["pat_count"].tolist() == [3, 3, 3, 2, 2]
    # another patient's values never enter this patient's features
    x2 = x.copy()
    x2.loc[3:, "a"] = [1e6, -5.0]
    r2 = patient_relative(x2, g)
    pd.testing.assert_frame_equal(r.iloc[:3], r2.iloc[:3])
    with pytest.raises(PipelineError, match="group ids"):
        patient_relative(x, g[:3])



def test_cut_encoder_fine_tunes_on_its_trunk_cache(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(prepared, "ft", cut="conv_head", finetune=True)
    cfg["features"]["finetune"]["epochs"] = 2
    features.run(cfg)
    info, train, test = dataset.load_dataset(cfg)
    f = prepared / "ft/features"
    emb = pd.read_parquet(f / "tiny_train.parquet")
    assert list(emb["lesion_id"]) == list(train["lesion_id"]) and emb.shape[1] > 1
    ft_tr, ft_te = pd.read_parquet(f / "ft_tiny_train.parquet"), pd.read_parquet(f / "ft_tiny_test.parquet")
    assert list(ft_tr["lesion_id"]) == list(train["lesion_id"]) and list(ft_te["lesion_id"]) == list(test["lesion_id"])
    assert list(ft_tr.columns[1:]) == [f"logit_ft_tiny_{c}" for c in info["classes"]]
    assert ft_tr.iloc[:, 1:].notna().all().all() and ft_tr.iloc[:, 1:].std().sum() > 0
    # each fold model's own test logits (the stacker of fold k reads fold k's); their mean is the test table
    by_fold = pd.read_parquet(f / "ft_tiny_test_by_fold.parquet")
    folds = sorted(int(k) for k in train["fold"].unique())
    assert sorted(by_fold["fold_model"].unique()) == folds and len(by_fold) == len(folds) * len(test)
    assert all(list(g["lesion_id"]) == list(test["lesion_id"]) for _, g in by_fold.groupby("fold_model"))
    lg = list(ft_te.columns[1:])
    stacked = np.stack([g[lg].to_numpy() for _, g in by_fold.groupby("fold_model")])
    assert np.allclose(stacked.mean(0), ft_te[lg].to_numpy(), atol=1e-6) and stacked.std(0).max() > 0
    meta = read_json(f / "ft_tiny_train.json")
    assert meta["cut"] == "conv_head" and len(meta["fold_seconds"]) == train["fold"].nunique()
    caches = sorted(p.name for p in next((prepared / "prep").rglob("trunks/tiny-*")).iterdir())
    assert caches == sorted(f"{s}_{m}.{e}" for s in ("train", "test") for m in info["modalities"] for e in ("json", "npy"))
    assert list(read_json(f / "manifest.json")["parts"]) == ["tiny embeddings", "ft_tiny fine-tune"]  # report sub-rows
    # the stacker reads the block like any fold-model logits
    from lib.stages.stack import build_inputs
    cfg["stack"]["features"] = ["tiny", "ft_tiny"]
    _, _, blocks = build_inputs(cfg, info, train, test)
    assert "logit_ft_tiny" in blocks and len(blocks["logit_ft_tiny"]) == len(info["classes"])
    with caplog.at_level(logging.INFO):
        features.run(cfg)
    assert "cached fine-tuned fold models and OOF logits reused" in caplog.text
    assert "cached test logits of these test rows reused" in caplog.text and "cached embeddings reused" in caplog.text
    ft_cache = next((prepared / "prep").rglob("features/ft_tiny-*"))
    assert sorted(p.name for p in ft_cache.glob("*.safetensors")) == [f"fold{k}.safetensors" for k in range(5)]


def test_encoder_finetune_with_overrides_the_shared_settings(prepared: Path) -> None:
    own = {**ENCODER_ITEM["finetune_with"], "epochs": 1, "tail_lr": 0.0}
    cfg = _cfg(prepared, "ft3", cut="conv_head", finetune=True, finetune_with=own)
    cfg["features"]["finetune"]["epochs"] = 2
    assert features.finetune_settings(cfg, cfg["features"]["encoders"][0]) == {
        **cfg["features"]["finetune"], "epochs": 1, "tail_lr": 0.0}
    features.run(cfg)
    meta = read_json(prepared / "ft3/features/ft_tiny_train.json")
    assert meta["finetune"]["epochs"] == 1 and meta["finetune"]["tail_lr"] == 0.0
    assert meta["finetune"]["lr"] == cfg["features"]["finetune"]["lr"]   # the rest from features.finetune
    # its own cache folder: the key has the merged settings, so the shared-settings fine-tune is not reused
    shared = _cfg(prepared, "ft3b", cut="conv_head", finetune=True)
    shared["features"]["finetune"]["epochs"] = 2
    features.run(shared)
    caches = list((prepared / "prep").rglob("features/ft_tiny-*"))   # one per distinct settings, whatever ran before
    assert len(caches) == 2 and {read_json(c / "train.json")["finetune"]["epochs"] for c in caches} == {1, 2}
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.finetune_with .*finetune_with is set but finetune is false"):
        load_config(None, ["features.encoders=[{name: tiny, arch: test_efficientnet, cut: conv_head, "
                           "finetune_with: {epochs: 1}}]"])


def test_finetune_without_cut_is_a_config_error_at_load() -> None:
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.finetune = true \(item 'tiny'\).*finetune needs cut"):
        load_config(None, ["features.encoders=[{name: tiny, arch: test_efficientnet, finetune: true}]"])


def _fresh(prepared: Path) -> None:
    """Drop the shared embedding / trunk caches of the tiny encoder (and its ONNX files)."""
    import shutil
    for d in [*(prepared / "prep").rglob("features/tiny-*"), *(prepared / "prep").rglob("trunks/tiny-*"),
              *(prepared / "prep").rglob("onnx")]:
        shutil.rmtree(d)


@pytest.mark.parametrize("cut", [None, "conv_head"])
def test_onnxruntime_and_torch_embeddings_agree(prepared: Path, cut: str | None) -> None:
    import numpy as np
    import torch
    got = {}
    for rt in ("torch", "auto"):   # auto on a CPU = ONNX Runtime
        _fresh(prepared)
        cfg = _cfg(prepared, f"rt_{rt}", cut=cut)
        cfg["features"]["runtime"] = rt
        torch.manual_seed(0)       # weights null: the same random encoder in both runs
        features.run(cfg)
        meta = read_json(prepared / f"rt_{rt}/features/tiny_train.json")
        assert meta["runtime"] == ("torch" if rt == "torch" else "onnxruntime")
        got[rt] = pd.read_parquet(prepared / f"rt_{rt}/features/tiny_train.parquet")
    assert list(got["torch"]["lesion_id"]) == list(got["auto"]["lesion_id"])
    a, b = got["torch"].iloc[:, 1:].to_numpy(), got["auto"].iloc[:, 1:].to_numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    tol = 1e-4 if cut is None else 2e-2 * np.abs(a).max()   # the trunk cache is float16
    assert np.abs(a - b).max() <= tol and cos.min() > 0.9999
    assert len(list((prepared / "prep").rglob("onnx/*.onnx"))) == 1


def test_onnxruntime_asked_for_but_not_installed_stops_in_one_line(prepared: Path, monkeypatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` raises ImportError
    cfg = _cfg(prepared, "no_ort")
    cfg["features"]["runtime"] = "onnxruntime"
    with pytest.raises(ConfigError, match="features.runtime = onnxruntime needs the onnxruntime package") as e:
        features.run(cfg)
    assert "\n" not in str(e.value) and not (prepared / "no_ort").exists()
    _fresh(prepared)
    cfg["features"]["runtime"] = "auto"     # auto without the package: PyTorch
    features.run(cfg)
    assert read_json(prepared / "no_ort/features/tiny_train.json")["runtime"] == "torch"


def test_the_trunk_split_is_checked_at_run_time(prepared: Path, monkeypatch) -> None:
    from lib.vision import trunk as T
    real = T.split_at

    def skipping(model, cut):      # a split whose tail drops a module: no longer the encoder
        trunk, tail, pool = real(model, cut)
        return trunk, torch.nn.Sequential(*list(tail)[1:]), pool
    import torch
    _fresh(prepared)
    monkeypatch.setattr(T, "split_at", skipping)
    with pytest.raises(PipelineError, match="does not reproduce the encoder"):
        features.run(_cfg(prepared, "badsplit", cut="conv_head"))
    assert not list((prepared / "prep").rglob("trunks/tiny-*/*.npy"))


def test_workers_minus_one_counts_the_cores_this_process_may_use(monkeypatch) -> None:
    monkeypatch.setattr(features, "cpu_count", lambda: 5)
    assert features._workers({"features": {"workers": -1}}) == 4
    assert features._workers({"features": {"workers": 0}}) == 0


def _outputs(out: Path, exp: str) -> dict[str, pd.DataFrame]:
    f = out / exp / "features"
    return {f"{n}_{s}": pd.read_parquet(f / f"{n}_{s}.parquet") for n in ("tiny", "ft_tiny") for s in ("train", "test")}


def test_another_test_release_recomputes_only_the_test_side(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second test release on the same prep folder (the same lesions, one image replaced under the same
    id: what an id check alone misses): every train-side cache (embeddings, trunk activations, fine-tuned fold models and OOF logits)
    is reused untouched; the test side is recomputed and equals a from-scratch run on that release.
    (The tiny encoder has random weights: drawn from the config's seed, in every run alike.)"""
    enc = {"cut": "conv_head", "finetune": True}
    a, scratch = tmp_path / "a", tmp_path / "scratch"
    cfg = _cfg(a, "rel", "features.finetune.epochs=1", **enc)
    prepare.run(cfg)
    features.run(cfg)
    first = _outputs(a, "rel")
    caches = [p for p in (a / "prep").rglob("*") if p.is_file() and p.parent.parent.name in (A.FEATURES, A.TRUNKS)]
    train_side = {p: p.stat().st_mtime_ns for p in caches if p.name.startswith(("train", "fold"))}
    assert len(train_side) == 2 + 2 * 2 + 2 + 5   # embeddings, trunks (2 modalities), ft OOF, 5 fold models
    # made after the first run, as a new release is (01's image cache redoes a source newer than its copy)
    release, changed = other_test_release(tmp_path / "release_b", drop=0)

    cfg_b = _cfg(a, "rel", "features.finetune.epochs=1", f"data.test_root={release}", **enc)
    prepare.run(cfg_b)
    with caplog.at_level(logging.INFO):
        features.run(cfg_b)
    assert {p: p.stat().st_mtime_ns for p in train_side} == train_side
    assert "tiny/train: cached embeddings reused" in caplog.text and "tiny/test: cached embeddings reused" not in caplog.text
    assert "cached fine-tuned fold models and OOF logits reused" in caplog.text
    again = _outputs(a, "rel")
    _, _, test_b = dataset.load_dataset(cfg_b)
    assert list(again["tiny_test"]["lesion_id"]) == list(test_b["lesion_id"]) == list(again["ft_tiny_test"]["lesion_id"])
    row = lambda df: df.set_index("lesion_id").loc[changed].to_numpy()   # noqa: E731
    assert not np.allclose(row(first["tiny_test"]), row(again["tiny_test"]), atol=1e-3)   # its new image was used

    cfg_s = _cfg(scratch, "rel", "features.finetune.epochs=1", f"data.test_root={release}", **enc)
    prepare.run(cfg_s)
    features.run(cfg_s)
    fresh = _outputs(scratch, "rel")
    for name, df in fresh.items():
        pd.testing.assert_frame_equal(again[name], df, check_exact=False, atol=1e-6, rtol=0, obj=name)


def test_an_encoder_without_weights_is_the_same_in_every_run_and_keyed_by_its_seed(prepared: Path) -> None:
    """Random weights (`weights: null`) are drawn from the config's seed, so two runs embed alike and a
    cache made with another seed is not reused (its key holds the seed)."""
    import torch

    _fresh(prepared)
    torch.manual_seed(123)   # whatever the global RNG holds
    features.run(_cfg(prepared, "seed_a"))
    _fresh(prepared)         # computed again, not read from the cache
    torch.manual_seed(456)
    features.run(_cfg(prepared, "seed_b"))
    a = pd.read_parquet(prepared / "seed_a/features/tiny_test.parquet")
    pd.testing.assert_frame_equal(a, pd.read_parquet(prepared / "seed_b/features/tiny_test.parquet"))
    features.run(_cfg(prepared, "seed_c", "seed=7"))
    c = pd.read_parquet(prepared / "seed_c/features/tiny_test.parquet")
    assert not np.allclose(a.iloc[:, 1:].to_numpy(), c.iloc[:, 1:].to_numpy(), atol=1e-4)
