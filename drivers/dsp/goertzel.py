"""A bank of single-bin DFTs (Goertzel filters) evaluated as one matrix product.

The recursive Goertzel algorithm computes one DFT bin per pass over a block. In numpy it
is far cheaper to compute every bin of every block at once: ``blocks @ table`` with a
precomputed table of cos/sin columns. The table's columns are interleaved
(``cos f0, -sin f0, cos f1, ...``) so that the real product viewed as complex is
``X[b, k] = sum_n x[b, n] * exp(-j 2 pi f_k n / fs)`` with no copy.

Pure functions and a read-only table object: no I/O, no state between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drivers.dsp.events import SAMPLE_RATE


class GoertzelBank:
    """DFT bins at arbitrary frequencies over blocks of ``block_len`` samples."""

    def __init__(self, freqs_hz: Sequence[float], block_len: int,
                 sample_rate: int = SAMPLE_RATE, window: np.ndarray | None = None) -> None:
        """``window``: None (rectangular), one window of ``block_len`` samples, or one per
        frequency as a (block_len, n_freqs) array; a frequency may appear twice with
        different windows."""
        if block_len < 2:
            raise ValueError(f"GoertzelBank: block_len {block_len} must be >= 2")
        self.freqs_hz = np.asarray(freqs_hz, dtype=np.float64)
        self.block_len = block_len
        self.sample_rate = sample_rate
        phase = 2.0 * np.pi * np.outer(np.arange(block_len), self.freqs_hz) / sample_rate
        weights = np.ones_like(phase)
        if window is not None:
            weights = weights * (window[:, None] if window.ndim == 1 else window)
        table = np.empty((block_len, 2 * len(self.freqs_hz)), dtype=np.float64)
        table[:, 0::2] = weights * np.cos(phase)
        table[:, 1::2] = -weights * np.sin(phase)
        self._table = table

    @property
    def table(self) -> np.ndarray:
        """The (block_len, 2 * n_freqs) real table: ``(blocks @ table).view(complex128)``."""
        return self._table

    def analyse(self, blocks: np.ndarray) -> np.ndarray:
        """Complex DFT bins, shape (n_blocks, n_freqs), of float64 ``blocks`` (n_blocks, N).

        Each block's phase is referenced to its own first sample.
        """
        return (blocks @ self._table).view(np.complex128)

    def block_rotation(self) -> np.ndarray:
        """exp(-j 2 pi f N / fs): the phase advance of one block at each frequency.

        ``X(block a + block b) = X(a) + X(b) * rotation`` joins two adjacent blocks.
        """
        return np.exp(-2j * np.pi * self.freqs_hz * self.block_len / self.sample_rate)

