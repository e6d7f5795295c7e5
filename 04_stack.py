#!/usr/bin/env python
"""Stage 04: leak-free per-class GBDT + logistic-regression stackers on embeddings, MONET, metadata
and image-model OOF, nested on folds.csv.

    python 04_stack.py -c configs/milk10k_sample/stack.yaml
"""
from __future__ import annotations

import sys

from lib.config.cli import run_script
from lib.stages.stack import run


def main(cfg: dict) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(run_script(main, None, __doc__))
