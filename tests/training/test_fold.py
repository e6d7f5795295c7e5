"""lib.training.fold / 02_train_fold.py on the shipped MILK10k sample with timm's tiny `test_efficientnet`
(random init, 64 px): every model kind, artifacts, aggregation, fold-model features, resume
equivalence, torchrun DDP == one process, samplers, optimizer groups, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lib.config.schema import TRAIN_DEFAULTS
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import read_json
from lib.stages import train as train_stage
from lib.training import data as TD
from lib.training import distributed as D
from lib.training import fold as T
from lib.training import inference as TI
from lib.training import loop as L
from lib.training import optim as TO
from lib.training.checkpoint import CHECKPOINT_VERSION, Checkpointer
from tests.training.helpers import ROOT, SAMPLE, data, tiny, weights

# ------------------------------------------------------------------ runs


@pytest.mark.parametrize("kind", ["single", "concat", "xattn"])
def test_one_fold_each_model_kind(prep, tmp_path, kind):
    model = ["train.model.kind=single"] if kind == "single" else [f"train.model.fusion={kind}"]
    cfg = tiny(prep, tmp_path, f"t_{kind}", *model, "train.tta=[id,hflip]")
    train_stage.run(cfg, fold=0)
    info, train, test = data(cfg)
    fd = tmp_path / f"t_{kind}" / "fold0"
    oof = pd.read_parquet(fd / "oof.parquet")
    assert sorted(oof["lesion_id"]) == sorted(train.loc[train["fold"] == 0, "lesion_id"])
    assert list(oof.columns) == ["lesion_id", *info["classes"]] and np.isfinite(oof[info["classes"]]).all().all()
    tl = pd.read_parquet(fd / "test_logits.parquet")
    assert list(tl["lesion_id"]) == list(test["lesion_id"])
    hist = pd.read_csv(fd / "history.csv")
    assert {"epoch", "train_loss", "val_loss", "val_macro_f1", "lr", "images_per_s", "f1_MEL"} <= set(hist.columns)
    s = read_json(fd / "summary.json")
    assert s["early_stopping_used"] is False and s["weights_for_oof"] == "last" and s["views"] == ["id", "hflip"]
    assert (fd / "config.yaml").exists() and (fd / "model.pt").exists() and not (fd / "checkpoint.pt").exists()
    assert not (tmp_path / f"t_{kind}" / "oof.parquet").exists()  # other folds missing


def test_all_folds_aggregate_skip_and_features(prep, tmp_path):
    cfg = tiny(prep, tmp_path, "t_all", "train.model.kind=single", "train.batch_size=64")
    train_stage.run(cfg)
    info, train, test = data(cfg)
    classes, root = info["classes"], tmp_path / "t_all"
    oof = pd.read_parquet(root / "oof.parquet")
    assert list(oof["lesion_id"]) == list(train["lesion_id"])
    np.testing.assert_allclose(oof[classes].sum(axis=1), 1.0, atol=1e-6)
    te = pd.read_parquet(root / "test.parquet")
    folds = sorted(train["fold"].unique())
    mean = np.mean([TI.probabilities(pd.read_parquet(root / f"fold{k}" / "test_logits.parquet")[classes]
                                    .to_numpy(), "multiclass") for k in folds], 0)
    np.testing.assert_allclose(te[classes].to_numpy(), mean, atol=1e-6)
    cv = read_json(root / "cv.json")
    assert cv["n"] == len(train) and cv["training"]["early_stopping_used"] is False and "macro_f1_argmax" in cv

    stamp = (root / "fold0" / "model.pt").stat().st_mtime_ns
    train_stage.run(cfg)  # finished folds with the same config are skipped
    assert (root / "fold0" / "model.pt").stat().st_mtime_ns == stamp

    fcfg = tiny(prep, tmp_path, "t_feat", "features.tta=[id]", "features.workers=0", "features.from_exps=[t_all]")
    out = tmp_path / "feat"
    out.mkdir()
    TI.fold_logit_features(fcfg, "t_all", info, train, test, out)
    ft = pd.read_parquet(out / "t_all_train.parquet")
    assert list(ft["lesion_id"]) == list(train["lesion_id"])
    # aligned outputs only: one column per class, the same meaning in every fold model (penultimate
    # features, the old behaviour, are a different random basis in each fold model)
    cols = [f"logit_t_all_{c}" for c in classes]
    assert list(ft.columns) == ["lesion_id", *cols] and read_json(out / "t_all_train.json")["dim"] == len(classes)
    # a lesion's logits come from its own fold's model (which never trained on it)
    for k in (0, 3):
        row = train.index[train["fold"] == k][0]
        model, obj = TI.load_fold_model(root / f"fold{k}" / "model.pt")
        ds = TD.LesionDataset(train.iloc[[row]], prep / "prep" / "milk10k_sample", ["dermoscopic"], classes,
                             TD.Tabular.from_state(obj["tabular"]), spec=obj["spec"])
        z = TI.infer(model, model, ds, cfg["train"]["tta"], "cpu", 4, 0, None, False, D.Dist())
        np.testing.assert_allclose(ft.loc[row, cols].to_numpy(float), z[0], atol=1e-5)
    fte = pd.read_parquet(out / "t_all_test.parquet")
    assert list(fte["lesion_id"]) == list(test["lesion_id"])
    mean_logits = np.mean([pd.read_parquet(root / f"fold{k}" / "test_logits.parquet")[classes].to_numpy()
                           for k in folds], 0)
    np.testing.assert_allclose(fte[cols].to_numpy(), mean_logits, atol=1e-9)
    # each fold model's own test logits, for fold k's stacker (issue 27 item 3)
    by_fold = pd.read_parquet(out / "t_all_test_by_fold.parquet")
    for k in folds:
        own = by_fold[by_fold["fold_model"] == k]
        assert list(own["lesion_id"]) == list(test["lesion_id"])
        np.testing.assert_allclose(own[cols].to_numpy(),
                                   pd.read_parquet(root / f"fold{k}" / "test_logits.parquet")[classes].to_numpy(),
                                   atol=1e-9)


def test_resume_equals_straight_run(prep, tmp_path):
    extra = ("train.epochs=2", "train.ema=0.5", "train.model.fusion=concat", "train.val_every=1")
    a = tiny(prep, tmp_path, "t_straight", *extra)
    train_stage.run(a, fold=0)
    b = tiny(prep, tmp_path, "t_resumed", *extra)
    train_stage.run(b, fold=0, stop_after=1)
    ck = tmp_path / "t_resumed" / "fold0" / "checkpoint.pt"
    assert ck.exists() and not (tmp_path / "t_resumed" / "fold0" / "oof.parquet").exists()
    assert torch.load(ck, weights_only=False)["epoch"] == 1
    train_stage.run(b, fold=0, resume=True)
    wa, wb = weights(tmp_path / "t_straight/fold0/model.pt"), weights(tmp_path / "t_resumed/fold0/model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    oa, ob = (pd.read_parquet(tmp_path / f"{e}/fold0/oof.parquet") for e in ("t_straight", "t_resumed"))
    pd.testing.assert_frame_equal(oa, ob, atol=1e-5)
    ha, hb = (pd.read_csv(tmp_path / f"{e}/fold0/history.csv") for e in ("t_straight", "t_resumed"))
    np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-5)
    assert read_json(tmp_path / "t_resumed/fold0/summary.json")["weights_for_oof"] == "EMA"


def test_early_stopping_is_recorded(prep, tmp_path):
    cfg = tiny(prep, tmp_path, "t_es", "train.model.kind=single", "train.epochs=2",
               "train.early_stopping.enabled=true", "train.early_stopping.patience=1")
    train_stage.run(cfg, fold=0)
    s = read_json(tmp_path / "t_es/fold0/summary.json")
    assert s["early_stopping_used"] is True and s["best_epoch"] in (1, 2)
    assert pd.read_csv(tmp_path / "t_es/fold0/history.csv")["val_macro_f1"].notna().all()


def test_torchrun_ddp_matches_one_process(prep, tmp_path):
    """2 gloo processes x 16 rows == 1 process x 32 rows. Per-sample seeded augmentation and
    modality/concept dropout stay on (they do not depend on the rank); in-model dropout and drop path
    are off, and BN uses running statistics (bn=frozen) so no layer sees batch composition."""
    extra = ["train.model.fusion=concat", "train.bn=frozen", "train.model.dropout=0", "train.model.drop_path=0",
             "train.modality_dropout=0.3", "train.monet_dropout=0.3", "train.epochs=1"]
    one = tiny(prep, tmp_path, "t_one", *extra)
    train_stage.run(one, fold=0)
    ov = [f"paths.output={tmp_path}", f"paths.prep={prep / 'prep' / 'milk10k_sample'}", f"data.root={SAMPLE}",
          "exp=t_ddp", "threads=1", "train.model.arch=test_efficientnet", "train.model.weights=null",
          "train.model.hidden=16", "train.model.msd=2", "train.img_size=64", "train.batch_size=32",
          "train.workers=0", "train.tta=[id]", "train.val_every=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "02_train_fold.py"), "-c", str(ROOT / "configs/milk10k_sample/base.yaml"), "--fold", "0", *ov]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_json(tmp_path / "t_ddp/fold0/summary.json")
    assert s["world_size"] == 2
    wa, wb = weights(tmp_path / "t_one/fold0/model.pt"), weights(tmp_path / "t_ddp/fold0/model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    oa, ob = (pd.read_parquet(tmp_path / f"{e}/fold0/oof.parquet") for e in ("t_one", "t_ddp"))
    assert list(oa["lesion_id"]) == list(ob["lesion_id"])
    pd.testing.assert_frame_equal(oa, ob, atol=1e-4)
    la, lb = (pd.read_csv(tmp_path / f"{e}/fold0/history.csv")["train_loss"] for e in ("t_one", "t_ddp"))
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_gradient_accumulation_equals_bigger_batch(prep, tmp_path):
    """2 x 16 accumulated == 32 in one micro-batch (same rows; BN frozen, no in-model dropout)."""
    extra = ["train.model.kind=single", "train.bn=frozen", "train.model.dropout=0", "train.model.drop_path=0",
             "train.epochs=1"]
    train_stage.run(tiny(prep, tmp_path, "t_b32", *extra), fold=1)
    train_stage.run(tiny(prep, tmp_path, "t_acc", *extra, "train.batch_size=16", "train.accum=2"), fold=1)
    wa, wb = weights(tmp_path / "t_b32/fold1/model.pt"), weights(tmp_path / "t_acc/fold1/model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_amp_modes():
    assert TO.amp_setup("auto", "cpu") == (None, False)
    assert TO.amp_setup("auto", "cuda") == (torch.float16, True)
    assert TO.amp_setup("bf16", "cpu") == (torch.bfloat16, False)
    assert TO.amp_setup("off", "cuda") == (None, False)
    with pytest.raises(PipelineError, match="fp16 needs CUDA"):
        TO.amp_setup("fp16", "cpu")
    with pytest.raises(PipelineError, match="unknown"):
        TO.amp_setup("fp8", "cpu")


# ------------------------------------------------------------------ pieces


def test_samplers_shard_global_batches():
    y = np.eye(3)[[0] * 90 + [1] * 9 + [2]]
    order = TD.epoch_order(y, {"kind": "weighted", "power": 1.0}, 0, 0, 0)
    counts = np.bincount(y[order].argmax(1), minlength=3)
    assert counts.min() > 15  # ~33 each instead of 90/9/1
    assert not np.array_equal(order, TD.epoch_order(y, {"kind": "weighted", "power": 1.0}, 0, 0, 1))
    fn = lambda e: TD.epoch_order(y, {"kind": "none", "power": 0}, 1, 2, e)  # noqa: E731
    one = list(D.GlobalBatchSampler(fn, 100, 32, D.Dist()))
    ranks = [list(D.GlobalBatchSampler(fn, 100, 32, D.Dist(rank=r, world=2))) for r in range(2)]
    assert len(one) == 3 and all(len(b) == 32 for b in one)
    for j, b in enumerate(one):
        assert b == ranks[0][j] + ranks[1][j]
    with pytest.raises(PipelineError, match="divisible"):
        D.GlobalBatchSampler(fn, 100, 33, D.Dist(world=2))


def test_layer_decay_groups_and_freezing():
    from lib.vision.models import build_model

    mcfg = {**TRAIN_DEFAULTS["model"], "arch": "test_efficientnet", "weights": None, "kind": "single"}
    model = build_model(mcfg, 3, 2, 0, ["dermoscopic"], 64)
    groups = TO.param_groups(model, {**TRAIN_DEFAULTS, "lr": 1.0, "layer_decay": 0.5})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    enc = model.encoders["image"]
    assert lr_of[id(enc.conv_stem.weight)] < lr_of[id(enc.blocks[-1][0].conv_pw.weight)] < 1.0
    assert lr_of[id(model.head.fc.weight)] == 1.0
    assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.ndim <= 1)
    frozen = TO.freeze_blocks(model, 1)
    assert not enc.conv_stem.weight.requires_grad and not any(p.requires_grad for p in enc.blocks[0].parameters())
    assert all(p.requires_grad for p in enc.blocks[1].parameters())
    TO.set_train_mode(model, "train", frozen)
    assert not enc.bn1.training and enc.blocks[1][0].bn1.training


def test_errors(prep, tmp_path):
    with pytest.raises(PipelineError, match="did you mean 'epochs'"):
        tiny(prep, tmp_path, "e", "train.epoch=2")
    with pytest.raises(PipelineError, match="unknown backbone"):
        train_stage.run(tiny(prep, tmp_path, "e1", "train.model.arch=efficientnet_b99"), fold=0)
    with pytest.raises(PipelineError, match="not found"):
        train_stage.run(tiny(prep, tmp_path, "e2", f"train.model.weights={tmp_path / 'missing.pth'}"), fold=0)
    with pytest.raises(PipelineError, match="do not exist"):
        train_stage.run(tiny(prep, tmp_path, "e3"), fold=9)
    cfg = tiny(prep, tmp_path, "e4")
    info, train, test = data(cfg)
    with pytest.raises(PipelineError, match="no rows"):
        T.train_fold(cfg, info, train[train["fold"] != 0], test, 0)
    with pytest.raises(PipelineError, match="fp16 needs CUDA"):
        train_stage.run(tiny(prep, tmp_path, "e5", "train.amp=fp16"), fold=0)
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="CUDA is not available"):
            train_stage.run(tiny(prep, tmp_path, "e6", "device=cuda"), fold=0)
    r = subprocess.run([sys.executable, str(ROOT / "02_train_fold.py"), "--fold", "0",
                        f"paths.prep={prep / 'prep' / 'milk10k_sample'}", f"paths.output={tmp_path}",
                        "train.model.arch=resnet_9000", "train.model.weights=null"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown backbone") and "Traceback" not in r.stderr


def test_weighted_sampler_oversamples_binary_positives():
    """Rows without a positive (binary negatives) are a stratum of their own: positives are drawn
    far more often than their 5% share, and negatives are still drawn."""
    y = np.zeros((200, 1))
    y[:10] = 1
    order = TD.epoch_order(y, {"kind": "weighted", "power": 1.0}, 0, 0, 0)
    share = y[order, 0].mean()
    assert 0.35 < share < 0.65, share
    assert (y[order, 0] == 0).any()


def test_binary_task_uses_sigmoid_outputs():
    z = np.array([[2.0], [-1.0]])
    np.testing.assert_allclose(TI.probabilities(z, "binary")[:, 0], 1 / (1 + np.exp(-z[:, 0])))
    f1, per = TI.f1_scores(np.array([[1.0], [0.0]]), z, "binary")
    assert f1 == 1.0 and per.tolist() == [1.0]


def test_train_fold_equals_its_parts_and_finalize_writes_artifacts(prep, tmp_path):
    """The orchestrator is build_fold + (train_one_epoch, validate, end_epoch) per epoch + finalize_fold."""
    extra = ("train.model.kind=single", "train.epochs=2", "train.val_every=1")
    a = tiny(prep, tmp_path, "t_orch", *extra)
    info, train, test = data(a)
    sa = T.train_fold(a, info, train, test, 2)
    b = tiny(prep, tmp_path, "t_parts", *extra)
    run = T.build_fold(b, info, train, test, 2)
    ck = Checkpointer.of(run)
    T.start_fold(run, ck, resume=False)
    for epoch in range(run.epochs):
        row = L.train_one_epoch(run, epoch)
        run.val_logits, metrics = L.validate(run)
        T.end_epoch(run, {**row, **metrics, "seconds": 0.0}, ck)
        assert ck.exists()
    sb = T.finalize_fold(run, ck)
    fd = tmp_path / "t_parts" / "fold2"
    for f in ("oof.parquet", "test_logits.parquet", "model.pt", "summary.json", "history.csv", "config.yaml"):
        assert (fd / f).exists(), f
    assert not ck.exists()
    for f in ("oof.parquet", "test_logits.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t_orch/fold2" / f), pd.read_parquet(fd / f),
                                      check_exact=True)
    drop = ("seconds", "images_per_s")
    assert {k: v for k, v in sa.items() if k not in drop} == {k: v for k, v in sb.items() if k not in drop}
    assert read_json(fd / "summary.json")["weights_for_oof"] == "last"
    ha, hb = (pd.read_csv(tmp_path / f"{e}/fold2/history.csv") for e in ("t_orch", "t_parts"))
    np.testing.assert_array_equal(ha["train_loss"], hb["train_loss"])
    obj = torch.load(fd / "model.pt", weights_only=False)
    assert obj["format_version"] == CHECKPOINT_VERSION and obj["fold"] == 2
    spec = json.loads(json.dumps(obj["spec"]))  # JSON-able, lists not tuples
    assert spec == obj["spec"] and spec["size"] == 64
    assert {"mean", "std", "interpolation", "resize_mode", "crop_pct"} <= set(spec)
    assert isinstance(spec["mean"], list) and len(spec["std"]) == 3


def test_finished_fold_meets_other_test_rows_and_recomputes_only_its_test_logits(prep, tmp_path):
    """Another test release: a finished fold's test logits are made again from its model.pt (the fold's
    own inference path), for exactly the new rows; its train side is untouched; fold-model features
    refuse test logits that were made for other rows."""
    cfg = tiny(prep, tmp_path, "t_release", "train.model.kind=single", "train.tta=[id,hflip]")
    train_stage.run(cfg, fold=0)
    info, train, test = data(cfg)
    classes, fd = info["classes"], tmp_path / "t_release" / "fold0"
    first = pd.read_parquet(fd / "test_logits.parquet").set_index("lesion_id")
    rows = TI.rows_key_of_test(cfg, info, test)
    assert read_json(fd / "test_logits.json") == {"rows": rows, "n": len(test)} and TI.fold_test_current(fd, rows)
    stamps = {f: (fd / f).stat().st_mtime_ns for f in ("model.pt", "oof.parquet", "summary.json")}

    other = test.iloc[::-1].iloc[3:].reset_index(drop=True)      # rows dropped, order reversed
    other_rows = TI.rows_key_of_test(cfg, info, other)
    assert other_rows != rows and not TI.fold_test_current(fd, other_rows)
    z = T.refresh_test_logits(cfg, info, train, other, 0, other_rows)
    again = pd.read_parquet(fd / "test_logits.parquet")
    assert list(again["lesion_id"]) == list(other["lesion_id"]) and TI.fold_test_current(fd, other_rows)
    np.testing.assert_allclose(again[classes].to_numpy(), z, atol=0)
    np.testing.assert_allclose(z, first.loc[other["lesion_id"], classes].to_numpy(), atol=1e-5)
    assert {f: (fd / f).stat().st_mtime_ns for f in stamps} == stamps
    with pytest.raises(MissingArtifactError, match="test_logits.parquet: not made for this prep folder's test rows"):
        TI._fold_logits(cfg, "t_release", 0, train[train["fold"] == 0], test, classes, rows)
