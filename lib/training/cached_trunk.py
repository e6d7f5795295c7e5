"""Cached-trunk fine-tuning, the training half: for each fold k, a copy of the encoder's tail (the
pretrained modules after the cut, `lib.vision.trunk`) and a new linear head over the modalities are
trained on the cached trunk activations of the lesions of the OTHER folds only; the fold-k model then
predicts fold k (its out-of-fold logits) and the test lesions (mean over the fold models).

Each step draws one cached view per lesion and modality (the dihedral views act as augmentation);
prediction averages the logits over the views. Loss: class-weighted cross-entropy, weights
(1 / frequency) ** `class_weight_power` on the fold's training rows. AdamW, cosine schedule.

Each fold's fitted tail + head is kept as a safetensors state dict (`save_tail_head`, no pickle), so
a new test release is scored by the same fold models (`load_tail_head`, `test_logits`) without
training them again.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.core.errors import PipelineError
from lib.core.io import atomic_path
from lib.core.progress import progress
from lib.training.losses import class_weights, cross_entropy

log = logging.getLogger(__name__)

FINETUNE_FORMAT_VERSION = 2   # in the fine-tune cache key; bump when its logits change meaning (2: fold states kept)


def finetune_key_parts(trunk_key: str, ft: "FineTune", folds_sha1: str, classes: list[str], train_rows: str) -> dict:
    """Everything the fold models and their OOF logits depend on (their cache key is a hash of this):
    `train_rows` is the fingerprint of the training rows (ids, images, labels). The test rows are not
    in it: test logits are cached per test fingerprint beside the fold models."""
    return {"trunk": trunk_key, "finetune": vars(ft), "folds": folds_sha1, "classes": list(classes),
            "train_rows": str(train_rows), "format": FINETUNE_FORMAT_VERSION}


@dataclass
class FineTune:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3           # the new head
    tail_lr: float = 1e-3      # the pretrained tail modules
    weight_decay: float = 1e-2
    dropout: float = 0.2
    class_weight_power: float = 0.5
    seed: int = 42


class TailHead(nn.Module):
    """Shared tail + pooling for each modality's activations, then one linear layer on their concat."""

    def __init__(self, tail: nn.Module, pool: nn.Module, n_features: int, n_modalities: int,
                 n_classes: int, dropout: float) -> None:
        super().__init__()
        self.tail, self.pool = tail, pool
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(n_features * n_modalities, n_classes)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        f = [self.pool(self.tail(x)).flatten(1) for x in xs]
        return self.fc(self.drop(torch.cat(f, 1)))


def _batch(acts: list[np.ndarray], rows: np.ndarray, views: np.ndarray | int, device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a[rows, views], dtype=np.float32)).to(device) for a in acts]


