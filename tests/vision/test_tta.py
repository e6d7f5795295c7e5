"""lib.vision.tta: the 8 dihedral views (distinct, invertible, a group), alias expansion, unknown names."""
from __future__ import annotations

import pytest
import torch

from lib.core.errors import PipelineError
from lib.vision import tta

INVERSE = {"id": "id", "hflip": "hflip", "vflip": "vflip", "rot90": "rot270", "rot180": "rot180",
           "rot270": "rot90", "transpose": "transpose", "antitranspose": "antitranspose"}


@pytest.fixture
def x() -> torch.Tensor:
    """A non-symmetric batch [B, C, H, W] with distinct values everywhere (square: all views keep shape)."""
    return torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) ** 1.5


def test_views_distinct(x):
    outs = {v: tta.apply_view(x, v) for v in tta.DIHEDRAL}
    assert len(tta.DIHEDRAL) == 8
    for i, a in enumerate(tta.DIHEDRAL):
        assert outs[a].shape == x.shape
        for b in tta.DIHEDRAL[i + 1:]:
            assert not torch.equal(outs[a], outs[b]), (a, b)


def test_views_invertible(x):
    for v in tta.DIHEDRAL:
        assert torch.equal(tta.apply_view(tta.apply_view(x, v), INVERSE[v]), x), v


def test_views_match_reference_definitions(x):
    # a single-channel 2x3 picture makes the geometry explicit
    img = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert tta.apply_view(img, "hflip").tolist() == [[3, 2, 1], [6, 5, 4]]
    assert tta.apply_view(img, "vflip").tolist() == [[4, 5, 6], [1, 2, 3]]
    assert tta.apply_view(img, "transpose").tolist() == [[1, 4], [2, 5], [3, 6]]
    assert tta.apply_view(img, "antitranspose").tolist() == [[6, 3], [5, 2], [4, 1]]
    assert tta.apply_view(img, "rot90").tolist() == [[3, 6], [2, 5], [1, 4]]     # counter-clockwise
    assert tta.apply_view(img, "rot180").tolist() == [[6, 5, 4], [3, 2, 1]]
    assert tta.apply_view(img, "rot270").tolist() == [[4, 1], [5, 2], [6, 3]]


def test_views_closed_under_composition(x):
    outs = [tta.apply_view(x, v) for v in tta.DIHEDRAL]
    for a in tta.DIHEDRAL:
        for b in tta.DIHEDRAL:
            y = tta.apply_view(tta.apply_view(x, a), b)
            assert any(torch.equal(y, o) for o in outs), (a, b)


def test_batch_and_channels_untouched(x):
    for v in tta.DIHEDRAL:
        y = tta.apply_view(x, v)
        for b in range(2):
            for c in range(3):
                assert torch.equal(y[b, c], tta.apply_view(x[b, c], v))


@pytest.mark.parametrize("names, expected", [
    ("all8", list(tta.DIHEDRAL)),
    (["all8"], list(tta.DIHEDRAL)),
    ("flips", ["id", "hflip", "vflip", "rot180"]),
    ("none", ["id"]),
    (["hflip", "flips"], ["hflip", "id", "vflip", "rot180"]),      # order kept, duplicates dropped
    (["rot90", "rot90"], ["rot90"]),
    ([], ["id"]),
])
def test_parse_views(names, expected):
    assert tta.parse_views(names) == expected


def test_unknown_view():
    with pytest.raises(PipelineError, match=r"unknown TTA view 'rot45'"):
        tta.parse_views(["id", "rot45"])
    with pytest.raises(PipelineError, match=r"unknown TTA view 'flip'"):
        tta.apply_view(torch.zeros(1, 1, 2, 2), "flip")
