"""Fold training of image and fusion models (see 02_train_fold.py).

Per fold k (rows with `fold == k` are validation, the rest train):
- model `lib.vision.models.build_model` on `train.model`, heads seeded by (seed, fold); optional
  stochastic depth, freezing of the stem + first `freeze_blocks` blocks (their BN kept in eval),
  `bn: frozen` (every BN uses running statistics; affine parameters still learn);
- AdamW with layer-wise LR decay (encoder block i of L gets lr * layer_decay ** (L - i); heads lr),
  no weight decay on 1-D parameters and embeddings; cosine schedule with linear warmup, stepped per
  optimizer step; gradient accumulation (`accum`) and clipping (`clip_grad`, 0 = off);
- AMP: `auto` = fp16 + GradScaler on CUDA, off on CPU; `bf16` = bfloat16 autocast (CPU or GPU; very
  slow on CPUs without AMX); `fp16` (CUDA only); `off`. channels_last, optional torch.compile;
- EMA of the weights (`ema` decay, 0 = off; timm ModelEmaV3);
- fixed-epoch training: OOF/test use the last weights (or the EMA weights when `ema` > 0 and
  `use_ema_for_oof`). `early_stopping.enabled` keeps the best validation macro-F1 (binary: AUC) epoch instead;
  that selects on the OOF rows themselves (optimistic OOF), so it is recorded in summary.json,
  history.csv and cv.json;
- sampling: `sampler.kind: weighted` draws N rows with replacement with probability
  (1 / class frequency) ** power, else a permutation; both from a generator seeded by
  (seed, fold, epoch); every augmentation and modality/concept-dropout draw is seeded by
  (seed, fold, epoch, row), so results do not depend on DataLoader workers or on the number of
  processes, and a resumed run repeats the interrupted one;
- data parallel (`torchrun`, see lib/training/distributed.py): each global micro-batch of `batch_size` rows
  is split into contiguous per-rank slices of batch_size / world; the DDP gradient mean equals the
  one-process gradient for per-sample-mean losses (all but `soft_f1`/`focal_soft_f1`, whose batch
  statistic is per rank) when the model has no batch-dependent randomness (dropout, drop path) and
  BN does not use batch statistics (`bn: frozen`; `bn: sync` = SyncBatchNorm on CUDA);
- validation every `val_every` epochs (and always after the last) with the TTA views `train.tta`,
  through the same code path as the test predictions; the last evaluation is the fold's OOF.

Parts: `build_fold` -> `FoldRun` (everything the fold needs; writes nothing), `start_fold` (resume
or start over, config.yaml), per epoch `lib.training.loop.train_one_epoch` / `validate` /
`update_early_stopping` and `end_epoch` (history, checkpoint), then `finalize_fold`; `train_fold`
is the orchestrator of these parts.

Artifacts in `<output>/<exp>/fold{k}/`: checkpoint.pt (every epoch, atomic, `format_version`
CHECKPOINT_VERSION + config fingerprint, see lib/training/checkpoint.py; deleted at the end unless
`keep_checkpoint`), history.csv, oof.parquet (lesion_id + one logit column per class, the fold's
rows), test_logits.parquet + test_logits.json (the fingerprint of the test rows they are for: a
finished fold meeting another test release recomputes them from model.pt, `refresh_test_logits`),
model.pt (`format_version`, the OOF weights + what is needed to rebuild
the model, and `spec`: the encoder's full preprocessing spec at `train.img_size`, JSON-able),
config.yaml, summary.json (marks the fold done). When every fold is done: `<output>/<exp>/oof.parquet`
and `test.parquet` (probabilities: softmax, or sigmoid for multilabel / binary, of the TTA-averaged logits;
test averaged over folds) and cv.json (lib.evaluation.report.cv_summary + training notes).
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.config.schema import BN_MODES
from lib.core.artifacts import (
    FOLD_SUMMARY_JSON,
    HISTORY,
    MODEL,
    OOF,
    config_fingerprint,
    fold_dir,
    prep_dir,
    save_config,
)
from lib.core.errors import PipelineError
from lib.core.io import ID, atomic_path, write_csv, write_json, write_parquet
from lib.core.runtime import seed_for, torch_device
from lib.training import distributed as D
from lib.training.checkpoint import CHECKPOINT_VERSION, Checkpointer
from lib.training.data import (
    LesionDataset,
    Tabular,
    epoch_order,
    make_loader,
    model_modalities,
    resolve_workers,
)
from lib.training.inference import f1_scores, prediction_table, rows_key_of_test, write_fold_test_logits
from lib.training.loop import (
    FoldRun,
    module_state,
    predict,
    should_validate,
    train_one_epoch,
    update_early_stopping,
    validate,
)
from lib.training.losses import Loss
from lib.training.optim import amp_setup, cosine_lambda, freeze_blocks, param_groups
from lib.vision.backbones import model_spec
from lib.vision.models import build_model
from lib.vision.tta import parse_views

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists (recursively), so the spec reads the same from model.pt and from JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def fold_spec(mcfg: dict, img_size: int) -> dict:
    """The full preprocessing spec of a fold model: the encoder's spec at the training size."""
    return _jsonable(model_spec(mcfg["arch"], mcfg["weights"], img_size))


