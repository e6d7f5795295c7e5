#!/usr/bin/env python
"""Export a trained recipe (a finished 05 experiment and everything it blended) as a bundle: one
self-contained folder that `06_predict.py` scores new test releases with, offline, without the
training data. Safe formats only (safetensors, XGBoost/LightGBM model files, JSON); bundle.json lists
every file with its sha256 (lib/stages/bundle.py: the layout).

    python tools/export_bundle.py output/sample_submit bundles/milk10k_sample
    python 06_predict.py --bundle bundles/milk10k_sample --test-data input/milk10k_sample/test
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._common import run_tool, setup_logging  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("submit_exp", type=Path, help="a finished 05 experiment folder, e.g. output/sample_submit")
    p.add_argument("bundle", type=Path, help="the bundle folder to write (new or empty)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    setup_logging()

    def work() -> None:
        from lib.config.cli import DISK_ERRORS, disk_error
        from lib.core.errors import PipelineError
        from lib.stages.bundle import export_bundle

        try:
            doc = export_bundle(a.submit_exp, a.bundle)
        except OSError as e:   # a full or read-only disk: one line; the half-written bundle was removed
            if e.errno not in DISK_ERRORS:
                raise
            raise PipelineError(disk_error(e)) from None
        print(f"{a.bundle}: {len(doc['recipe']['experiments'])} experiments, {len(doc['files'])} files, "
              f"{doc['bytes'] / 1e6:.1f} MB")
    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
