"""Runs of True in a flag array: the one edge finder the detectors share."""

from __future__ import annotations

import numpy as np


def true_runs(flags: np.ndarray, min_len: int = 1) -> list[tuple[int, int]]:
    """[start, end) index ranges of the runs of True in ``flags`` that are at least
    ``min_len`` long or touch either end of ``flags`` (they may go on beyond it)."""
    if not flags.any():
        return []
    padded = np.zeros(len(flags) + 2, dtype=bool)
    padded[1:-1] = flags
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if min_len > 1:
        keep = (ends - starts >= min_len) | (starts == 0) | (ends == len(flags))
        starts, ends = starts[keep], ends[keep]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
