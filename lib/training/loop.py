"""One fold's training state (`FoldRun`) and the per-epoch steps: `train_step`, `train_one_epoch`,
`validate` and the early-stopping bookkeeping. Built by `lib.training.fold.build_fold`."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from lib.core.progress import progress
from lib.core.runtime import seed_for
from lib.training import distributed as D
from lib.training.data import LesionDataset, Tabular, to_device
from lib.training.inference import f1_scores, finished_forward, infer
from lib.training.losses import Loss
from lib.training.optim import autocast, set_train_mode

log = logging.getLogger(__name__)


@dataclass
class FoldRun:
    """Everything one fold's training needs, plus its progress (`epoch` = epochs completed, `history`,
    early-stopping `best` / `bad`, optimizer `step`, the last `val_logits`)."""

    cfg: dict
    k: int
    d: D.Dist
    out: Path                      # <output>/<exp>/fold{k}
    fingerprint: str
    classes: list[str]
    task: str
    tr: pd.DataFrame               # training rows (fold != k)
    va: pd.DataFrame               # validation rows (fold == k), the OOF rows
    test: pd.DataFrame | None
    spec: dict                     # preprocessing spec (preprocess_spec + the training size), JSON-able
    mods: list[str]                # image modalities the model reads
    tab: Tabular
    model_args: dict               # build_model kwargs besides the model config
    model: nn.Module
    frozen_bn: list[nn.Module]
    ema: Any                       # timm ModelEmaV3 or None
    wrapped: nn.Module             # DDP wrapper (or the model)
    fwd: nn.Module                 # torch.compile(wrapped) (or wrapped)
    eval_model: nn.Module          # EMA module when used for the OOF, else the model
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: Loss
    amp_dtype: torch.dtype | None
    channels_last: bool
    views: list[str]               # TTA views of validation / test inference
    batch_size: int                # global micro-batch
    accum: int
    steps_per_epoch: int
    epochs: int
    ds_tr: LesionDataset
    ds_va: LesionDataset
    ds_te: LesionDataset | None
    sampler: D.GlobalBatchSampler
    loader: torch.utils.data.DataLoader
    workers: int
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    bad: int = 0
    step: int = 0
    val_logits: np.ndarray | None = None
    t_start: float = field(default_factory=time.time)

    @property
    def tcfg(self) -> dict:
        return self.cfg["train"]

    @property
    def device(self) -> str:
        return self.d.device

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])


def train_step(run: FoldRun, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
    """Forward + backward of one micro-batch (already on the device); on the `last` micro-batch of an
    accumulation group also clip, step the optimizer, scheduler and EMA. Returns the (unscaled) loss."""
    tcfg = run.tcfg
    sync = contextlib.nullcontext() if last or not run.d.enabled else run.wrapped.no_sync()
    with sync:
        with autocast(run.device, run.amp_dtype):
            logits = run.fwd(batch)
        loss = run.loss_fn(logits.float(), batch["y"])
        run.scaler.scale(loss / run.accum).backward()
    if last:
        if float(tcfg["clip_grad"]) > 0:
            run.scaler.unscale_(run.opt)
            nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                     float(tcfg["clip_grad"]))
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        run.sched.step()
        run.step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
    return loss


def train_one_epoch(run: FoldRun, epoch: int) -> dict[str, Any]:
    """Train epoch `epoch` (0-based); returns its history row: epoch (1-based), train_loss (mean over
    all ranks' rows), lr (base lr of the schedule), images_per_s, train_seconds."""
    d, n_img, every = run.d, len(run.mods), max(1, int(run.tcfg["log_every"]))
    run.sampler.set_epoch(epoch)
    torch.manual_seed(seed_for(run.seed, run.k, epoch, 3, d.rank))  # in-model randomness (dropout, drop path)
    set_train_mode(run.model, run.tcfg["bn"], run.frozen_bn)
    t0 = time.time()
    loss_sum, seen, n = torch.zeros((), dtype=torch.float64), 0, len(run.sampler)
    bar = progress(n, f"fold {run.k} epoch {epoch + 1}/{run.epochs}", unit="batch", disable=not d.main)
    run.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(run.loader):
        last = (i + 1) % run.accum == 0 or i + 1 == n
        loss = train_step(run, to_device(batch, run.device, run.channels_last), last)
        nb = len(batch["idx"])
        loss_sum += float(loss.detach()) * nb
        seen += nb
        bar.update()
        if i % every == 0 or i + 1 == n:
            ips = seen * d.world * n_img / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", img_s=f"{ips:.1f}")
    bar.close()
    t_train = time.time() - t0
    stats = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
    if d.enabled:
        torch.distributed.all_reduce(stats)
    g0 = run.opt.param_groups[0]
    return {"epoch": epoch + 1, "train_loss": float(stats[0] / max(stats[1], 1)),
            "lr": float(g0["lr"] / g0.get("lr_scale", 1.0)),
            "images_per_s": float(stats[1]) * n_img / max(t_train, 1e-9), "train_seconds": round(t_train, 2)}


def should_validate(run: FoldRun, epoch: int) -> bool:
    """After the last epoch, every epoch with early stopping, else every `val_every` epochs."""
    every = int(run.tcfg["val_every"])
    return (epoch + 1 == run.epochs or bool(run.tcfg["early_stopping"]["enabled"])
            or (every > 0 and (epoch + 1) % every == 0))


def predict(run: FoldRun, ds: LesionDataset, desc: str, finished: bool = True) -> np.ndarray:
    """TTA-averaged logits of `run.eval_model` for every row of `ds` (the validation/OOF/test path).
    `finished`: the weights are final (OOF / test), so the pass runs in `features.runtime`'s engine
    (`finished_forward`); a validation during training passes False (PyTorch)."""
    fn = finished_forward(run.eval_model, run.cfg, run.out, run.d, run.amp_dtype, run.workers,
                          ds.spec) if finished else run.eval_model
    return infer(fn, run.eval_model, ds, run.views, run.device, run.batch_size, run.workers,
                 run.amp_dtype, run.channels_last, run.d, desc=desc)


def training_over(run: FoldRun) -> bool:
    """A validation now sees the final weights: the last epoch's (run.epoch = epochs completed before
    it) without early stopping, which keeps the best epoch's weights and validation logits instead."""
    return not run.tcfg["early_stopping"]["enabled"] and run.epoch + 1 >= run.epochs


def validate(run: FoldRun, logits: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Validation logits (inferred unless given; after the last epoch, the finished model's OOF pass)
    and metrics: val_loss, val_macro_f1, f1_<class>, and val_auc for binary tasks."""
    if logits is None:
        logits = predict(run, run.ds_va, f"fold {run.k} valid", finished=training_over(run))
    y = run.ds_va.y
    with torch.no_grad():
        vl = float(run.loss_fn(torch.tensor(logits, device=run.device), torch.tensor(y, device=run.device)))
    f1, per = f1_scores(y, logits, run.task)
    row = {"val_loss": vl, "val_macro_f1": f1, **{f"f1_{c}": float(v) for c, v in zip(run.classes, per)}}
    if run.task == "binary":  # F1 at 0.5 is ~0 at low prevalence: AUC is monitored instead
        row["val_auc"] = float(roc_auc_score(y[:, 0], logits[:, 0])) if 0 < y.sum() < len(y) else float("nan")
    return logits, row


def monitor_score(metrics: dict[str, float], task: str) -> float:
    """The early-stopping score: macro F1, or AUC for binary tasks (-inf when undefined)."""
    if task != "binary":
        return metrics["val_macro_f1"]
    auc = metrics["val_auc"]
    return auc if np.isfinite(auc) else -np.inf


def update_early_stopping(run: FoldRun, epoch: int, logits: np.ndarray, metrics: dict[str, float]) -> bool:
    """Keep the best epoch's eval weights and logits in `run.best`; True when patience is used up."""
    score = monitor_score(metrics, run.task)
    if run.best is None or score > run.best["f1"]:  # "f1": the monitored score (AUC for binary)
        run.best, run.bad = {"epoch": epoch + 1, "f1": score, "state": module_state(run.eval_model),
                             "val_logits": logits}, 0
        return False
    run.bad += 1
    return run.bad >= int(run.tcfg["early_stopping"]["patience"])


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
