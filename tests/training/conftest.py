"""The prepared MILK10k sample, once per session, for the training tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from lib.config.load import load_config
from tests.training.helpers import ROOT, SAMPLE


@pytest.fixture(scope="session")
def prep(tmp_path_factory) -> Path:
    """Stage 01 on the sample into a session tmp output (shared by the training tests)."""
    from lib.stages.prepare import run

    out = tmp_path_factory.mktemp("out")
    run(load_config(ROOT / "configs/milk10k_sample/base.yaml", [f"paths.output={out}", f"data.root={SAMPLE}"]))
    return out
