#!/usr/bin/env python
"""Stage 05: blend member experiments, tune decisions on OOF, write submission.csv + report.

    python 05_submit.py -c configs/milk10k_sample/submit.yaml
"""
from __future__ import annotations

import sys

from lib.config.cli import run_script
from lib.stages.submit import run


def main(cfg: dict) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(run_script(main, None, __doc__))
