"""lib.core.scoring: the one Dice, checked against the official isic-challenge-scoring package."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core.scoring import argmax_onehot, as_2d, dice_per_class, macro_dice


def _official(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    pytest.importorskip("isic_challenge_scoring")
    from isic_challenge_scoring import confusion, metrics
    return np.array([metrics.binary_dice(confusion.create_binary_confusion_matrix(
        truth_binary_values=pd.Series(y[:, c]).gt(0.5).to_numpy(),
        prediction_binary_values=pd.Series(p[:, c]).gt(0.5).to_numpy(),
        weights=np.ones(len(y)), name=str(c))) for c in range(y.shape[1])])


def test_matches_the_official_dice_including_an_absent_never_predicted_class():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(float)
    p = rng.random((200, 4))
    p[:7, 1] = 0.5                      # exactly 0.5 is a negative decision
    y[:, 3], p[:, 3] = 0.0, 0.2         # absent from truth and never predicted: the scorer's 1.0
    y[:, 2] = 0.0                        # absent from truth but predicted: 0.0
    ours = dice_per_class(y, p)
    np.testing.assert_allclose(ours, _official(y, p), atol=1e-12)
    assert ours[3] == 1.0 and ours[2] == 0.0
    assert macro_dice(y, p) == pytest.approx(ours.mean())


def test_per_class_thresholds_argmax_and_shapes():
    y = np.array([[1, 0], [0, 1], [0, 1]], float)
    p = np.array([[0.6, 0.3], [0.3, 0.35], [0.2, 0.9]])  # 0.3 at a cut of 0.3 is negative
    assert dice_per_class(y, p, np.array([0.5, 0.3])).tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(argmax_onehot(np.array([[0.4, 0.4], [0.1, 0.9]])), [[1, 0], [0, 1]])
    assert as_2d([0.1, 0.9]).shape == (2, 1)
