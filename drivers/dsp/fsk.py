"""Streaming 1200-baud FSK receiver: quadrature demodulator and 8N1 UART.

Demodulator (non-coherent, per sample, vectorised per chunk): the signal is mixed with
complex oscillators at the mark and space frequencies and each product is averaged over
``L`` = 7 samples (about one bit at 1200 baud; a boxcar, computed by cumulative sums). The
sign of ``|mark|^2 - |space|^2`` is the bit; the carrier is present where those two
powers hold at least half of the signal power over the same window and the signal is
above ``min_level_dbfs``. The boxcar delays everything by (L - 1) / 2 = 3 samples, which
is taken off so that levels sit on the line timeline.

UART: 8N1, LSB first (Telcordia GR-30-CORE, ETSI EN 300 659-2). A byte starts at a
mark-to-space edge, placed between samples where the soft value crosses zero; its 10
bits are read at their centres from that edge (start 0, 8 data, stop 1), interpolating
the soft value between samples; every centre must have carrier, and hunting for the next
start edge resumes at the stop bit's centre: the UART re-synchronises on every byte.
Each byte reports how many mark bits of continuous carrier preceded it (the channel
seizure and mark signals before a caller-ID message), where its carrier began, and how
many of its bits were decided with little confidence ("weak": |soft| < 0.15).

Pure: arrays in, values out; no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drivers.dsp.events import SAMPLE_RATE
from drivers.dsp.runs import true_runs

log = logging.getLogger(__name__)

FULL_SCALE = 32768.0
BOXCAR_LEN = 7  # samples, ~1 bit at 1200 baud; odd so the delay is a whole sample
MIN_CARRIER_SHARE = 0.5  # mark + space power / signal power
# Carrier gate: the carrier test below is first made on every GATE_STEP-th sample only;
# the per-sample demodulator then runs where blocks of GATE_LEN samples (5 ms) pass it at
# all 5 of their GATE_LEN / GATE_STEP points, GATE_RUN blocks in a row (30 ms, one failed
# block bridged; the shortest caller-ID burst holds 100 ms of carrier before its first
# byte), widened by two blocks on each side. With 7 samples the test passes a tone
# anywhere between about 700 and 2700 Hz, so voiced speech passes it too (3.9 % of the
# simulator's mixed calls, in ~2000 runs an hour). A run is therefore demodulated only
# if at least GATE_MARKS of its blocks also hold a steady mark tone: a 40-point DFT bin at
# a mark frequency (1200 and 1300 Hz in the caller-ID receiver) with at least
# GATE_MARK_SHARE of the block's AC power. Every caller ID has one: a message's first
# byte must follow >= 30 bits (25 ms, 4 whole blocks) of steady mark. A mark 50 Hz off
# the bin (1250 Hz, midway) keeps 81 % of its power there, 3 % off 1200 or 1300 Hz
# still 88 %; with white noise at 6 dB S/N (where no message decodes any more) mark
# blocks read >= 0.46, 99 % of them >= 0.57. Speech and noise seldom hold 0.5 in two
# blocks of a run, DTMF digits with a 1209 or 1336 Hz tone may: 0.3 % of the mixed calls
# is demodulated (the caller-ID bursts, the dialled digits with such a tone, and the runs
# cut by a file batch's edges, which may go on in the next input and are always
# demodulated).
GATE_STEP = 8
GATE_LEN = 40
GATE_RUN = 6
GATE_MARKS = 2
GATE_MARK_SHARE = 0.5
DEFAULT_MIN_LEVEL_DBFS = -50.0
# A bit decided with |soft| below this is "weak": noise may have flipped it. At 20 dB S/N
# no bit of a clean burst is weak; bits flipped by noise nearly always are.
DEFAULT_WEAK_MARGIN = 0.15

MARK, SPACE, NO_CARRIER = 1, 0, -1


@dataclass(frozen=True, slots=True)
class FskStandard:
    name: str
    mark_hz: float
    space_hz: float
    baud: float = 1200.0


# Telcordia GR-30-CORE (Bell 202): mark 1200 Hz, space 2200 Hz, 1200 baud.
BELL202 = FskStandard("bell202", 1200.0, 2200.0)
# ETSI EN 300 659-2 / ITU-T V.23 forward channel: mark 1300 Hz, space 2100 Hz, 1200 baud.
V23 = FskStandard("v23", 1300.0, 2100.0)


@dataclass(frozen=True, slots=True)
class UartByte:
    """One 8N1 character on the line timeline."""

    value: int
    sample: int  # leading edge of the start bit
    end_sample: int  # end of the stop bit
    # continuous mark (with carrier) just before the start bit, in bits; counts the
    # previous byte's stop bit and trailing 1 data bits too
    idle_bits: float
    carrier_start: int  # first sample of the carrier that carries this byte
    margin: float  # weakest of the 10 bit decisions (|soft| of FskDemodulator, 0..1)
    weak_bits: int  # bits decided with |soft| < the UART's weak_margin


class FskDemodulator:
    """Streaming quadrature FSK demodulator: PCM in, per-sample levels out."""

    def __init__(self, mark_hz: float, space_hz: float,
                 min_level_dbfs: float = DEFAULT_MIN_LEVEL_DBFS,
                 gate_marks_hz: Sequence[float] | None = None) -> None:
        """``gate_marks_hz``: the mark frequencies the gate's mark test looks for (default
        ``mark_hz``); a receiver tuned between two standards gives both."""
        self._omega = 2.0 * np.pi * np.array([mark_hz, space_hz]) / SAMPLE_RATE
        amp = FULL_SCALE * 10.0 ** (min_level_dbfs / 20.0)
        self._min_power = amp * amp / 2.0 * BOXCAR_LEN
        self._table = np.zeros((0, 5))
        # The carrier test of the gate on rows of GATE_STEP samples (the first BOXCAR_LEN
        # of each row count): cos and sin at mark and space, and the window for the power.
        n = np.arange(GATE_STEP)[:, None] * self._omega
        self._gate_table = np.column_stack([np.cos(n[:, 0]), np.sin(n[:, 0]),
                                            np.cos(n[:, 1]), np.sin(n[:, 1])])
        self._gate_table[BOXCAR_LEN:] = 0.0
        self._gate_window = (np.arange(GATE_STEP) < BOXCAR_LEN).astype(np.float64)
        self._ones = np.ones(4)
        marks = (mark_hz,) if gate_marks_hz is None else tuple(gate_marks_hz)
        phase = 2.0 * np.pi * np.outer(np.arange(GATE_LEN), marks) / SAMPLE_RATE
        # cos and sin of each mark, then the block's sum; scaled so that a pure mark tone
        # reads its energy and the sum squared is the DC energy
        self._mark_table = np.column_stack([np.cos(phase), np.sin(phase),
                                            np.full(GATE_LEN, 1.0 / np.sqrt(2.0))])
        self._mark_table *= np.sqrt(2.0 / GATE_LEN)
        # work arrays, grown to the largest input (a file's batches would otherwise
        # allocate and free megabytes per batch)
        self._x = np.zeros(0)
        self._sums = np.zeros((0, 4))
        self._squares = np.zeros((0, GATE_STEP))
        self._both = np.zeros(0)
        self._power = np.zeros(0)
        self.reset()

    def reset(self) -> None:
        self._tail = np.zeros(BOXCAR_LEN - 1)
        self._gate_carry = 0  # blocks at the next input's start that the gate widens into
        # The last input's trailing filler (see _gated_spans), not demodulated yet: its
        # first output, counted from the end of that input's outputs, and its samples.
        self._held: tuple[int, np.ndarray] | None = None

    @property
    def delay(self) -> int:
        """Samples by which the levels lag the input."""
        return (BOXCAR_LEN - 1) // 2

    def demodulate(self, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(levels, soft) for each input sample, ``delay`` samples late.

        levels: MARK / SPACE / NO_CARRIER (int8); soft: (m - s) / (m + s) of the mark and
        space powers, -1 (space only) .. +1 (mark only); its size is the confidence.
        """
        levels = np.full(len(pcm), NO_CARRIER, dtype=np.int8)
        soft = np.zeros(len(pcm))
        spans = self.demodulate_spans(pcm)
        if self._held is not None:  # every output of this input is wanted now
            offset, x = self._held
            self._held = None
            spans.append((len(pcm) + offset, *self._demodulate(x)))
        for offset, span_levels, span_soft in spans:
            levels[offset: offset + len(span_levels)] = span_levels
            soft[offset: offset + len(span_soft)] = span_soft
        return levels, soft

    def demodulate_spans(self, pcm: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Like :meth:`demodulate`, but only the stretches that may hold a carrier, as
        (offset into ``pcm``'s outputs, levels, soft); everything else is NO_CARRIER.
        A stretch may begin in the previous input's outputs (a negative offset)."""
        pcm = np.asarray(pcm)
        n = len(pcm) + BOXCAR_LEN - 1
        if len(self._x) < n:
            self._x = np.zeros(n)
        x = self._x[:n]
        x[: BOXCAR_LEN - 1] = self._tail
        x[BOXCAR_LEN - 1:] = pcm
        self._tail = x[n - (BOXCAR_LEN - 1):].copy()
        held, self._held = self._held, None
        peak = max(_peak(x[: BOXCAR_LEN - 1]), _peak(pcm))  # (pcm: int16, a quarter of x)
        if peak ** 2 * BOXCAR_LEN < self._min_power:
            self._gate_carry = 0  # too quiet for a carrier anywhere (an idle line)
            return []
        spans, with_held = self._gated_spans(x, held is not None)
        out = [(held[0], *self._demodulate(held[1]))] if held is not None and with_held else []
        out.extend((a, *self._demodulate(x[a: b + BOXCAR_LEN - 1])) for a, b in spans)
        return out

    def _gated_spans(self, x: np.ndarray, carry_held: bool) -> tuple[list[tuple[int, int]], bool]:
        """Output ranges [a, b) (output j is centred on x[j + delay]) where a carrier may be:
        runs of >= GATE_RUN carrier-like blocks (or cut by the input's edges), widened by
        two blocks on each side, that hold a mark tone (or are cut by the input's edges);
        and whether the last input's held filler joins the first range.

        A partial last block counts as carrier-like: a run may go on in the next input.
        When such a block is all that a trailing range holds (filler: no carrier-like
        block of this input in it), that range is held back until the next input shows
        whether a run joins it at its start (``carry_held``); a filler stretch that nothing
        joins (under 3 blocks on either side of the boundary) cannot hold a caller ID: its
        mark signal alone would be longer.
        """
        n_blocks = -(-len(x) // GATE_LEN)
        full = len(x) // GATE_LEN
        like = np.ones(n_blocks, dtype=bool)
        like[:full] = self._carrier_blocks(x, full)
        like[1:-1] |= like[:-2] & like[2:]  # bridge one failed block (noise)
        n_out = len(x) - BOXCAR_LEN + 1  # output j is centred in block (j + delay) // GATE_LEN
        # blocks [a, b), cut by the input's edges, filler only
        parts = [(0, self._gate_carry, not carry_held, carry_held)] if self._gate_carry else []
        self._gate_carry = 0
        for a, b in true_runs(like, GATE_RUN):  # long enough, or cut by the input's edges
            cut = a == 0 or b == n_blocks
            if b == n_blocks:  # may go on in the next input
                self._gate_carry = 2
            parts.append((max(a - 2, 0), min(b + 2, n_blocks), cut, a == full < n_blocks))
        merged = _merge_flagged(parts)
        if merged and merged[0][3] and merged[0][0] == 0 and merged[0][1] == n_blocks:
            merged[0] = (0, n_blocks, True, False)  # a short input of filler only: keep it
        blocks: list[tuple[int, int]] = []
        with_held = False
        unsure = [(a, b) for a, b, cut, filler in merged if not (cut or filler)]
        marked = iter(self._hold_marks(x, unsure, full))
        for a, b, cut, filler in merged:
            if filler:
                if b == n_blocks:  # the trailing filler: wait for the next input
                    first = max(a * GATE_LEN - self.delay, 0)
                    if first < n_out:
                        self._held = (first - n_out, x[first:].copy())
                continue  # (or the last input's filler, which nothing joined)
            if not cut and not next(marked):
                continue
            with_held |= carry_held and a == 0
            blocks.append((a, b))
        spans = [(max(a * GATE_LEN - self.delay, 0), min(b * GATE_LEN - self.delay, n_out))
                 for a, b in blocks]
        return [(a, b) for a, b in spans if b > a], with_held

    def _carrier_blocks(self, x: np.ndarray, full: int) -> np.ndarray:
        """Per whole block of ``x``: the carrier test holds at all its GATE_LEN / GATE_STEP
        points (7-sample windows starting every GATE_STEP samples)."""
        rows = x[: full * GATE_LEN].reshape(-1, GATE_STEP)
        n = len(rows)
        if len(self._sums) < n:
            self._sums = np.zeros((n, 4))
            self._squares = np.zeros((n, GATE_STEP))
            self._both = np.zeros(n)
            self._power = np.zeros(n)
        sums = np.matmul(rows, self._gate_table, out=self._sums[:n])
        np.multiply(sums, sums, out=sums)
        both = np.matmul(sums, self._ones, out=self._both[:n])  # (faster than .sum(axis=1))
        squares = np.multiply(rows, rows, out=self._squares[:n])
        power = np.matmul(squares, self._gate_window, out=self._power[:n])
        both *= 2.0 / BOXCAR_LEN
        carrier = both >= MIN_CARRIER_SHARE * power
        carrier &= power >= self._min_power
        points = carrier.reshape(full, GATE_LEN // GATE_STEP)
        like = points[:, 0].copy()
        for k in range(1, points.shape[1]):
            like &= points[:, k]
        return like

    def _hold_marks(self, x: np.ndarray, ranges: list[tuple[int, int]],
                    full: int) -> list[bool]:
        """Per block range (all whole blocks): at least GATE_MARKS of its blocks hold a mark
        tone with GATE_MARK_SHARE of their AC power."""
        if not ranges:
            return []
        idx = np.array([i for a, b in ranges for i in range(a, b)])
        block = x[: full * GATE_LEN].reshape(full, GATE_LEN)[idx]
        bins = block @ self._mark_table
        bins *= bins
        n_marks = len(self._mark_table[0]) // 2
        tone = np.maximum.reduce(bins[:, :n_marks] + bins[:, n_marks: 2 * n_marks], axis=1)
        ac = np.einsum("ij,ij->i", block, block) - bins[:, -1]
        starts = np.cumsum([0] + [b - a for a, b in ranges[:-1]])
        return (np.add.reduceat(tone >= GATE_MARK_SHARE * ac, starts) >= GATE_MARKS).tolist()

    def _demodulate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Levels and soft values of ``len(x) - BOXCAR_LEN + 1`` outputs."""
        # columns: x cos(wm n), -x sin(wm n), x cos(ws n), -x sin(ws n), x^2 -- the phase
        # origin is the span's start; only magnitudes are used.
        y = x[:, None] * self._oscillators(len(x))
        y[:, 4] *= x
        sums = _boxcar(y)
        sq = sums[:, :4] * sums[:, :4]
        mark_p = sq[:, 0] + sq[:, 1]
        space_p = sq[:, 2] + sq[:, 3]
        both = mark_p + space_p
        # boxcar sums: |sum|^2 = L^2 |mean|^2, sum(x^2) = L mean(x^2); a tone of amplitude
        # A has |mean|^2 = A^2 / 4 and mean(x^2) = A^2 / 2, so a pure tone gives share 1.
        carrier = (both * (2.0 / BOXCAR_LEN) >= MIN_CARRIER_SHARE * sums[:, 4]) & (
            sums[:, 4] >= self._min_power)
        levels = np.where(carrier, (mark_p > space_p).astype(np.int8), np.int8(NO_CARRIER))
        soft = (mark_p - space_p) / np.maximum(both, 1e-9)
        return levels.astype(np.int8, copy=False), soft

    def _oscillators(self, n: int) -> np.ndarray:
        if len(self._table) < n:
            phase = np.outer(np.arange(max(n, 4096)), self._omega)
            self._table = np.column_stack([np.cos(phase[:, 0]), -np.sin(phase[:, 0]),
                                           np.cos(phase[:, 1]), -np.sin(phase[:, 1]),
                                           np.ones(len(phase))])
        return self._table[:n]


def _peak(x: np.ndarray) -> float:
    """max |x| (without a temporary array)."""
    return max(float(x.max()), -float(x.min())) if len(x) else 0.0


def _merge_flagged(spans: list[tuple[int, int, bool, bool]],
                   ) -> list[tuple[int, int, bool, bool]]:
    """Sorted (start, end, any, all) ranges with the overlapping and touching ones joined;
    a joined range has ``any`` if one of its parts has it, ``all`` if each part has."""
    out: list[tuple[int, int, bool, bool]] = []
    for a, b, any_, all_ in spans:
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[1], b), last[2] or any_, last[3] and all_)
        else:
            out.append((a, b, any_, all_))
    return out


def _boxcar(x: np.ndarray) -> np.ndarray:
    """Sums of BOXCAR_LEN consecutive rows: one output per input row after the first L-1."""
    c = np.cumsum(x, axis=0)
    out = c[BOXCAR_LEN - 1:]
    out[1:] -= c[: len(c) - BOXCAR_LEN]
    return out


class Uart8N1:
    """Streaming 8N1 UART over per-sample levels (see module docstring)."""

    def __init__(self, baud: float = 1200.0, weak_margin: float = DEFAULT_WEAK_MARGIN) -> None:
        self._spb = SAMPLE_RATE / baud
        self._weak_margin = weak_margin
        self._offsets = (np.arange(10) + 0.5) * self._spb  # bit centres after the edge
        self._span = int(np.ceil(self._offsets[-1])) + 2  # levels needed from the edge on
        self._resume = round(9.5 * self._spb)  # stop-bit centre
        self._end = round(10 * self._spb)
        self._weights = 1 << np.arange(8)
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.int8)
        self._soft_buf = np.zeros(0)
        self._base = 0  # line sample of self._buf[0]
        self._pos = 0  # line sample where the next start edge may be
        self._last_not_mark = -1  # last line sample before self._buf whose level != MARK
        self._last_no_carrier = -1  # ... whose level is NO_CARRIER
        self._started = False

    def feed(self, start: int, levels: np.ndarray, soft: np.ndarray) -> list[UartByte]:
        """Levels and soft values of line samples ``start``.. (contiguous with the last call)."""
        if not self._started:  # nothing is known before the first level: no carrier
            self._base = self._pos = start
            self._last_not_mark = self._last_no_carrier = start - 1
            self._started = True
        if len(levels) and levels.max() == NO_CARRIER:  # nothing to read: just move on
            self._idle(start + len(levels))
            return []
        if len(self._buf):
            levels = np.concatenate([self._buf, levels])
            soft = np.concatenate([self._soft_buf, soft])
        if len(levels) < 2:
            self._buf, self._soft_buf = levels, soft
            return []
        at = np.arange(self._base, self._base + len(levels))
        not_mark = np.maximum.accumulate(np.where(levels != MARK, at, self._last_not_mark))
        no_carrier = np.maximum.accumulate(
            np.where(levels == NO_CARRIER, at, self._last_no_carrier))
        edges = np.flatnonzero((levels[:-1] == MARK) & (levels[1:] == SPACE)) + 1
        edges = edges[edges >= self._pos - self._base]
        ready = edges[edges + self._span <= len(levels)]
        out = self._read(levels, soft, ready, not_mark, no_carrier) if len(ready) else []
        keep_from = len(levels) - 1  # the last level may begin an edge
        if len(ready) < len(edges):
            keep_from = int(edges[len(ready)]) - 1
        self._last_not_mark = int(not_mark[keep_from - 1]) if keep_from else self._last_not_mark
        self._last_no_carrier = (int(no_carrier[keep_from - 1]) if keep_from
                                 else self._last_no_carrier)
        self._buf, self._soft_buf = levels[keep_from:], soft[keep_from:]
        self._base += keep_from
        return out

    def skip_to(self, start: int) -> None:
        """No carrier on the line until line sample ``start`` (where the next levels begin):
        a byte still being read is dropped. Nothing happens if the levels fed so far
        already reach ``start``."""
        if self._started and start > self._base + len(self._buf):
            self._idle(start)

    def _idle(self, end: int) -> None:
        """Everything before line sample ``end`` was without carrier."""
        self._buf, self._soft_buf = np.zeros(0, dtype=np.int8), np.zeros(0)
        self._base = end
        self._pos = max(self._pos, end)
        self._last_not_mark = self._last_no_carrier = end - 1

    def _read(self, levels: np.ndarray, soft: np.ndarray, edges: np.ndarray,
              not_mark: np.ndarray, no_carrier: np.ndarray) -> list[UartByte]:
        """Bytes at the start edges that frame correctly, taken in order without overlap."""
        bits, at_centre = self._sample_bits(levels, soft, edges)
        good = (bits[:, 0] == SPACE) & (bits[:, 9] == MARK) & (bits.min(axis=1) >= 0)
        if not good.any():
            self._pos = self._base + int(edges[-1]) + 1
            return []
        edges, bits, confidence = edges[good], bits[good], np.abs(at_centre[good])
        values = (bits[:, 1:9] @ self._weights).tolist()
        weakest = confidence.min(axis=1).tolist()
        weak = (confidence < self._weak_margin).sum(axis=1).tolist()
        idle = ((edges - 1 + self._base - not_mark[edges - 1]) / self._spb).tolist()
        carrier_start = (no_carrier[edges] + 1).tolist()
        out: list[UartByte] = []
        for j, e in enumerate((edges + self._base).tolist()):
            if e >= self._pos:
                out.append(UartByte(values[j], e, e + self._end, idle[j], carrier_start[j],
                                    weakest[j], weak[j]))
                self._pos = e + self._resume
        return out

    def _sample_bits(self, levels: np.ndarray, soft: np.ndarray,
                     edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bits, soft values) at the 10 bit centres after each start edge.

        The edge is placed between samples where the soft value crosses zero; the centres
        fall between samples too and are read by linear interpolation. A centre without
        carrier on either side reads NO_CARRIER.
        """
        before, after = soft[edges - 1], soft[edges]
        edge = edges - 1 + before / np.maximum(before - after, 1e-9)
        centre = np.minimum(edge[:, None] + self._offsets, len(levels) - 1.001)
        where = centre.astype(np.int64)
        frac = centre - where
        at_centre = soft[where] * (1.0 - frac) + soft[where + 1] * frac
        carrier = np.minimum(levels[where], levels[where + 1]) >= 0
        bits = np.where(carrier, (at_centre > 0).astype(np.int8), np.int8(NO_CARRIER))
        return bits, at_centre
