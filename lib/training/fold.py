"""Fold training of image and fusion models (see 02_train_fold.py).

Per fold k (rows with `fold == k` are validation, the rest train):
- model `lib.models.build_model` on `train.model`, heads seeded by (seed, fold); optional
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
- data parallel (`torchrun`, see lib/distributed.py): each global micro-batch of `batch_size` rows
  is split into contiguous per-rank slices of batch_size / world; the DDP gradient mean equals the
  one-process gradient for per-sample-mean losses (all but `soft_f1`/`focal_soft_f1`, whose batch
  statistic is per rank) when the model has no batch-dependent randomness (dropout, drop path) and
  BN does not use batch statistics (`bn: frozen`; `bn: sync` = SyncBatchNorm on CUDA);
- validation every `val_every` epochs (and always after the last) with the TTA views `train.tta`,
  through the same code path as the test predictions; the last evaluation is the fold's OOF.

Artifacts in `<output>/<exp>/fold{k}/`: checkpoint.pt (every epoch, atomic; deleted at the end
unless `keep_checkpoint`), history.csv, oof.parquet (lesion_id + one logit column per class, the
fold's rows), test_logits.parquet, model.pt (the OOF weights + what is needed to rebuild the model),
config.yaml, summary.json (marks the fold done). When every fold is done: `<output>/<exp>/oof.parquet`
and `test.parquet` (probabilities: softmax, or sigmoid for multilabel / binary, of the TTA-averaged logits;
test averaged over folds) and cv.json (lib.report.cv_summary + training notes).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from lib.core.artifacts import fold_dir, prep_dir, save_config
from lib.core.errors import PipelineError
from lib.core.io import ID, atomic_path, write_csv, write_json, write_parquet
from lib.core.progress import progress
from lib.core.runtime import seed_for, torch_device
from lib.training import distributed as D
from lib.training.data import (
    LesionDataset,
    Tabular,
    _loader,
    epoch_order,
    model_modalities,
    resolve_workers,
    to_device,
)
from lib.training.inference import _table, f1_scores, infer
from lib.training.losses import Loss
from lib.training.optim import (
    amp_setup,
    autocast,
    cosine_lambda,
    freeze_blocks,
    param_groups,
    set_train_mode,
)
from lib.vision.backbones import preprocess_spec
from lib.vision.models import build_model
from lib.vision.tta import parse_views

log = logging.getLogger(__name__)


RUNTIME_KEYS = ("workers", "log_every", "folds", "keep_checkpoint")  # not part of the fingerprint


# ----------------------------------------------------------------------------- small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(cfg: dict) -> str:
    """Hash of everything that determines a fold's result (not workers/logging/fold selection)."""
    t = {k: v for k, v in cfg["train"].items() if k not in RUNTIME_KEYS}
    key = {"train": t, "seed": cfg["seed"], "prep": str(cfg["paths"]["prep"]), "folds": cfg["folds"],
           "format": cfg["data"]["format"]}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- model setup


# ----------------------------------------------------------------------------- inference