def _optimizer(model: TailHead, ft: FineTune) -> torch.optim.Optimizer:
    head = [p for p in model.fc.parameters()]
    tail_decay = [p for p in model.tail.parameters() if p.ndim > 1 and p.requires_grad]
    tail_rest = [p for p in model.tail.parameters() if p.ndim <= 1 and p.requires_grad]
    groups = [{"params": head, "lr": ft.lr, "weight_decay": ft.weight_decay},
              {"params": tail_decay, "lr": ft.tail_lr, "weight_decay": ft.weight_decay},
              {"params": tail_rest, "lr": ft.tail_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def fit_fold(tail: nn.Module, pool: nn.Module, n_features: int, acts: list[np.ndarray], y: np.ndarray,
             rows: np.ndarray, ft: FineTune, device: str, desc: str) -> TailHead:
    """Train a copy of `tail` + a new head on `rows` only (`acts[m]`: `[N, V, C, H, W]`, `y`: `[N, K]`)."""
    torch.manual_seed(ft.seed)
    rng = np.random.default_rng(ft.seed)
    model = TailHead(copy.deepcopy(tail), pool, n_features, len(acts), y.shape[1], ft.dropout).to(device)
    opt = _optimizer(model, ft)
    w = torch.from_numpy(class_weights(y[rows], ft.class_weight_power)).to(device)
    steps_per_epoch = max(1, math.ceil(len(rows) / ft.batch_size))
    total = steps_per_epoch * ft.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    n_views = acts[0].shape[1]
    bar = progress(total, desc, unit="step")
    model.train()
    for _ in range(ft.epochs):
        order = rng.permutation(rows)
        for s in range(0, len(order), ft.batch_size):
            b = np.sort(order[s:s + ft.batch_size])
            xs = _batch(acts, b, rng.integers(0, n_views, len(b)), device)
            loss = cross_entropy(model(xs), torch.from_numpy(y[b]).float().to(device), w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: TailHead, acts: list[np.ndarray], rows: np.ndarray, device: str,
            batch_size: int = 128) -> np.ndarray:
    """`[len(rows), K]` logits averaged over the cached views."""
    model.eval()
    out = []
    for s in range(0, len(rows), batch_size):
        b = rows[s:s + batch_size]
        z = [model(_batch(acts, b, v, device)).float() for v in range(acts[0].shape[1])]
        out.append(torch.stack(z).mean(0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.fc.out_features), np.float32)


def cross_fit(tail: nn.Module, pool: nn.Module, n_features: int, acts: list[np.ndarray], y: np.ndarray,
              folds: np.ndarray, test_acts: list[np.ndarray] | None, ft: FineTune, device: str,
              name: str = "tail", on_fold: Callable[[int, TailHead], None] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Out-of-fold logits `[N, K]` (row i from the model of its own fold, which never trained on the
    rows of that fold), test logits (mean of the fold models) and per-fold seconds. `on_fold(k, model)`
    is called with each fitted fold model (to keep it: `save_tail_head`)."""
    oof = np.zeros(y.shape, np.float32)
    tests, secs = [], []
    for k in sorted(int(f) for f in np.unique(folds)):
        t0 = time.time()
        train_rows, valid_rows = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        model = fit_fold(tail, pool, n_features, acts, y, train_rows, ft, device, f"{name} fold {k}")
        oof[valid_rows] = predict(model, acts, valid_rows, device)
        if on_fold is not None:
            on_fold(k, model)
        if test_acts is not None:
            tests.append(predict(model, test_acts, np.arange(len(test_acts[0])), device))
        secs.append(round(time.time() - t0, 1))
        log.info("%s fold %d: trained on %d lesions, predicted %d in %.0fs", name, k, len(train_rows),
                 len(valid_rows), secs[-1])
    return oof, (np.mean(tests, 0) if tests else None), {"fold_seconds": secs}


def fold_test_logits(models: list[TailHead], test_acts: list[np.ndarray], device: str) -> list[np.ndarray]:
    """Each fold model's (in fold order) view-averaged test logits `[N, K]`."""
    rows = np.arange(len(test_acts[0]))
    return [predict(m, test_acts, rows, device) for m in models]


def mean_test_logits(models: list[TailHead], test_acts: list[np.ndarray], device: str) -> np.ndarray:
    """Test logits `[N, K]`: the mean over the fold models (in fold order) of their view-averaged logits."""
    return np.mean(fold_test_logits(models, test_acts, device), 0)


def save_tail_head(model: TailHead, path: Path) -> None:
    """A fitted fold model's state dict (tail, pool, head) as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_tail_head(path: Path, tail: nn.Module, pool: nn.Module, n_features: int, n_modalities: int,
                   n_classes: int, dropout: float, device: str) -> TailHead:
    """A fold model saved by `save_tail_head`: a copy of `tail` + a head, with the saved state (all of
    it: a missing or extra tensor is refused), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = TailHead(copy.deepcopy(tail), pool, n_features, n_modalities, n_classes, dropout)
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise PipelineError(f"{path}: not a readable fine-tuned fold model ({str(e).splitlines()[0]}): "
                            f"delete {path.parent} to fine-tune again") from None
    return model.to(device).eval()
