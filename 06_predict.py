#!/usr/bin/env python
"""Stage 06: score a test release with a bundle (tools/export_bundle.py), offline, no training data.

    python 06_predict.py --bundle bundles/milk10k_sample --test-data input/milk10k_sample/test [--output output]
"""
from __future__ import annotations

import sys

from lib.config.cli import run_predict
from lib.stages.predict import run


def main(cfg: dict) -> None:
    run(cfg["bundle"], cfg["test_data"], cfg["output"], cfg["exp"], cfg["overrides"])


if __name__ == "__main__":
    sys.exit(run_predict(main, None, __doc__))
