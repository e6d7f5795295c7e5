"""The one inference path (validation, OOF, test, fold-model features) and fold-model loading.

A finished fold model (weights final: the OOF and test passes, not a validation during training)
runs in the engine `features.runtime` picks for frozen forward passes (`finished_forward`): on CPU
by default its ONNX Runtime twin (`lib.vision.onnx_trunk`), exported with every input the model
reads, cached as `fold{k}/model-<key>.onnx`, checked against PyTorch on the first batch."""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core.artifacts import (
    CHECKPOINT_VERSION,
    FOLD_MODEL,
    FOLD_ONNX,
    FOLD_TEST_LOGITS,
    FOLD_TEST_ROWS,
    OOF,
    TEST_BY_FOLD,
    features_file,
    fold_dir,
)
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import ID, assert_same_ids, read_json, write_json, write_parquet
from lib.core.progress import progress
from lib.core.runtime import cpu_count
from lib.core.scoring import dice_per_class
from lib.data.dataset import model_inputs, table_fingerprint
from lib.training import distributed as D
from lib.training.data import (
    LesionDataset,
    Tabular,
    make_loader,
    model_modalities,
    resolve_workers,
    to_device,
)
from lib.training.optim import amp_setup, autocast
from lib.vision.tta import parse_views
from lib.vision.models import build_model
from lib.vision.onnx_trunk import onnx_forward, onnx_path, resolve_runtime
from lib.vision.transforms import full_spec
from lib.vision.tta import apply_view

log = logging.getLogger(__name__)

MODEL_INPUTS = ("meta", "monet", "monet_mask", "keep")   # + img_<modality>: what lib.vision.models reads


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    return (torch.softmax(z, 1) if task == "multiclass" else torch.sigmoid(z)).numpy()


def f1_scores(y: np.ndarray, logits: np.ndarray, task: str) -> tuple[float, np.ndarray]:
    """(macro F1, per-class F1) of argmax decisions (multiclass) or sigmoid > 0.5 (multilabel, binary)."""
    logits = np.asarray(logits)
    if task != "multiclass":
        hot = probabilities(logits, task) > 0.5
    else:
        hot = np.eye(logits.shape[1], dtype=bool)[logits.argmax(1)]
    per = dice_per_class(y, hot)  # the official rule (lib.core.scoring)
    return float(per.mean()), per


