"""The one inference path (validation, OOF, test, fold-model features) and fold-model loading."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core.artifacts import fold_dir, prep_dir
from lib.core.errors import MissingArtifactError, PipelineError
from lib.core.io import ID, write_json, write_parquet
from lib.core.progress import progress
from lib.core.runtime import torch_device
from lib.training import distributed as D
from lib.training.checkpoint import CHECKPOINT_VERSION
from lib.training.data import (
    LesionDataset,
    Tabular,
    make_loader,
    model_modalities,
    to_device,
)
from lib.training.optim import autocast
from lib.vision.models import build_model
from lib.vision.transforms import full_spec
from lib.vision.tta import apply_view, parse_views

log = logging.getLogger(__name__)


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    return (torch.softmax(z, 1) if task == "multiclass" else torch.sigmoid(z)).numpy()


def dice_per_class(y: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """Per-class Dice (= F1) of 0/1 decisions; 1.0 for a class absent from truth and decisions."""
    t, p = np.asarray(y) > 0.5, np.asarray(hot) > 0.5
    den = t.sum(0) + p.sum(0)
    return np.where(den == 0, 1.0, 2.0 * (t & p).sum(0) / np.maximum(den, 1))


def f1_scores(y: np.ndarray, logits: np.ndarray, task: str) -> tuple[float, np.ndarray]:
    """(macro F1, per-class F1) of argmax decisions (multiclass) or sigmoid > 0.5 (multilabel, binary)."""
    logits = np.asarray(logits)
    if task != "multiclass":
        hot = probabilities(logits, task) > 0.5
    else:
        hot = np.eye(logits.shape[1], dtype=bool)[logits.argmax(1)]
    per = dice_per_class(y, hot)
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


def prediction_table(ids, values: np.ndarray, cols: list[str]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({ID: np.asarray(ids).astype(str)}),
                      pd.DataFrame(np.asarray(values, np.float64), columns=cols)], axis=1)


def load_fold_model(path: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A fold's model.pt -> (eval model, its saved dict with `spec` completed by `saved_spec`)."""
    if not path.exists():
        raise PipelineError(f"{path} not found: train that experiment with 02_train_fold.py first")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    version = obj.get("format_version")
    if version is not None and version != CHECKPOINT_VERSION:
        raise MissingArtifactError(f"{path} has model format version {version} (this code reads "
                                   f"{CHECKPOINT_VERSION}): retrain that experiment with 02_train_fold.py")
    model = build_model(obj["model_cfg"], weights=None, **obj["model_args"])
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval(), {**obj, "spec": saved_spec(obj)}


def saved_spec(obj: dict) -> dict:
    """The full preprocessing spec a fold model was trained with (`model.pt`'s `spec`); an older
    model.pt that saved only size/mean/std gets the default short-side + center-crop view."""
    return full_spec(obj["spec"])


def extract_fold_features(cfg: dict, exp: str, info: dict, train: pd.DataFrame, test: pd.DataFrame | None,
                          out_dir: str | Path) -> dict[str, Path]:
    """Penultimate (neck) features of experiment `exp`'s fold models: a train lesion's vector comes
    from the model of its own fold (which never trained on it), test vectors are averaged over the
    fold models. TTA views from `features.tta`. Writes `<out_dir>/<exp>_{train,test}.parquet`
    (lesion_id + emb_<exp>_<i>) and a json sidecar each."""
    out_dir = Path(out_dir)
    device = torch_device(cfg)
    views = parse_views(cfg["features"]["tta"])
    bs, workers = int(cfg["features"]["batch_size"]), max(0, int(cfg["features"]["workers"]))
    d = D.Dist(device=device)
    folds = sorted(int(f) for f in train["fold"].unique())
    feats: np.ndarray | None = None
    test_sum: np.ndarray | None = None
    meta: dict[str, Any] = {}
    t0 = time.time()
    for k in folds:
        path = fold_dir(cfg, k, exp) / "model.pt"
        model, obj = load_fold_model(path, device)
        mcfg, spec = obj["model_cfg"], obj["spec"]
        if obj["classes"] != list(info["classes"]):
            raise PipelineError(f"{path}: trained on classes {obj['classes']}, data has {info['classes']}")
        tab = Tabular.from_state(obj["tabular"])
        mods = model_modalities({"modalities": obj["model_args"]["modalities"]}, mcfg)
        common = dict(folder=prep_dir(cfg), modalities=mods, classes=list(info["classes"]), tab=tab,
                      spec=spec)
        rows = np.flatnonzero(train["fold"].to_numpy() == k)
        va = train.iloc[rows].reset_index(drop=True)
        held = pd.read_parquet(fold_dir(cfg, exp=exp, k=k) / "oof.parquet", columns=[ID])
        if set(held[ID]) != set(va[ID]):  # the fold model must not have trained on these rows
            raise PipelineError(f"{exp} fold {k} was validated on other lesions than this data's fold {k} "
                                "(different prep/folds): its features would leak; retrain or use the same prep")
        f = infer(model.features, model, LesionDataset(va, **common), views, device, bs, workers, None,
                  False, d, desc=f"{exp} fold {k} features")
        if feats is None:
            feats = np.full((len(train), f.shape[1]), np.nan, np.float32)
        feats[rows] = f
        if test is not None and len(test):
            ft = infer(model.features, model, LesionDataset(test, **common), views, device, bs, workers, None,
                       False, d, desc=f"{exp} fold {k} test features")
            test_sum = ft / len(folds) if test_sum is None else test_sum + ft / len(folds)
        meta = {"exp": exp, "arch": mcfg["arch"], "kind": mcfg["kind"], "fusion": mcfg["fusion"],
                "size": spec["size"], "views": views, "folds": folds, "dim": int(f.shape[1]),
                "fingerprint": obj["fingerprint"]}
    assert feats is not None and not np.isnan(feats).any(), "every train row belongs to one fold"
    cols = [f"emb_{exp}_{i}" for i in range(feats.shape[1])]
    paths = {"train": out_dir / f"{exp}_train.parquet"}
    write_parquet(prediction_table(train[ID], feats, cols), paths["train"])
    write_json({**meta, "split": "train", "n": len(train), "source": "fold model of each row's own fold",
                "seconds": round(time.time() - t0, 1)}, out_dir / f"{exp}_train.json")
    if test_sum is not None:
        paths["test"] = out_dir / f"{exp}_test.parquet"
        write_parquet(prediction_table(test[ID], test_sum, cols), paths["test"])
        write_json({**meta, "split": "test", "n": len(test), "source": "mean over fold models"},
                   out_dir / f"{exp}_test.json")
    log.info("%s: fold-model features %s for %d train%s lesions", exp, feats.shape[1:], len(train),
             "" if test_sum is None else f" + {len(test)} test")
    return paths
