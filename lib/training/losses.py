"""Training losses on logits `[B, C]` and float targets `[B, C]` (one-hot / soft for multiclass,
multi-hot for multilabel).

Every loss is a per-sample quantity averaged over the batch (`mean_b`), except the soft macro-F1
term, which is a batch statistic. Per-sample means make the loss of a global batch equal the mean
of the per-rank losses under DDP (what `lib.training.fold` relies on for one-process == torchrun).

Definitions (p = softmax(z) for multiclass, s = sigmoid(z) for the one-vs-rest losses, y' = the
smoothed targets):
- `ce`            : mean_b  -sum_c y'_c log p_c
- `wce`           : mean_b  -sum_c w_c y'_c log p_c, with w from `class_weights` (inverse frequency
                    ** power, normalized so the training set's mean sample weight is 1; not
                    renormalized per batch, unlike torch's `weight=` which divides by sum of w_y)
- `focal`         : mean_b  -sum_c a_c y'_c (1 - p_c)^gamma log p_c (a = alpha: None -> 1, a number,
                    a per-class list, or "auto" = the `wce` weights); gamma 0 and a = 1 is `ce`
- `soft_f1`       : 1 - mean_c 2 TP_c / (2 TP_c + FP_c + FN_c + eps) with TP_c = sum_b q_bc y_bc,
                    FP_c = sum_b q_bc (1 - y_bc), FN_c = sum_b (1 - q_bc) y_bc, q = p (multiclass) or s
- `focal_soft_f1` : focal + soft_f1_weight * soft_f1
- `asl`           : asymmetric loss (Ridnik et al. 2021), one-vs-rest on sigmoids:
                    mean_b -sum_c [ y (1-s)^g+ log s + (1-y) m^g- log(1-m) ], m = max(s - clip, 0)
- `bce`           : mean_b mean_c BCE(s, y') (torch's BCEWithLogits mean)

Label smoothing eps: multiclass y' = y (1 - eps) + eps / C; one-vs-rest y' = y (1 - eps) + eps / 2
(`asl` and `soft_f1` use the unsmoothed targets).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.config.schema import LOSSES
from lib.core.errors import PipelineError

ONE_VS_REST = ("asl", "bce")   # sigmoid losses: valid for multiclass (one-hot) and multilabel
EPS = 1e-7


def class_weights(y: np.ndarray, power: float) -> np.ndarray:
    """Per-class weights (1 / frequency) ** power from a `[N, C]` 0/1 label matrix, normalized so that
    the mean weight over the N training samples is 1 (sum_c n_c w_c = N). Absent classes count as 1."""
    y = np.asarray(y, dtype=np.float64)
    n = np.maximum(y.sum(0), 1.0)
    w = (n.sum() / n) ** float(power)
    return (w * y.shape[0] / float((n * w).sum())).astype(np.float32)


def smooth_targets(y: torch.Tensor, eps: float, multiclass: bool) -> torch.Tensor:
    if eps <= 0:
        return y
    return y * (1 - eps) + eps / (y.shape[1] if multiclass else 2.0)


def cross_entropy(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    logp = F.log_softmax(z.float(), dim=1)
    w = 1.0 if weight is None else weight.view(1, -1)
    return -(w * y * logp).sum(1).mean()


def focal_loss(z: torch.Tensor, y: torch.Tensor, gamma: float,
               alpha: torch.Tensor | float | None = None) -> torch.Tensor:
    logp = F.log_softmax(z.float(), dim=1)
    mod = (1 - logp.exp()).clamp_min(0).pow(gamma)
    a = 1.0 if alpha is None else (alpha.view(1, -1) if torch.is_tensor(alpha) else float(alpha))
    return -(a * y * mod * logp).sum(1).mean()


def soft_f1_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - soft macro F1 of probabilities `q` vs targets `y` over the batch."""
    tp = (q * y).sum(0)
    fp = (q * (1 - y)).sum(0)
    fn = ((1 - q) * y).sum(0)
    return 1 - (2 * tp / (2 * tp + fp + fn + EPS)).mean()


def asymmetric_loss(z: torch.Tensor, y: torch.Tensor, gamma_neg: float, gamma_pos: float,
                    clip: float) -> torch.Tensor:
    s = torch.sigmoid(z.float())
    m = (s - clip).clamp_min(0) if clip > 0 else s
    pos = y * (1 - s).pow(gamma_pos) * torch.log(s.clamp_min(EPS))
    neg = (1 - y) * m.pow(gamma_neg) * torch.log((1 - m).clamp_min(EPS))
    return -(pos + neg).sum(1).mean()


class Loss(nn.Module):
    """The configured loss (`train.loss` section); `forward(logits, targets) -> scalar`."""

    def __init__(self, lcfg: dict[str, Any], task: str, y_train: np.ndarray | None = None) -> None:
        super().__init__()
        name = lcfg["name"]
        if name not in LOSSES:
            raise PipelineError(f"config: train.loss.name '{name}' unknown (known: {list(LOSSES)})")
        self.multiclass = task == "multiclass"
        if not self.multiclass and name not in ONE_VS_REST + ("soft_f1",):
            raise PipelineError(f"config: train.loss.name '{name}' is a softmax loss; a {task} task (sigmoid outputs) "
                                f"needs one of {list(ONE_VS_REST) + ['soft_f1']}")
        self.name, self.cfg = name, dict(lcfg)
        self.smoothing = float(lcfg["smoothing"])
        w = None
        alpha = lcfg["focal_alpha"]
        needs_w = name == "wce" or (name in ("focal", "focal_soft_f1") and alpha == "auto")
        if needs_w:
            if y_train is None:
                raise PipelineError(f"loss {name} needs the training labels for class weights")
            w = torch.from_numpy(class_weights(y_train, lcfg["class_weight_power"]))
        self.register_buffer("weight", w if w is not None else torch.zeros(0), persistent=False)
        if name in ("focal", "focal_soft_f1"):
            if alpha == "auto":
                self.alpha: Any = "weight"
            elif isinstance(alpha, Sequence) and not isinstance(alpha, str):
                self.register_buffer("alpha_t", torch.tensor(list(alpha), dtype=torch.float32), persistent=False)
                self.alpha = "alpha_t"
            elif alpha is None or isinstance(alpha, (int, float)):
                self.alpha = alpha
            else:
                raise PipelineError(f"config: train.loss.focal_alpha must be null, a number, a list or 'auto', "
                                    f"got {alpha!r}")

    def _alpha(self) -> torch.Tensor | float | None:
        return getattr(self, self.alpha) if isinstance(self.alpha, str) else self.alpha

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c, n = self.cfg, self.name
        y = y.float()
        ys = smooth_targets(y, self.smoothing, self.multiclass and n not in ONE_VS_REST)
        if n == "ce":
            return cross_entropy(z, ys)
        if n == "wce":
            return cross_entropy(z, ys, self.weight)
        if n == "bce":
            return F.binary_cross_entropy_with_logits(z.float(), ys)
        if n == "asl":
            return asymmetric_loss(z, y, c["asl_gamma_neg"], c["asl_gamma_pos"], c["asl_clip"])
        q = torch.softmax(z.float(), 1) if self.multiclass else torch.sigmoid(z.float())
        if n == "soft_f1":
            return soft_f1_loss(q, y)
        fl = focal_loss(z, ys, c["focal_gamma"], self._alpha())
        if n == "focal":
            return fl
        return fl + float(c["soft_f1_weight"]) * soft_f1_loss(q, y)
