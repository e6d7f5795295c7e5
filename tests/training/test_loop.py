"""lib.training.loop: one epoch's history row, validation metrics, when to validate, early stopping."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from lib.training import loop as L
from lib.training.fold import build_fold
from tests.training.helpers import data, tiny

ROW_KEYS = {"epoch", "train_loss", "lr", "images_per_s", "train_seconds"}


def test_train_one_epoch_row_and_validate(prep, tmp_path):
    cfg = tiny(prep, tmp_path, "t_loop", "train.model.kind=single")
    info, train, test = data(cfg)
    run = build_fold(cfg, info, train, test, 1)
    assert run.epoch == 0 and run.history == [] and not run.out.exists()  # build_fold writes nothing
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    row = L.train_one_epoch(run, 0)
    assert set(row) == ROW_KEYS and row["epoch"] == 1 and np.isfinite(row["train_loss"]) and row["lr"] == 0.0  # cosine end
    assert run.step == run.steps_per_epoch > 0
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    logits, m = L.validate(run)
    assert logits.shape == (len(run.va), len(info["classes"])) and np.isfinite(logits).all()
    assert set(m) == {"val_loss", "val_macro_f1", *(f"f1_{c}" for c in info["classes"])}
    assert np.isfinite(m["val_loss"]) and 0 <= m["val_macro_f1"] <= 1
    again, m2 = L.validate(run, logits)  # given logits: same metrics, no inference
    assert again is logits and m2 == m
    np.testing.assert_array_equal(L.predict(run, run.ds_va, "again"), logits)


def test_should_validate():
    def run(val_every: int, es: bool = False):
        return SimpleNamespace(tcfg={"val_every": val_every, "early_stopping": {"enabled": es}}, epochs=4)

    assert [L.should_validate(run(0), e) for e in range(4)] == [False, False, False, True]
    assert [L.should_validate(run(2), e) for e in range(4)] == [False, True, False, True]
    assert all(L.should_validate(run(0, es=True), e) for e in range(4))


def test_monitor_score():
    assert L.monitor_score({"val_macro_f1": 0.3}, "multiclass") == 0.3
    assert L.monitor_score({"val_macro_f1": 0.0, "val_auc": 0.8}, "binary") == 0.8
    assert L.monitor_score({"val_macro_f1": 0.0, "val_auc": float("nan")}, "binary") == -np.inf


def test_early_stopping_keeps_best_copy_and_counts_patience():
    model = nn.Linear(2, 1)
    run = SimpleNamespace(task="multiclass", best=None, bad=0, eval_model=model,
                          tcfg={"early_stopping": {"enabled": True, "patience": 2}})
    z = np.zeros((3, 1), np.float32)
    assert L.update_early_stopping(run, 0, z, {"val_macro_f1": 0.5}) is False
    w = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert L.update_early_stopping(run, 1, z + 1, {"val_macro_f1": 0.4}) is False and run.bad == 1
    assert L.update_early_stopping(run, 2, z + 2, {"val_macro_f1": 0.5}) is True and run.bad == 2  # ties do not reset
    assert run.best["epoch"] == 1 and run.best["f1"] == 0.5 and (run.best["val_logits"] == 0).all()
    torch.testing.assert_close(run.best["state"]["weight"], w)  # a copy, not the live weights
    assert L.update_early_stopping(run, 3, z, {"val_macro_f1": 0.6}) is False and run.bad == 0
    assert run.best["epoch"] == 4
