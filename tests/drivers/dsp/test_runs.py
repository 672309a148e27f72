"""The shared run finder of the detectors."""

from __future__ import annotations

import numpy as np

from drivers.dsp.runs import true_runs


def test_runs_are_half_open_and_short_inner_runs_can_be_dropped() -> None:
    flags = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert true_runs(flags) == [(0, 2), (3, 4), (6, 9), (10, 11)]
    # at least 3 long, or touching an end (the run may go on beyond the array)
    assert true_runs(flags, 3) == [(0, 2), (6, 9), (10, 11)]
    assert true_runs(np.zeros(5, dtype=bool)) == []
    assert true_runs(np.ones(4, dtype=bool), 9) == [(0, 4)]
    assert true_runs(np.zeros(0, dtype=bool)) == []