# ----------------------------------------------------------------------------- setup


def _split(train: pd.DataFrame, k: int, d: D.Dist) -> tuple[pd.DataFrame, pd.DataFrame]:
    tr, va = train[train["fold"] != k].reset_index(drop=True), train[train["fold"] == k].reset_index(drop=True)
    if len(va) == 0:
        raise PipelineError(f"fold {k} has no rows (folds present: {sorted(train['fold'].unique().tolist())})")
    if len(tr) < d.world:
        raise PipelineError(f"fold {k}: only {len(tr)} training rows")
    return tr, va


def _model(cfg: dict, k: int, model_args: dict, d: D.Dist) -> tuple[nn.Module, list[nn.Module], Any]:
    """The fold's model on its device (heads seeded by (seed, fold)), its frozen BN modules, its EMA."""
    tcfg = cfg["train"]
    seed_everything(seed_for(int(cfg["seed"]), k, 1))
    model = build_model(tcfg["model"], **model_args)
    frozen_bn = freeze_blocks(model, int(tcfg["freeze_blocks"]))
    if tcfg["bn"] == "sync" and d.enabled:
        if not d.device.startswith("cuda"):
            raise PipelineError("config: train.bn=sync needs CUDA; on CPU use bn=frozen for exact DDP equivalence")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(d.device)
    if tcfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    ema = None
    if float(tcfg["ema"]) > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(tcfg["ema"]))
    return model, frozen_bn, ema