# ----------------------------------------------------------------------------- one fold


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def train_fold(cfg: dict, info: dict, train: pd.DataFrame, test: pd.DataFrame | None, k: int,
               resume: bool = False, d: D.Dist | None = None, stop_after: int | None = None) -> dict | None:
    """Train fold k; write its artifacts (rank 0). Returns its summary, or None when stopped early
    by `stop_after` (epochs completed in this call's run, for time-boxed runs and tests)."""
    tcfg, mcfg = cfg["train"], cfg["train"]["model"]
    d = d or D.Dist(device=torch_device(cfg))
    device, out = d.device, fold_dir(cfg, k)
    classes, task = list(info["classes"]), info.get("task", "multiclass")
    tr, va = train[train["fold"] != k].reset_index(drop=True), train[train["fold"] == k].reset_index(drop=True)
    if len(va) == 0:
        raise PipelineError(f"fold {k} has no rows (folds present: {sorted(train['fold'].unique().tolist())})")
    if len(tr) < d.world:
        raise PipelineError(f"fold {k}: only {len(tr)} training rows")
    fp, seed = fingerprint(cfg), int(cfg["seed"])
    ycols = [f"y_{c}" for c in classes]
    y_tr = tr[ycols].to_numpy(np.float32)
    spec = preprocess_spec(mcfg["arch"], mcfg["weights"])
    size = int(tcfg["img_size"])
    mods = model_modalities(info, mcfg)
    tab = Tabular(info, tr)
    amp_dtype, use_scaler = amp_setup(tcfg["amp"], device)
    cl = bool(tcfg["channels_last"])
    views = parse_views(tcfg["tta"])
    if tcfg["bn"] not in ("train", "frozen", "sync"):
        raise PipelineError(f"config: train.bn '{tcfg['bn']}' unknown (train | frozen | sync)")

    # model, optimizer, schedule
    seed_everything(seed_for(seed, k, 1))
    model_args = {"n_classes": len(classes), "n_meta": len(tab.meta_cols), "n_monet": len(tab.monet_cols),
                  "modalities": list(info["modalities"]), "img_size": size}
    model = build_model(mcfg, **model_args)
    frozen_bn = freeze_blocks(model, int(tcfg["freeze_blocks"]))
    if tcfg["bn"] == "sync" and d.enabled:
        if not device.startswith("cuda"):
            raise PipelineError("config: train.bn=sync needs CUDA; on CPU use bn=frozen for exact DDP equivalence")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    ema = None
    if float(tcfg["ema"]) > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(tcfg["ema"]))
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=float(tcfg["lr"]),
                            weight_decay=float(tcfg["weight_decay"]))
    gb = int(tcfg["batch_size"])
    if len(tr) < gb:
        gb = max(d.world, len(tr) // d.world * d.world)
        log.warning("fold %d: %d training rows < batch_size; using batch %d", k, len(tr), gb)
    accum = max(1, int(tcfg["accum"]))
    n_micro = len(tr) // gb
    steps_per_epoch = math.ceil(n_micro / accum)
    epochs = int(tcfg["epochs"])
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lambda(total, int(round(float(tcfg["warmup_epochs"]) * steps_per_epoch))))
    scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=use_scaler)
    loss_fn = Loss(tcfg["loss"], task, y_tr).to(device)

    # data
    folder = prep_dir(cfg)
    common = dict(folder=folder, modalities=mods, classes=classes, tab=tab, size=size,
                  mean=spec["mean"], std=spec["std"])
    ds_tr = LesionDataset(tr, train=True, aug=tcfg["aug"], seed=seed, fold=k,
                          modality_dropout=float(tcfg["modality_dropout"]) if len(mods) > 1 else 0.0,
                          monet_dropout=float(tcfg["monet_dropout"]) if mcfg["use_monet"] else 0.0, **common)
    ds_va = LesionDataset(va, **common)
    ds_te = None if test is None or len(test) == 0 else LesionDataset(test, **common)
    sampler = D.GlobalBatchSampler(lambda e: epoch_order(y_tr, tcfg["sampler"], seed, k, e), len(tr), gb, d)
    workers = resolve_workers(int(tcfg["workers"]))
    dl_tr = _loader(ds_tr, workers, seed_for(seed, k, 7), batch_sampler=sampler, pin_memory=device.startswith("cuda"))

    # state (fresh or resumed)
    start, history, best, bad, step = 0, [], None, 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        if resume:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if ck["fingerprint"] != fp:
                raise PipelineError(f"{ckpt_path} was trained with another config (fingerprint {ck['fingerprint']} "
                                    f"vs {fp}); delete it or rerun without --resume to start over")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            if ema is not None:
                ema.module.load_state_dict(ck["ema"])
            start, history, best, bad, step = ck["epoch"], ck["history"], ck["best"], ck["bad_epochs"], ck["step"]
            _set_rng_state(ck["rng"])
            log.info("fold %d: resumed from %s after epoch %d", k, ckpt_path, start)
        elif d.main:
            log.warning("fold %d: %s exists; starting over (pass --resume to continue it)", k, ckpt_path)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)

    wrapped: nn.Module = model
    if d.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    fwd = torch.compile(wrapped) if tcfg["compile"] else wrapped
    eval_model = ema.module if ema is not None and tcfg["use_ema_for_oof"] else model
    es = tcfg["early_stopping"]
    n_img = len(mods)
    t_fold = time.time()
    val_logits = None
    log.info("fold %d: %d train / %d valid / %s test lesions, %s %s on %s, %d epochs x %d steps (batch %d x %d "
             "accum, %d process(es)), amp %s", k, len(tr), len(va), 0 if ds_te is None else len(ds_te),
             mcfg["kind"], mcfg["fusion"] if mcfg["kind"] == "fusion" else mcfg["modality"], device, epochs,
             steps_per_epoch, gb, accum, d.world, amp_dtype)

    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed_for(seed, k, epoch, 3, d.rank))  # in-model randomness (dropout, drop path)
        set_train_mode(model, tcfg["bn"], frozen_bn)
        t0 = time.time()
        loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
        bar = progress(len(sampler), f"fold {k} epoch {epoch + 1}/{epochs}", unit="batch", disable=not d.main)
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(dl_tr):
            b = to_device(batch, device, cl)
            last = (i + 1) % accum == 0 or i + 1 == len(sampler)
            sync = contextlib.nullcontext() if last or not d.enabled else wrapped.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    logits = fwd(b)
                loss = loss_fn(logits.float(), b["y"])
                scaler.scale(loss / accum).backward()
            if last:
                if float(tcfg["clip_grad"]) > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                             float(tcfg["clip_grad"]))
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                if ema is not None:
                    ema.update(model, step=step)
            nb = len(batch["idx"])
            loss_sum += float(loss.detach()) * nb
            seen += nb
            bar.update()
            if i % max(1, int(tcfg["log_every"])) == 0 or i + 1 == len(sampler):
                ips = seen * d.world * n_img / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", img_s=f"{ips:.1f}")
        bar.close()
        t_train = time.time() - t0
        stats = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
        if d.enabled:
            torch.distributed.all_reduce(stats)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(stats[0] / max(stats[1], 1)),
                               "lr": float(opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)),
                               "images_per_s": float(stats[1]) * n_img / max(t_train, 1e-9),
                               "train_seconds": round(t_train, 2)}
        final = epoch + 1 == epochs
        do_val = final or bool(es["enabled"]) or (int(tcfg["val_every"]) > 0 and (epoch + 1) % int(tcfg["val_every"]) == 0)
        stop = False
        if do_val:
            val_logits = infer(eval_model, eval_model, ds_va, views, device, gb, workers, amp_dtype, cl, d,
                               desc=f"fold {k} valid")
            with torch.no_grad():
                vl = float(loss_fn(torch.tensor(val_logits, device=device), torch.tensor(ds_va.y, device=device)))
            f1, per = f1_scores(ds_va.y, val_logits, task)
            row.update({"val_loss": vl, "val_macro_f1": f1, **{f"f1_{c}": float(v) for c, v in zip(classes, per)}})
            monitor = f1
            if task == "binary":  # F1 at 0.5 is ~0 at low prevalence: monitor AUC instead
                yv = ds_va.y
                row["val_auc"] = monitor = float(roc_auc_score(yv[:, 0], val_logits[:, 0])) if 0 < yv.sum() < len(yv) else float("nan")
                monitor = monitor if np.isfinite(monitor) else -np.inf
            if es["enabled"]:
                if best is None or monitor > best["f1"]:  # "f1": the monitored score (AUC for binary)
                    best, bad = {"epoch": epoch + 1, "f1": monitor, "state": _state(eval_model), "val_logits": val_logits}, 0
                else:
                    bad += 1
                    stop = bad >= int(es["patience"])
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        log.info("fold %d epoch %d/%d: train loss %.4f%s | lr %.2e | %.1f img/s", k, epoch + 1, epochs,
                 row["train_loss"], f" | val loss {row['val_loss']:.4f} macro F1 {row['val_macro_f1']:.4f}"
                 if do_val else "", row["lr"], row["images_per_s"])
        if d.main:
            ck = {"model": _state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "scaler": scaler.state_dict(), "ema": None if ema is None else _state(ema.module),
                  "epoch": epoch + 1, "step": step, "history": history, "best": best, "bad_epochs": bad,
                  "rng": _rng_state(), "fingerprint": fp, "config": cfg}
            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
            write_csv(pd.DataFrame(history), out / "history.csv")
        D.barrier(d)
        if stop:
            log.info("fold %d: early stopping after epoch %d (best epoch %d, macro F1 %.4f)", k, epoch + 1,
                     best["epoch"], best["f1"])
            break
        if stop_after is not None and epoch + 1 - start >= stop_after and not final:
            log.info("fold %d: stopping after epoch %d as asked (--stop-after); resume with --resume", k, epoch + 1)
            return None

    # final weights -> OOF, test, artifacts
    if es["enabled"] and best is not None:
        eval_model.load_state_dict(best["state"])
        val_logits, used = best["val_logits"], f"best epoch {best['epoch']} (early stopping)"
    else:
        if val_logits is None:  # resumed after the last epoch's checkpoint but before the artifacts
            val_logits = infer(eval_model, eval_model, ds_va, views, device, gb, workers, amp_dtype, cl, d,
                               desc=f"fold {k} valid")
        used = "EMA" if eval_model is not model else "last"
    test_logits = None
    if ds_te is not None:
        test_logits = infer(eval_model, eval_model, ds_te, views, device, gb, workers, amp_dtype, cl, d,
                            desc=f"fold {k} test")
    f1, _ = f1_scores(ds_va.y, val_logits, task)
    summary = {"fold": k, "fingerprint": fp, "epochs_run": len(history), "epochs": epochs,
               "weights_for_oof": used, "early_stopping_used": bool(es["enabled"]),
               "best_epoch": None if best is None else best["epoch"], "val_macro_f1": f1,
               "n_train": len(tr), "n_valid": len(va), "n_test": 0 if ds_te is None else len(ds_te),
               "world_size": d.world, "device": device, "seconds": round(time.time() - t_fold, 1),
               "images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
               "views": views}
    if d.main:
        write_parquet(_table(va[ID], val_logits, classes), out / "oof.parquet")
        if test_logits is not None:
            write_parquet(_table(test[ID], test_logits, classes), out / "test_logits.parquet")
        with atomic_path(out / "model.pt") as tmp:
            torch.save({"state_dict": _state(eval_model), "model_cfg": mcfg, "model_args": model_args,
                        "tabular": tab.state(), "spec": {"size": size, "mean": list(spec["mean"]),
                                                         "std": list(spec["std"])},
                        "classes": classes, "task": task, "fold": k, "fingerprint": fp}, tmp)
        write_json(summary, out / "summary.json")
        if not tcfg["keep_checkpoint"] and ckpt_path.exists():
            ckpt_path.unlink()
        log.info("fold %d done: OOF macro F1 %.4f (%s weights, %s) in %.0fs", k, f1, used, "+".join(views),
                 summary["seconds"])
    D.barrier(d)
    return summary


# ----------------------------------------------------------------------------- experiment


# ----------------------------------------------------------------------------- features for stage 03


