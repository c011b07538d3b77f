"""Exact hypervolume: hand-computed 2-D staircases and a Monte-Carlo check in 3-D."""

import numpy as np
import pytest

from cimattn.codesign.pareto import hypervolume, pareto_mask


def test_pareto_mask():
    pts = np.array([[1, 3], [2, 2], [3, 1], [2, 3], [3, 3]])
    assert pareto_mask(pts).tolist() == [True, True, True, False, False]


def test_2d_staircase_by_hand():
    # (1,3),(2,2),(3,1) against (4,4): 3·1 + 2·1 + 1·1 = 6 (three columns of width 1)
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3.5, 3.5]], [4, 4]) == pytest.approx(6.0)  # dominated point adds nothing
    assert hypervolume([[5, 5]], [4, 4]) == 0.0


def test_3d_matches_monte_carlo():
    rng = np.random.default_rng(0)
    pts = rng.random((12, 3))
    ref = np.ones(3)
    samples = rng.random((200_000, 3))
    dominated = np.zeros(len(samples), bool)
    for p in pts:
        dominated |= np.all(samples >= p, axis=1)
    assert hypervolume(pts, ref) == pytest.approx(dominated.mean(), abs=4e-3)


def test_4d_single_box():
    assert hypervolume([[0.5, 0.5, 0.5, 0.5]], [1, 1, 1, 1]) == pytest.approx(0.0625)
