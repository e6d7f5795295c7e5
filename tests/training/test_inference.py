"""lib.training.inference: a finished fold model's OOF / test passes in ONNX Runtime (`finished_forward`,
`FinishedModel`): export with every input the model reads (single and fusion models), agreement with
PyTorch on another batch size, the cache (reused, a corrupt file rebuilt, another weights' file
replaced), the fallback when the export fails, when to stay on PyTorch, and the OOF / test tables of a
trained fold equal within 1e-5 to the PyTorch path."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from lib.config.schema import TRAIN_DEFAULTS
from lib.stages import train as train_stage
from lib.training import distributed as D
from lib.training import inference as TI
from lib.training.data import LesionDataset, Tabular
from lib.vision import onnx_trunk as O
from lib.vision.models import build_model
from tests.training.helpers import data, tiny

MODS = ["dermoscopic", "clinical"]
SPEC = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
KINDS = {  # name -> model config overrides, with / without the metadata + MONET branch
    "single_no_tab": {"kind": "single", "use_meta": False, "use_monet": False},
    "concat_shared": {"kind": "fusion", "fusion": "concat", "shared_encoder": True},
    "xattn_separate": {"kind": "fusion", "fusion": "xattn", "shared_encoder": False},
}


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    mcfg = {**TRAIN_DEFAULTS["model"], "arch": "test_efficientnet", "weights": None, "hidden": 16, "msd": 2,
            "xattn_dim": 16, "xattn_heads": 2, "xattn_queries": 2, "drop_path": 0.0, **KINDS[kind]}
    torch.manual_seed(seed)
    return build_model(mcfg, 3, 3, 4, MODS, 64, weights=None)   # in train mode, as build_model leaves it


def _batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(n, 2)
    keep[0, 1] = 0.0                                   # a dropped clinical branch reads differently
    mask = (torch.rand(n, 4, generator=g) > 0.3).float()
    b = {f"img_{m}": torch.randn(n, 3, 64, 64, generator=g) for m in MODS}
    b.update(meta=torch.randn(n, 3, generator=g), monet=torch.rand(n, 4, generator=g), monet_mask=mask,
             keep=keep, y=torch.zeros(n, 3), idx=torch.arange(n))
    return b


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_with_every_input_agrees_with_torch(tmp_path, kind, caplog) -> None:
    model = _model(kind)
    assert model.training                              # exported (and checked) as the eval forward all the same
    fm = TI.FinishedModel(model, tmp_path, 1, SPEC)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        first = fm(_batch(4))
        ref = model.eval()(_batch(4))
    assert not _warnings(caplog) and fm.runtime == "onnxruntime" and isinstance(fm.fwd, O.OnnxForward)
    np.testing.assert_allclose(first.numpy(), ref.numpy(), atol=1e-5)
    files = list(tmp_path.glob("model-*.onnx"))
    assert len(files) == 1 and files == [O.onnx_path(tmp_path, "model", fm.key_spec(TI.model_inputs(_batch(1))))]
    names = {i.name for i in fm.fwd.session.get_inputs()}
    # the graph's inputs: what the model reads (the exporter drops an input the forward never uses)
    assert names == ({"img_dermoscopic"} if kind == "single_no_tab" else
                     {"img_dermoscopic", "img_clinical", "meta", "monet", "monet_mask", "keep"})
    b = _batch(3, seed=5)                               # another batch size (a last batch), channels_last
    b = {k: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t for k, t in b.items()}
    with torch.no_grad():
        np.testing.assert_allclose(fm(b).numpy(), model(b).numpy(), atol=1e-5)


def test_the_cached_file_is_reused_a_corrupt_one_rebuilt_another_weights_one_replaced(tmp_path, caplog) -> None:
    model = _model("concat_shared")
    TI.FinishedModel(model, tmp_path, 1, SPEC)(_batch(2))
    path = next(tmp_path.glob("model-*.onnx"))
    data_, mtime = path.read_bytes(), path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        fm = TI.FinishedModel(model, tmp_path, 1, SPEC)
        fm(_batch(2))
    assert fm.runtime == "onnxruntime" and "from the cached" in caplog.text and path.stat().st_mtime_ns == mtime
    caplog.clear()
    path.write_bytes(data_[: len(data_) // 2])
    with caplog.at_level(logging.WARNING), torch.no_grad():
        fm = TI.FinishedModel(model, tmp_path, 1, SPEC)
        np.testing.assert_allclose(fm(_batch(2)).numpy(), model(_batch(2)).numpy(), atol=1e-5)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "rebuilding" in msgs[0] and "\n" not in msgs[0]
    assert fm.runtime == "onnxruntime" and list(tmp_path.iterdir()) == [path] and path.read_bytes() == data_
    with torch.no_grad():                                # the fold retrained: new weights, new key
        model.head.fc.bias.add_(1.0)
    TI.FinishedModel(model, tmp_path, 1, SPEC)(_batch(2))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0] != path        # the old weights' export is gone


def test_an_export_failure_falls_back_to_torch_in_one_line(tmp_path, caplog, monkeypatch) -> None:
    def broken(module, example, path):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nsecond line")
    monkeypatch.setattr(O, "export_onnx", broken)
    model = _model("concat_shared")
    fm = TI.FinishedModel(model, tmp_path, 1, SPEC)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = fm(_batch(3))
        again = fm(_batch(3))                            # decided once, on the first batch
        ref = model(_batch(3))
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "does not export to ONNX" in msgs[0] and "foo" in msgs[0] and "\n" not in msgs[0]
    assert fm.runtime == "torch" and fm.fwd is model and list(tmp_path.iterdir()) == []
    assert torch.equal(got, ref) and torch.equal(again, ref)


def test_weights_key_is_the_same_in_memory_and_after_a_copy_and_changes_with_any_weight() -> None:
    a, b = _model("single_no_tab"), _model("single_no_tab")
    assert TI.weights_sha256(a) == TI.weights_sha256(b)
    with torch.no_grad():
        b.encoders["image"].bn1.running_var[0] += 1e-6   # a buffer counts too
    assert TI.weights_sha256(a) != TI.weights_sha256(b)
    k = TI.FinishedModel(a, ".", 1, SPEC).key_spec(TI.model_inputs(_batch(1)))
    assert O.onnx_key(k) != O.onnx_key({**k, "spec": {**SPEC, "size": 96}})
    assert O.onnx_key(k) != O.onnx_key(TI.FinishedModel(_model("concat_shared"), ".", 1, SPEC)
                                       .key_spec(TI.model_inputs(_batch(1))))


def test_when_the_finished_pass_stays_on_torch() -> None:
    model, cfg = _model("single_no_tab"), {"features": {"runtime": "auto"}, "threads": 0}
    fm = TI.finished_forward(model, cfg, ".", D.Dist(), None, 0, SPEC)
    assert isinstance(fm, TI.FinishedModel) and fm.threads >= 1
    assert TI.finished_forward(model, {**cfg, "threads": 3}, ".", D.Dist(), None, 0, SPEC).threads == 3
    assert TI.finished_forward(model, {**cfg, "features": {"runtime": "torch"}}, ".", D.Dist(), None, 0, SPEC) is model
    assert TI.finished_forward(model, cfg, ".", D.Dist(world=2), None, 0, SPEC) is model        # torchrun
    assert TI.finished_forward(model, cfg, ".", D.Dist(), torch.bfloat16, 0, SPEC) is model     # autocast
    assert TI.finished_forward(model, cfg, ".", D.Dist(device="cuda"), None, 0, SPEC) is model  # auto on CUDA


def test_torchrun_ranks_never_load_onnxruntime(monkeypatch) -> None:
    """Under torchrun the ranks keep PyTorch and must not even import onnxruntime (an unused ONNX Runtime
    in a gloo rank aborted at exit under load): with the import made to fail, nothing raises."""
    import builtins
    real = builtins.__import__

    def no_ort(name, *a, **kw):
        if name == "onnxruntime":
            raise ImportError("planted: onnxruntime must not be imported here")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    model = _model("single_no_tab")
    cfg = {"features": {"runtime": "onnxruntime"}, "threads": 0}
    assert TI.finished_forward(model, cfg, ".", D.Dist(world=2), None, 0, SPEC) is model


def test_oof_and_test_tables_equal_the_torch_path(prep, tmp_path, caplog) -> None:
    """The sample recipe's model kind (concat fusion, shared encoder, metadata + MONET), two epochs
    validated each: the first validation stays on PyTorch (weights still change), the last one is the
    finished model's OOF pass (exported), the test pass reuses the export."""
    extra = ("train.model.fusion=concat", "train.epochs=2", "train.val_every=1", "train.tta=[id,hflip]")
    train_stage.run(tiny(prep, tmp_path, "t_torch", *extra, "features.runtime=torch"), fold=1)
    with caplog.at_level(logging.INFO, logger="lib.vision.onnx_trunk"):
        train_stage.run(tiny(prep, tmp_path, "t_ort", *extra, "features.runtime=onnxruntime"), fold=1)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("exported to ONNX" in m for m in msgs) == 1 and sum("from the cached" in m for m in msgs) == 1
    assert not _warnings(caplog)
    ft, fo = tmp_path / "t_torch/fold1", tmp_path / "t_ort/fold1"
    assert not list(ft.glob("*.onnx")) and len(list(fo.glob("model-*.onnx"))) == 1
    for f in ("oof.parquet", "test_logits.parquet"):
        a, b = pd.read_parquet(ft / f), pd.read_parquet(fo / f)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)
    # the saved model.pt keys to the same export: a later pass over the loaded model reuses it
    model, obj = TI.load_fold_model(fo / "model.pt")
    cfg = tiny(prep, tmp_path, "t_ort", "features.runtime=onnxruntime")
    info, _, test = data(cfg)
    ds = LesionDataset(test, prep / "prep" / "milk10k_sample", MODS, info["classes"],
                       Tabular.from_state(obj["tabular"]), spec=obj["spec"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lib.vision.onnx_trunk"):
        fn = TI.finished_forward(model, cfg, fo, D.Dist(), None, 0, ds.spec)
        z = TI.infer(fn, model, ds, ["id", "hflip"], "cpu", 16, 0, None, False, D.Dist())
    assert fn.runtime == "onnxruntime" and "from the cached" in caplog.text and "exported" not in caplog.text
    np.testing.assert_allclose(z, pd.read_parquet(ft / "test_logits.parquet")[info["classes"]].to_numpy(), atol=1e-5)
