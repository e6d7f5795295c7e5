"""lib.training.losses against hand-computed values (numbers worked out in the comments)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib.core.errors import PipelineError
from lib.training.losses import Loss, class_weights

CLASSES3 = 3


def cfg(name: str, **kw) -> dict:
    base = {"name": name, "smoothing": 0.0, "focal_gamma": 2.0, "focal_alpha": None, "soft_f1_weight": 0.5,
            "asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05, "class_weight_power": 0.5}
    return {**base, **kw}


Z = torch.tensor([[1.0, 0.0, 0.0]])
Y = torch.tensor([[1.0, 0.0, 0.0]])
LSE = math.log(math.e + 2)  # log-sum-exp of [1, 0, 0] = 1.551445


def test_ce_and_label_smoothing():
    # p0 = e / (e + 2) = 0.576117 -> -log p0 = LSE - 1 = 0.551445
    assert float(Loss(cfg("ce"), "multiclass")(Z, Y)) == pytest.approx(0.551445, abs=1e-6)
    # eps 0.3, C = 3: y' = [0.8, 0.1, 0.1] -> 0.8 * 0.551445 + 0.2 * 1.551445 = 0.751445
    assert float(Loss(cfg("ce", smoothing=0.3), "multiclass")(Z, Y)) == pytest.approx(0.751445, abs=1e-6)
    # batch mean: second row uniform logits -> log 3
    z2, y2 = torch.cat([Z, torch.zeros(1, 3)]), torch.cat([Y, torch.tensor([[0.0, 1.0, 0.0]])])
    assert float(Loss(cfg("ce"), "multiclass")(z2, y2)) == pytest.approx((0.551445 + math.log(3)) / 2, abs=1e-6)


def test_class_weights_and_wce():
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], float)  # counts 3, 1
    # power 1: w ~ [4/3, 4]; scaled so 3*w0 + 1*w1 = 4 -> [2/3, 2]
    np.testing.assert_allclose(class_weights(y, 1.0), [2 / 3, 2.0], rtol=1e-6)
    # power 0.5: w ~ [sqrt(4/3), 2] = [1.154701, 2]; 3*1.154701 + 2 = 5.464102 -> *4/5.464102
    np.testing.assert_allclose(class_weights(y, 0.5), [0.845299, 1.464102], rtol=1e-5)
    loss = Loss(cfg("wce", class_weight_power=1.0), "multiclass", y)
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # log 2 * (2/3 + 2) / 2 = 0.924196 (mean over samples, not over summed weights)
    assert float(loss(z, t)) == pytest.approx(math.log(2) * (2 / 3 + 2) / 2, abs=1e-6)


def test_focal():
    # (1 - 0.576117)^2 * 0.551445 = 0.179677 * 0.551445 = 0.099081
    assert float(Loss(cfg("focal"), "multiclass")(Z, Y)) == pytest.approx(0.099081, abs=1e-5)
    assert float(Loss(cfg("focal", focal_alpha=0.25), "multiclass")(Z, Y)) == pytest.approx(0.024770, abs=1e-5)
    assert float(Loss(cfg("focal", focal_alpha=[0.5, 1, 1]), "multiclass")(Z, Y)) == pytest.approx(0.049541, abs=1e-5)
    # gamma 0, no alpha == CE
    assert float(Loss(cfg("focal", focal_gamma=0.0), "multiclass")(Z, Y)) == pytest.approx(0.551445, abs=1e-6)


def test_soft_f1_and_compound():
    q = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    z = torch.log(q)  # softmax(log q) = q
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # class 0: tp .8 fp .4 fn .2 -> 1.6/2.2 = .727273; class 1: tp .6 fp .2 fn .4 -> 1.2/1.8 = .666667
    expect = 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2  # 0.303030
    assert float(Loss(cfg("soft_f1"), "multiclass")(z, y)) == pytest.approx(expect, abs=1e-5)
    focal = ((1 - 0.8) ** 2 * -math.log(0.8) + (1 - 0.6) ** 2 * -math.log(0.6)) / 2
    got = float(Loss(cfg("focal_soft_f1", soft_f1_weight=0.5), "multiclass")(z, y))
    assert got == pytest.approx(focal + 0.5 * expect, abs=1e-5)


def test_asl_and_bce():
    z, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # positive: -log .5 = .693147; negative: m = .5 - .05 = .45, .45^4 * -log(.55) = .041006 * .597837 = .024515
    assert float(Loss(cfg("asl"), "multilabel")(z, y)) == pytest.approx(0.693147 + 0.024515, abs=1e-5)
    # BCE z = 1, y = 1 smoothed by .2 -> .9: -(.9 log .731059 + .1 log .268941) = .413262
    got = float(Loss(cfg("bce", smoothing=0.2), "multilabel")(torch.tensor([[1.0]]), torch.tensor([[1.0]])))
    assert got == pytest.approx(0.413262, abs=1e-5)


def test_loss_errors():
    with pytest.raises(PipelineError, match="unknown"):
        Loss(cfg("hinge"), "multiclass")
    with pytest.raises(PipelineError, match="multilabel"):
        Loss(cfg("ce"), "multilabel")
    with pytest.raises(PipelineError, match="binary task"):  # one logit: softmax would be constant 1
        Loss(cfg("wce"), "binary")
    with pytest.raises(PipelineError, match="focal_alpha"):
        Loss(cfg("focal", focal_alpha="x"), "multiclass")
