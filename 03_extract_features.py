#!/usr/bin/env python
"""Stage 03: frozen-encoder embeddings (TTA-averaged) per lesion and modality, cached and reusable.

    python 03_extract_features.py -c configs/milk10k_sample/stack.yaml
"""
from __future__ import annotations

import sys

from lib.config.cli import run_script
from lib.stages.features import run


def main(cfg: dict) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(run_script(main, None, __doc__))
