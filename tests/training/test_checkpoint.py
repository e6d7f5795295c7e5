"""lib.training.checkpoint: versioned, fingerprinted checkpoints; refusals are one line and say what to do."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lib.core.artifacts import config_fingerprint
from lib.core.errors import MissingArtifactError
from lib.training import fold as T
from lib.training import loop as L
from lib.training.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpointer,
    rng_state,
    set_rng_state,
)
from tests.training.helpers import data, tiny


def refused(ck: Checkpointer, match: str) -> str:
    with pytest.raises(MissingArtifactError, match=match) as e:
        ck.load()
    msg = str(e.value)
    assert "\n" not in msg and str(ck.path) in msg
    return msg


def test_load_refuses_other_versions_configs_and_garbage(tmp_path):
    p = tmp_path / "checkpoint.pt"
    ck = Checkpointer(p, "abc")
    refused(ck, "not found: rerun without --resume")
    for version in (CHECKPOINT_VERSION + 1, 0):
        torch.save({"format_version": version, "fingerprint": "abc"}, p)
        msg = refused(ck, f"format version {version} ")
        assert "delete" in msg and "without --resume" in msg
    torch.save({"fingerprint": "abc", "model": {}}, p)  # written before format versions existed
    refused(ck, "format version None")
    torch.save({"format_version": CHECKPOINT_VERSION, "fingerprint": "xyz"}, p)
    assert "delete" in refused(ck, "another config .fingerprint xyz vs abc.")
    p.write_bytes(b"not a checkpoint")
    refused(ck, "cannot be read")
    torch.save({"format_version": CHECKPOINT_VERSION, "fingerprint": "abc", "epoch": 3}, p)
    assert ck.load()["epoch"] == 3
    ck.delete()
    assert not ck.exists()
    ck.delete()  # deleting twice is fine


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    st = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_save_restore_and_resume_refusal(prep, tmp_path):
    cfg = tiny(prep, tmp_path, "t_ck", "train.model.kind=single", "train.epochs=2", "train.ema=0.5")
    info, train, test = data(cfg)
    run = T.build_fold(cfg, info, train, test, 0)
    run.out.mkdir(parents=True)
    T.end_epoch(run, {**L.train_one_epoch(run, 0), "seconds": 0.0}, ck := Checkpointer.of(run))
    assert ck.path == run.out / "checkpoint.pt" and (run.out / "history.csv").exists()
    obj = torch.load(ck.path, weights_only=False)
    assert obj["format_version"] == CHECKPOINT_VERSION and obj["fingerprint"] == config_fingerprint(cfg, scope="fold")
    assert obj["epoch"] == 1 and obj["step"] == run.step

    other = T.build_fold(cfg, info, train, test, 0)
    ck.restore(other)
    assert (other.epoch, other.step, other.history, other.bad) == (1, run.step, run.history, 0)
    for a, b in ((run.model, other.model), (run.ema.module, other.ema.module)):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert other.sched.state_dict()["last_epoch"] == run.sched.state_dict()["last_epoch"]

    obj["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(obj, ck.path)
    with pytest.raises(MissingArtifactError, match="delete .* or rerun without --resume") as e:
        T.train_fold(cfg, info, train, test, 0, resume=True)
    assert "\n" not in str(e.value)