def _batch(tcfg: dict, n_train: int, k: int, d: D.Dist) -> tuple[int, int, int]:
    """(global micro-batch, accumulation steps, optimizer steps per epoch)."""
    gb = int(tcfg["batch_size"])
    if n_train < gb:
        gb = max(d.world, n_train // d.world * d.world)
        log.warning("fold %d: %d training rows < batch_size; using batch %d", k, n_train, gb)
    accum = max(1, int(tcfg["accum"]))
    return gb, accum, math.ceil(n_train // gb / accum)


def _data(cfg: dict, k: int, tr: pd.DataFrame, va: pd.DataFrame, test: pd.DataFrame | None, classes: list[str],
          mods: list[str], tab: Tabular, spec: dict) -> tuple[LesionDataset, LesionDataset, LesionDataset | None]:
    """Training (augmented, seeded by (seed, fold, epoch, row)), validation and test datasets."""
    tcfg, mcfg = cfg["train"], cfg["train"]["model"]
    common = dict(folder=prep_dir(cfg), modalities=mods, classes=classes, tab=tab, spec=spec)
    ds_tr = LesionDataset(tr, train=True, aug=tcfg["aug"], seed=int(cfg["seed"]), fold=k,
                          modality_dropout=float(tcfg["modality_dropout"]) if len(mods) > 1 else 0.0,
                          monet_dropout=float(tcfg["monet_dropout"]) if mcfg["use_monet"] else 0.0, **common)
    ds_va = LesionDataset(va, **common)
    ds_te = None if test is None or len(test) == 0 else LesionDataset(test, **common)
    return ds_tr, ds_va, ds_te


def build_fold(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None, k: int,
               d: D.Dist | None = None) -> FoldRun:
    """Everything fold k's training needs: model (+ EMA, DDP / compile wrappers), AdamW with layer
    decay, warmup-cosine schedule, scaler, loss, datasets, seeded global-batch sampler and loader.
    Writes nothing; progress starts at epoch 0 (see `Checkpointer.restore` to resume)."""
    tcfg, mcfg = cfg["train"], cfg["train"]["model"]
    d = d or D.Dist(device=torch_device(cfg))
    classes, task, seed = list(info["classes"]), info.get("task", "multiclass"), int(cfg["seed"])
    tr, va = _split(train, k, d)
    y_tr = tr[[f"y_{c}" for c in classes]].to_numpy(np.float32)
    spec, mods, tab = fold_spec(mcfg, tcfg["img_size"]), model_modalities(info, mcfg), Tabular(info, tr)
    amp_dtype, use_scaler = amp_setup(tcfg["amp"], d.device)
    views = parse_views(tcfg["tta"])
    if tcfg["bn"] not in BN_MODES:
        raise PipelineError(f"config: train.bn '{tcfg['bn']}' unknown ({' | '.join(BN_MODES)})")
    model_args = {"n_classes": len(classes), "n_meta": len(tab.meta_cols), "n_monet": len(tab.monet_cols),
                  "modalities": list(info["modalities"]), "img_size": spec["size"]}
    model, frozen_bn, ema = _model(cfg, k, model_args, d)
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    gb, accum, steps = _batch(tcfg, len(tr), k, d)
    epochs = int(tcfg["epochs"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lambda(steps * epochs, int(round(float(tcfg["warmup_epochs"]) * steps))))
    scaler = torch.amp.GradScaler("cuda" if d.device.startswith("cuda") else "cpu", enabled=use_scaler)
    loss_fn = Loss(tcfg["loss"], task, y_tr).to(d.device)
    ds_tr, ds_va, ds_te = _data(cfg, k, tr, va, test, classes, mods, tab, spec)
    sampler = D.GlobalBatchSampler(lambda e: epoch_order(y_tr, tcfg["sampler"], seed, k, e), len(tr), gb, d)
    workers = resolve_workers(int(tcfg["workers"]))
    loader = make_loader(ds_tr, workers, seed_for(seed, k, 7), batch_sampler=sampler,
                         pin_memory=d.device.startswith("cuda"))
    wrapped: nn.Module = model
    if d.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)
    return FoldRun(
        cfg=cfg, k=k, d=d, out=fold_dir(cfg, k), fingerprint=config_fingerprint(cfg, scope="fold"),
        classes=classes, task=task, tr=tr, va=va, test=test, spec=spec, mods=mods, tab=tab, model_args=model_args, model=model,
        frozen_bn=frozen_bn, ema=ema, wrapped=wrapped, fwd=torch.compile(wrapped) if tcfg["compile"] else wrapped,
        eval_model=ema.module if ema is not None and tcfg["use_ema_for_oof"] else model, opt=opt, sched=sched,
        scaler=scaler, loss_fn=loss_fn, amp_dtype=amp_dtype, channels_last=bool(tcfg["channels_last"]),
        views=views, batch_size=gb, accum=accum, steps_per_epoch=steps, epochs=epochs, ds_tr=ds_tr, ds_va=ds_va,
        ds_te=ds_te, sampler=sampler, loader=loader, workers=workers)


# ----------------------------------------------------------------------------- one fold


def start_fold(run: FoldRun, ckpt: Checkpointer, resume: bool) -> None:
    """Resume from the checkpoint when asked (else warn that it is overwritten); write config.yaml."""
    k, d = run.k, run.d
    if ckpt.exists():
        if resume:
            ckpt.restore(run)
            log.info("fold %d: resumed from %s after epoch %d", k, ckpt.path, run.epoch)
        elif d.main:
            log.warning("fold %d: %s exists; starting over (pass --resume to continue it)", k, ckpt.path)
    if d.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.out)
    run.t_start = time.time()
    mcfg = run.tcfg["model"]
    log.info("fold %d: %d train / %d valid / %s test lesions, %s %s on %s, %d epochs x %d steps (batch %d x %d "
             "accum, %d process(es)), amp %s", k, len(run.tr), len(run.va), 0 if run.ds_te is None else len(run.ds_te),
             mcfg["kind"], mcfg["fusion"] if mcfg["kind"] == "fusion" else mcfg["modality"], run.device,
             run.epochs, run.steps_per_epoch, run.batch_size, run.accum, d.world, run.amp_dtype)


def end_epoch(run: FoldRun, row: dict[str, Any], ckpt: Checkpointer) -> None:
    """Record the epoch's history row; rank 0 writes checkpoint.pt and history.csv."""
    run.history.append(row)
    run.epoch = row["epoch"]
    log.info("fold %d epoch %d/%d: train loss %.4f%s | lr %.2e | %.1f img/s", run.k, run.epoch, run.epochs,
             row["train_loss"], f" | val loss {row['val_loss']:.4f} macro F1 {row['val_macro_f1']:.4f}"
             if "val_loss" in row else "", row["lr"], row["images_per_s"])
    if run.d.main:
        ckpt.save(run)
        write_csv(pd.DataFrame(run.history), run.out / HISTORY)
    D.barrier(run.d)


def fold_summary(run: FoldRun, used: str, f1: float) -> dict[str, Any]:
    es, h = run.tcfg["early_stopping"], run.history
    return {"fold": run.k, "fingerprint": run.fingerprint, "epochs_run": len(h), "epochs": run.epochs,
            "weights_for_oof": used, "early_stopping_used": bool(es["enabled"]),
            "best_epoch": None if run.best is None else run.best["epoch"], "val_macro_f1": f1,
            "n_train": len(run.tr), "n_valid": len(run.va), "n_test": 0 if run.ds_te is None else len(run.ds_te),
            "world_size": run.d.world, "device": run.device, "seconds": round(time.time() - run.t_start, 1),
            "images_per_s": float(np.mean([r["images_per_s"] for r in h])) if h else None, "views": run.views}


def save_fold_model(run: FoldRun, path: Path) -> None:
    """model.pt: the OOF weights + what rebuilds the model and its inputs (full preprocessing spec)."""
    obj = {"format_version": CHECKPOINT_VERSION, "state_dict": module_state(run.eval_model),
           "model_cfg": run.tcfg["model"], "model_args": run.model_args, "tabular": run.tab.state(),
           "spec": run.spec, "classes": run.classes, "task": run.task, "fold": run.k,
           "fingerprint": run.fingerprint}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def finalize_fold(run: FoldRun, ckpt: Checkpointer | None = None, test_rows: str | None = None) -> dict[str, Any]:
    """OOF / test logits with the final weights (best epoch under early stopping, else last or EMA);
    rank 0 writes oof.parquet, test_logits.parquet (+ .json: `test_rows`, the test rows' fingerprint),
    model.pt, summary.json and deletes the checkpoint (unless `keep_checkpoint`). Returns the summary."""
    if run.tcfg["early_stopping"]["enabled"] and run.best is not None:
        run.eval_model.load_state_dict(run.best["state"])
        val_logits, used = run.best["val_logits"], f"best epoch {run.best['epoch']} (early stopping)"
    else:
        val_logits = run.val_logits  # None when resumed after the last epoch's checkpoint
        if val_logits is None:
            val_logits = predict(run, run.ds_va, f"fold {run.k} valid")
        used = "EMA" if run.eval_model is not run.model else "last"
    test_logits = None if run.ds_te is None else predict(run, run.ds_te, f"fold {run.k} test")
    f1, _ = f1_scores(run.ds_va.y, val_logits, run.task)
    summary = fold_summary(run, used, f1)
    if run.d.main:
        write_parquet(prediction_table(run.va[ID], val_logits, run.classes), run.out / OOF)
        if test_logits is not None:
            write_fold_test_logits(run.out, run.test[ID], test_logits, run.classes, test_rows)
        save_fold_model(run, run.out / MODEL)
        write_json(summary, run.out / FOLD_SUMMARY_JSON)
        if not run.tcfg["keep_checkpoint"]:
            (ckpt or Checkpointer.of(run)).delete()
        log.info("fold %d done: OOF macro F1 %.4f (%s weights, %s) in %.0fs", run.k, f1, used, "+".join(run.views),
                 summary["seconds"])
    D.barrier(run.d)
    return summary


def train_fold(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None, k: int,
               resume: bool = False, d: D.Dist | None = None, stop_after: int | None = None,
               test_rows: str | None = None) -> dict | None:
    """Train fold k; write its artifacts (rank 0). Returns its summary, or None when stopped early
    by `stop_after` (epochs completed in this call's run, for time-boxed runs and tests). `test_rows`:
    the test rows' fingerprint (`rows_key_of_test`; computed when None)."""
    test_rows = test_rows or rows_key_of_test(cfg, info, test)
    run = build_fold(cfg, info, train, test, k, d)
    ckpt = Checkpointer.of(run)
    start_fold(run, ckpt, resume)
    start = run.epoch
    for epoch in range(start, run.epochs):
        t0 = time.time()
        row, stop = train_one_epoch(run, epoch), False
        if should_validate(run, epoch):
            run.val_logits, metrics = validate(run)
            row.update(metrics)
            if run.tcfg["early_stopping"]["enabled"]:
                stop = update_early_stopping(run, epoch, run.val_logits, metrics)
        row["seconds"] = round(time.time() - t0, 2)
        end_epoch(run, row, ckpt)
        if stop:
            log.info("fold %d: early stopping after epoch %d (best epoch %d, macro F1 %.4f)", k, epoch + 1,
                     run.best["epoch"], run.best["f1"])
            break
        if stop_after is not None and epoch + 1 - start >= stop_after and epoch + 1 < run.epochs:
            log.info("fold %d: stopping after epoch %d as asked (--stop-after); resume with --resume", k, epoch + 1)
            return None
    return finalize_fold(run, ckpt, test_rows)


def refresh_test_logits(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame, k: int, test_rows: str,
                        d: D.Dist | None = None) -> np.ndarray:
    """A finished fold meeting other test rows (a new test release): its test logits from its saved
    model.pt, through the fold's own inference setup (`build_fold`: preprocessing, TTA views, batch,
    AMP, channels_last), so they equal what training on these test rows would have written. Rank 0
    writes test_logits.parquet + .json; nothing of the train side is touched."""
    run = build_fold(cfg, info, train, test, k, d)
    path = run.out / MODEL
    if not path.exists():
        raise PipelineError(f"{path} not found: fold {k} is marked done but has no model; delete "
                            f"{run.out / FOLD_SUMMARY_JSON} and rerun 02_train_fold.py to train it again")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if obj.get("format_version") != CHECKPOINT_VERSION or obj.get("fingerprint") != run.fingerprint:
        raise PipelineError(f"{path} was written by another config or format (fingerprint {obj.get('fingerprint')}, "
                            f"format {obj.get('format_version')}): rerun 02_train_fold.py without it")
    run.eval_model.load_state_dict(obj["state_dict"])
    logits = predict(run, run.ds_te, f"fold {k} test")
    if run.d.main:
        write_fold_test_logits(run.out, test[ID], logits, run.classes, test_rows)
        log.info("fold %d: test logits of %d lesions (another test release) from %s", k, len(logits), path)
    D.barrier(run.d)
    return logits
