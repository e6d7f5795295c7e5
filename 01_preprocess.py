#!/usr/bin/env python
"""Stage 01: read a data release, cache resized images, encode metadata, write folds once.

    python 01_preprocess.py -c configs/milk10k_sample/base.yaml [--data ../shared/data/milk10k]
"""
from __future__ import annotations

import sys

from lib.config.cli import run_script
from lib.stages.prepare import run


def main(cfg: dict, force_folds: bool = False) -> None:
    run(cfg, force_folds=force_folds)


if __name__ == "__main__":
    sys.exit(run_script(main, None, __doc__,
                        [(("--force-folds",), {"action": "store_true", "help": "rewrite an existing folds.csv"})]))