@torch.no_grad()
def infer(fn, model: nn.Module, ds: LesionDataset, views: list[str], device: str, batch_size: int,
          workers: int, amp_dtype: torch.dtype | None, channels_last: bool, d: D.Dist,
          desc: str = "predict") -> np.ndarray:
    """`fn(batch)` averaged over TTA views for every row of `ds` ([N, F], rows in `ds` order).
    Rows are sharded over ranks and gathered. The single path for validation, OOF, test, features."""
    model.eval()
    pos = D.shard(len(ds), d)
    dl = make_loader(torch.utils.data.Subset(ds, pos.tolist()), workers, 0, batch_size=batch_size, shuffle=False,
                 pin_memory=device.startswith("cuda"))
    outs: list[np.ndarray] = []
    t0, n = time.time(), 0
    with progress(len(pos), desc, unit="lesion", disable=not d.main) as bar:
        for batch in dl:
            b = to_device(batch, device, channels_last)
            acc = None
            for v in views:
                bv = {k: (apply_view(t, v).contiguous(memory_format=torch.channels_last)
                          if channels_last else apply_view(t, v)) if k.startswith("img_") else t
                      for k, t in b.items()}
                with autocast(device, amp_dtype):
                    o = fn(bv).float()
                acc = o if acc is None else acc + o
            outs.append((acc / len(views)).cpu().numpy())
            n += len(batch["idx"])
            bar.update(len(batch["idx"]))
            bar.set_postfix(img_s=f"{n * len(views) * len(ds.modalities) / max(time.time() - t0, 1e-9):.1f}")
    rows = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    _, rows = D.gather_rows(d, pos, rows)
    return rows.astype(np.float32)


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, bytes): the weights' identity, the same for
    the model in memory at the end of training and the one loaded from its model.pt."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a batch the model reads (images, metadata, MONET, keep), without empty ones
    (a model without metadata gets `meta [B, 0]` and never reads it); labels and row ids dropped."""
    return {k: t for k, t in batch.items()
            if (k.startswith("img_") or k in MODEL_INPUTS) and t.numel() and t.shape[-1] != 0}


class FinishedModel:
    """`fn(batch) -> logits` of a finished fold model for `infer`: on the first batch, its ONNX
    Runtime twin is loaded from (or exported to) `folder/model-<key>.onnx` and checked against
    PyTorch on that batch (`onnx_forward`); the model itself when that fails (one warning line).
    The key: weights sha256, model config, preprocessing spec, input shapes (+ opset, versions).
    One instance per set of weights (the key is taken once)."""

    def __init__(self, model: nn.Module, folder: Path, threads: int, spec: dict) -> None:
        self.model, self.folder, self.threads, self.spec = model, Path(folder), threads, spec
        self.fwd: Callable | None = None
        self.runtime = "torch"

    def key_spec(self, inputs: dict[str, torch.Tensor]) -> dict:
        return {"kind": "fold model", "class": type(self.model).__name__,
                "model_cfg": getattr(self.model, "mcfg", None), "weights_sha256": weights_sha256(self.model),
                "spec": self.spec, "inputs": {k: list(t.shape[1:]) for k, t in inputs.items()}}

    def _resolve(self, batch: dict[str, torch.Tensor]) -> Callable:
        inputs = model_inputs(batch)
        key_spec = self.key_spec(inputs)
        keep = onnx_path(self.folder, FOLD_ONNX, key_spec)
        for old in self.folder.glob(f"{FOLD_ONNX}-*.onnx"):   # other weights' exports (a retrained fold)
            if old != keep:
                old.unlink(missing_ok=True)
        twin = onnx_forward(self.model, FOLD_ONNX, key_spec, self.folder, inputs, self.threads)
        self.runtime = "torch" if twin is None else "onnxruntime"
        return self.model if twin is None else twin

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fwd is None:
            self.fwd = self._resolve(batch)
        return self.fwd(batch)


def finished_forward(model: nn.Module, cfg: dict, folder: Path, d: D.Dist, amp_dtype: torch.dtype | None,
                     workers: int, spec: dict) -> Callable:
    """The forward of a finished fold model for `infer` (OOF / test passes): a `FinishedModel`
    (ONNX Runtime, exported / cached under `folder`) when `features.runtime` resolves to
    onnxruntime on this device, in one process (under torchrun each rank keeps PyTorch) and in
    float32 (an autocast `train.amp` keeps PyTorch); else the model itself. ONNX Runtime gets
    `threads`, or the cores left by the `workers` decoding processes."""
    if d.enabled:   # under torchrun each rank keeps PyTorch: never load onnxruntime there
        log.info("finished-model passes run in PyTorch (torchrun: one per rank)")
        return model
    runtime = resolve_runtime(cfg["features"]["runtime"], d.device)
    if runtime != "onnxruntime":
        return model
    if amp_dtype is not None:
        log.info("finished-model passes run in PyTorch (autocast %s)", amp_dtype)
        return model
    threads = int(cfg["threads"]) or max(1, cpu_count() - int(workers))
    return FinishedModel(model, folder, threads, spec)


def prediction_table(ids, values: np.ndarray, cols: list[str]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({ID: np.asarray(ids).astype(str)}),
                      pd.DataFrame(np.asarray(values, np.float64), columns=cols)], axis=1)


def fold_prediction_table(ids, per_fold: dict[int, np.ndarray], cols: list[str]) -> pd.DataFrame:
    """Test features of each fold model, stacked fold by fold: lesion_id, `fold_model`, `cols` (the
    stacker of fold k reads fold k's rows: `lib.stages.stack.test_by_fold`)."""
    parts = []
    for k, values in per_fold.items():
        t = prediction_table(ids, values, cols)
        t.insert(1, FOLD_MODEL, int(k))
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def rows_key_of_test(cfg: dict, info: dict, test: pd.DataFrame | None) -> str | None:
    """The key of a fold model's test logits: the test rows' ids, image contents (every modality) and
    the other inputs a model reads (`meta_*`, `monet_*`); None without test rows."""
    return None if test is None or len(test) == 0 else table_fingerprint(cfg, info, test, model_inputs(test))


def write_fold_test_logits(folder: Path, ids, logits: np.ndarray, classes: list[str], rows: str) -> None:
    """`fold{k}/test_logits.parquet` + its sidecar naming the test rows they are for (`rows`): the
    sidecar is removed first and written last, so it never vouches for logits of other rows."""
    folder = Path(folder)
    (folder / FOLD_TEST_ROWS).unlink(missing_ok=True)
    write_parquet(prediction_table(ids, logits, classes), folder / FOLD_TEST_LOGITS)
    write_json({"rows": rows, "n": int(len(logits))}, folder / FOLD_TEST_ROWS)


def fold_test_current(folder: Path, rows: str | None) -> bool:
    """Whether `folder` (a fold{k}/) holds test logits of exactly the test rows `rows` (a fingerprint)."""
    folder = Path(folder)
    side = folder / FOLD_TEST_ROWS
    return (rows is not None and (folder / FOLD_TEST_LOGITS).exists() and side.exists()
            and read_json(side).get("rows") == rows)


def read_fold_model_file(path: Path, allow_unversioned: bool = True) -> dict:
    """A fold's model.pt as saved (weights_only); refused when missing or of another format version (one
    without a version, written before versions existed, only when `allow_unversioned`)."""
    if not path.exists():
        raise PipelineError(f"{path} not found: train that experiment with 02_train_fold.py first")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    version = obj.get("format_version")
    if (version is not None or not allow_unversioned) and version != CHECKPOINT_VERSION:
        raise MissingArtifactError(f"{path} has model format version {version} (this code reads "
                                   f"{CHECKPOINT_VERSION}): retrain that experiment with 02_train_fold.py")
    return obj


def _built_model(meta: dict, state: dict, device: str) -> nn.Module:
    """The eval model a fold model's saved `model_cfg` / `model_args` describe, with weights `state`."""
    model = build_model(meta["model_cfg"], weights=None, **meta["model_args"])
    model.load_state_dict(state)
    return model.to(device).eval()


def load_fold_model(path: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A fold's model.pt -> (eval model, its saved dict with `spec` completed by `saved_spec`)."""
    obj = read_fold_model_file(path)
    return _built_model(obj, obj["state_dict"], device), {**obj, "spec": saved_spec(obj)}


def saved_spec(obj: dict) -> dict:
    """The full preprocessing spec a fold model was trained with (`model.pt`'s `spec`); an older
    model.pt that saved only size/mean/std gets the default short-side + center-crop view."""
    return full_spec(obj["spec"])


def fold_logit_features(cfg: dict, exp: str, info: dict, train: pd.DataFrame, test: pd.DataFrame | None,
                        out_dir: str | Path) -> dict[str, Path]:
    """Class logits of experiment `exp`'s fold models as stacker features (`features.from_exps`).

    Only outputs that mean the same thing in every fold model are used: logit column c is class c
    in each of them. (Penultimate features are not: each fold model's neck is its own random basis,
    so a stacker would see train rows in four bases and test rows in the mean of five.) A train
    lesion's logits come from the model of its own fold, which never trained on it (the fold's
    TTA-averaged OOF logits, `fold{k}/oof.parquet`); test logits are the mean over the fold models
    (`fold{k}/test_logits.parquet`, refused unless made for exactly these test rows: `rows_key_of_test`).
    Writes `<out_dir>/<exp>_{train,test}.parquet` (lesion_id +
    `logit_<exp>_<class>`) and a json sidecar each."""
    out_dir, classes = Path(out_dir), list(info["classes"])
    folds = sorted(int(f) for f in train["fold"].unique())
    cols = [f"logit_{exp}_{c}" for c in classes]
    parts, tests = [], []
    rows = rows_key_of_test(cfg, info, test)
    for k in folds:
        oof, te = _fold_logits(cfg, exp, k, train[train["fold"] == k], test, classes, rows)
        parts.append(oof)
        if te is not None:
            tests.append(te[classes].to_numpy(np.float64))
    oof = pd.concat(parts, ignore_index=True).set_index(ID).loc[train[ID].to_numpy()].reset_index()
    meta = {"exp": exp, "kind": "fold-model class logits", "folds": folds, "dim": len(cols)}
    paths = {"train": out_dir / features_file(exp, "train")}
    write_parquet(prediction_table(train[ID], oof[classes].to_numpy(), cols), paths["train"])
    write_json({**meta, "split": "train", "n": len(train), "source": "OOF logits of each row's own fold model"},
               out_dir / features_file(exp, "train", "json"))
    if tests:
        paths["test"] = out_dir / features_file(exp, "test")
        mean, by_fold = fold_logit_test_tables(exp, classes, test[ID], dict(zip(folds, tests)))
        write_parquet(mean, paths["test"])
        write_json({**meta, "split": "test", "n": len(test), "source": "mean of the fold models' test logits"},
                   out_dir / features_file(exp, "test", "json"))
        paths[TEST_BY_FOLD] = out_dir / features_file(exp, TEST_BY_FOLD)
        write_parquet(by_fold, paths[TEST_BY_FOLD])
        write_json({**meta, "split": TEST_BY_FOLD, "n": len(test), "source": "each fold model's test logits"},
                   out_dir / features_file(exp, TEST_BY_FOLD, "json"))
    log.info("%s: fold-model logits (%d classes) for %d train%s lesions", exp, len(cols), len(train),
             "" if not tests else f" + {len(test)} test")
    return paths


def _fold_logits(cfg: dict, exp: str, k: int, rows: pd.DataFrame, test: pd.DataFrame | None,
                 classes: list[str], test_rows: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Fold k's OOF logits (exactly this data's fold-k rows: the model never trained on them) and test logits."""
    folder = fold_dir(cfg, k, exp)
    if not (folder / OOF).exists():
        raise MissingArtifactError(f"{folder / OOF} not found: train {exp} with 02_train_fold.py first")
    oof = pd.read_parquet(folder / OOF)
    missing = [c for c in classes if c not in oof.columns]
    if missing:
        raise PipelineError(f"{folder / OOF} lacks class columns {missing}: {exp} was trained on other classes")
    if set(oof[ID].astype(str)) != set(rows[ID].astype(str)):  # the fold model must not have trained on these rows
        raise MissingArtifactError(f"{exp} fold {k} was validated on other lesions than this data's fold {k} "
                                   "(different prep/folds): its outputs would leak; retrain it on these folds")
    te = None
    if test is not None and len(test):
        if not fold_test_current(folder, test_rows):
            raise MissingArtifactError(f"{folder / FOLD_TEST_LOGITS}: not made for this prep folder's test rows (another "
                                       f"test release, or missing): rerun 02_train_fold.py for {exp} (finished folds "
                                       "only recompute their test logits)")
        te = pd.read_parquet(folder / FOLD_TEST_LOGITS)
        assert_same_ids(te, test, f"{exp} fold {k} test logits vs test", ordered=True)
    return oof, te


# ----------------------------------------------------------------------------- fold models out of a bundle


def fold_model_state(path: Path) -> tuple[dict, dict]:
    """A fold's model.pt (weights_only) -> (its state dict, the rest: JSON-able) for a bundle."""
    obj = read_fold_model_file(path, allow_unversioned=False)
    state = {k: v.detach().cpu().contiguous() for k, v in obj["state_dict"].items()}
    return state, {k: v for k, v in obj.items() if k != "state_dict"}


def load_bundled_fold_model(weights: Path, meta: dict, device: str = "cpu") -> nn.Module:
    """A fold model from a bundle: safetensors weights + model.json (what `fold_model_state` split off)."""
    from safetensors.torch import load_file

    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise MissingArtifactError(f"{weights}: model format version {meta.get('format_version')} (this code reads "
                                   f"{CHECKPOINT_VERSION}): export the bundle again")
    return _built_model(meta, load_file(str(weights)), device)


def fold_test_pass(cfg: dict, info: dict, test: pd.DataFrame, model: nn.Module, meta: dict, folder: Path,
                   d: D.Dist, desc: str) -> np.ndarray:
    """TTA-averaged logits of a finished fold model (weights + `meta`, as model.pt holds them) for every
    test row, through the fold's inference setup: its preprocessing spec and tabular state, the
    experiment's `train.tta` views, batch size, AMP and channels_last, in `features.runtime`'s engine
    (ONNX Runtime exported under `folder`). The predict path of a bundle; 02 runs the same `infer`."""
    tcfg = cfg["train"]
    spec = saved_spec(meta)
    ds = LesionDataset(test, folder=Path(cfg["paths"]["prep"]), modalities=model_modalities(info, meta["model_cfg"]),
                       classes=list(info["classes"]), tab=Tabular.from_state(meta["tabular"]), spec=spec)
    amp_dtype, _ = amp_setup(tcfg["amp"], d.device)
    workers = resolve_workers(int(tcfg["workers"]))
    cl = bool(tcfg["channels_last"])
    if cl:
        model = model.to(memory_format=torch.channels_last)
    fn = finished_forward(model, cfg, folder, d, amp_dtype, workers, ds.spec)
    return infer(fn, model, ds, parse_views(tcfg["tta"]), d.device, int(tcfg["batch_size"]), workers, amp_dtype,
                 cl, d, desc=desc)


def fold_logit_test_tables(exp: str, classes: list[str], ids, per_fold: dict[int, np.ndarray]
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`features.from_exps` test features of experiment `exp`: (the mean over its fold models' test
    logits, each fold model's own: `fold_model` column)."""
    cols = [f"logit_{exp}_{c}" for c in classes]
    mean = prediction_table(ids, np.mean(list(per_fold.values()), 0), cols)
    return mean, fold_prediction_table(ids, per_fold, cols)

