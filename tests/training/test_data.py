"""lib.training.data: the DataLoader worker count `train.workers` resolves to."""
from __future__ import annotations

import pytest

from lib.training import data as TD


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (4, 3), (32, 8)])
def test_resolve_workers_auto_follows_the_usable_cores(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                        expected: int) -> None:
    monkeypatch.setattr(TD, "cpu_count", lambda: cores)
    assert TD.resolve_workers(-1) == expected       # cores - 1, at least 1, at most 8
    assert TD.resolve_workers(0) == 0 and TD.resolve_workers(5) == 5   # explicit values are kept
