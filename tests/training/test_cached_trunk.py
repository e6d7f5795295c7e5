"""Cached-trunk fine-tuning: fold k's model never trains on fold k's rows (a planted leak shows it
would), it learns what is learnable, and it is deterministic."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.core.errors import PipelineError
from lib.training import cached_trunk as CT
from lib.training.cached_trunk import FineTune, cross_fit, fit_fold, predict

POOL = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _noise(n: int = 60, c: int = 96, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Unique random activations per row and random labels: nothing generalizes, everything memorizes."""
    rng = np.random.default_rng(seed)
    acts = [rng.normal(size=(n, 1, c, 2, 2)).astype(np.float16)]
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    folds = np.arange(n) % 5
    return acts, y, folds


FT = FineTune(epochs=150, batch_size=16, lr=0.05, tail_lr=0.0, weight_decay=0.0, dropout=0.0,
              class_weight_power=0.0, seed=0)


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y.argmax(1)).mean())


def test_planted_leak_oof_is_chance_while_a_leaky_fit_memorizes() -> None:
    acts, y, folds = _noise()
    oof, _, _ = cross_fit(torch.nn.Identity(), POOL, 96, acts, y, folds, None, FT, "cpu")
    # The control: a model that trained on the same rows it predicts scores ~1.0 on them...
    leaky = fit_fold(torch.nn.Identity(), POOL, 96, acts, y, np.arange(len(y)), FT, "cpu", "leaky")
    assert _acc(predict(leaky, acts, np.flatnonzero(folds == 0), "cpu"), y[folds == 0]) > 0.95
    # ...so OOF near chance means no fold model saw its own fold's rows.
    assert _acc(oof, y) < 0.75


def test_fold_k_training_reads_no_fold_k_row(monkeypatch) -> None:
    acts, y, folds = _noise(30)
    seen: dict[int, set] = {}
    current = {"k": None}

    class Spy:
        def __init__(self, a: np.ndarray) -> None:
            self.a, self.shape = a, a.shape

        def __len__(self) -> int:
            return len(self.a)

        def __getitem__(self, key):
            if current["k"] is not None:
                seen.setdefault(current["k"], set()).update(np.atleast_1d(key[0]).tolist())
            return self.a[key]

    real_fit = CT.fit_fold

    def fit(tail, pool, nf, a, yy, rows, ft, device, desc):
        current["k"] = int(desc.rsplit(" ", 1)[-1])
        try:
            return real_fit(tail, pool, nf, a, yy, rows, ft, device, desc)
        finally:
            current["k"] = None
    monkeypatch.setattr(CT, "fit_fold", fit)
    cross_fit(torch.nn.BatchNorm2d(96), POOL, 96, [Spy(acts[0])], y, folds, None,
              FineTune(epochs=2, batch_size=8), "cpu")
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for k, rows in seen.items():
        assert rows and not rows & set(np.flatnonzero(folds == k).tolist())
        assert rows == set(np.flatnonzero(folds != k).tolist())


def test_learns_a_planted_signal_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    n = 80
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    a = rng.normal(size=(n, 2, 8, 2, 2)).astype(np.float32)
    a[:, :, :3] += 3 * y[:, None, :, None, None]      # class signal in the first 3 channels, both views
    acts, test = [a.astype(np.float16)], [a[:10].astype(np.float16)]
    ft = FineTune(epochs=20, batch_size=16, lr=0.05, seed=3)
    oof, te, info = cross_fit(torch.nn.BatchNorm2d(8), POOL, 8, acts, y, np.arange(n) % 4, test, ft, "cpu")
    assert _acc(oof, y) > 0.9 and te.shape == (10, 3) and len(info["fold_seconds"]) == 4
    oof2, te2, _ = cross_fit(torch.nn.BatchNorm2d(8), POOL, 8, acts, y, np.arange(n) % 4, test, ft, "cpu")
    assert np.array_equal(oof, oof2) and np.array_equal(te, te2)


def test_finetune_key_holds_trunk_settings_folds_train_rows_and_format(monkeypatch) -> None:
    base = CT.finetune_key_parts("trunkkey", FT, "folds1", ["A", "B"], "rows1")
    assert base == CT.finetune_key_parts("trunkkey", FT, "folds1", ["A", "B"], "rows1")
    for other in (CT.finetune_key_parts("other", FT, "folds1", ["A", "B"], "rows1"),
                  CT.finetune_key_parts("trunkkey", FineTune(epochs=3), "folds1", ["A", "B"], "rows1"),
                  CT.finetune_key_parts("trunkkey", FT, "folds2", ["A", "B"], "rows1"),
                  CT.finetune_key_parts("trunkkey", FT, "folds1", ["A", "B"], "rows2")):
        assert other != base
    monkeypatch.setattr(CT, "FINETUNE_FORMAT_VERSION", CT.FINETUNE_FORMAT_VERSION + 1)
    assert CT.finetune_key_parts("trunkkey", FT, "folds1", ["A", "B"], "rows1") != base


def test_kept_fold_models_score_new_test_rows_like_the_fitted_ones(tmp_path) -> None:
    """Each fold model kept as safetensors (no pickle) and loaded back gives the test logits the
    fitted models gave, bit for bit; a damaged file is refused in one line naming it."""
    rng = np.random.default_rng(2)
    n = 40
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    acts = [rng.normal(size=(n, 2, 8, 2, 2)).astype(np.float16)]
    test = [rng.normal(size=(7, 2, 8, 2, 2)).astype(np.float16)]
    ft = FineTune(epochs=3, batch_size=8, lr=0.05, dropout=0.1, seed=1)
    tail = torch.nn.BatchNorm2d(8)
    kept = {}

    def keep(k, model):
        CT.save_tail_head(model, tmp_path / f"fold{k}.safetensors")
        kept[k] = model
    _, te, _ = cross_fit(tail, POOL, 8, acts, y, np.arange(n) % 4, test, ft, "cpu", on_fold=keep)
    assert sorted(kept) == [0, 1, 2, 3]
    loaded = [CT.load_tail_head(tmp_path / f"fold{k}.safetensors", tail, POOL, 8, 1, 3, ft.dropout, "cpu")
              for k in range(4)]
    assert np.array_equal(CT.mean_test_logits(loaded, test, "cpu"), te)
    assert np.array_equal(CT.mean_test_logits(list(kept.values()), test, "cpu"), te)
    assert not torch.equal(loaded[0].tail.running_mean, tail.running_mean)   # the fitted tail, not the original
    (tmp_path / "fold1.safetensors").write_bytes((tmp_path / "fold1.safetensors").read_bytes()[:100])
    with pytest.raises(PipelineError, match=r"fold1.safetensors: not a readable fine-tuned fold model") as e:
        CT.load_tail_head(tmp_path / "fold1.safetensors", tail, POOL, 8, 1, 3, ft.dropout, "cpu")
    assert "\n" not in str(e.value)
