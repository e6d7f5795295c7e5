#!/usr/bin/env python
"""Stage 02: k-fold training of image / tri-modal fusion models -> OOF + test probabilities.

    python 02_train_fold.py -c configs/milk10k_sample/train_fusion.yaml             # every fold in train.folds
    python 02_train_fold.py -c configs/milk10k_sample/train_fusion.yaml --fold 3    # one fold (own process)
    python 02_train_fold.py -c ... --fold 3 --resume                           # continue from checkpoint.pt
    torchrun --nproc_per_node=2 02_train_fold.py -c ... --fold 3               # one fold, data parallel

Artifacts: output/<exp>/fold{k}/ (checkpoint.pt, history.csv, oof.parquet logits, test_logits.parquet,
model.pt, summary.json); once every fold is done output/<exp>/oof.parquet, test.parquet
(probabilities) and cv.json. Finished folds with the same config are skipped.
"""
from __future__ import annotations

import sys

from lib.config.cli import run_script  # noqa: E402
from lib.stages.train import run  # noqa: E402

EXTRA = [
    (("--fold",), {"type": int, "default": None, "help": "train only this fold (overrides train.folds)"}),
    (("--resume",), {"action": "store_true", "help": "continue an interrupted fold from its checkpoint.pt"}),
    (("--stop-after",), {"type": int, "default": None, "dest": "stop_after",
                         "help": "stop after this many epochs (checkpoint kept; continue with --resume)"}),
]


def main(cfg: dict, fold: int | None = None, resume: bool = False, stop_after: int | None = None) -> None:
    run(cfg, fold=fold, resume=resume, stop_after=stop_after)


if __name__ == "__main__":
    sys.exit(run_script(main, None, __doc__, EXTRA))
