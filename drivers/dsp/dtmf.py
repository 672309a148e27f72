"""Streaming DTMF detector meeting ITU-T Q.24 / ETSI ES 201 235-3 receiver figures.

Signal path (all numpy, per batch of blocks; Python only walks the per-block verdicts):

1. The input is cut into *half-blocks* of ``HALF_LEN`` = 52 samples (6.5 ms). A DFT bank
   (:class:`~drivers.dsp.goertzel.GoertzelBank`, one matrix product per batch) gives each
   half-block's bins (see :func:`_make_bank` for the 36 columns).
2. Every pair of adjacent half-blocks is one *block* of 104 samples (13 ms) on a 52-sample
   hop: its bins are ``X = h1 + h2 * exp(-j w M)``, so the overlap costs nothing.
3. Per block, the strongest row and column bins must pass all of:

   * frequency: the phase advance of each tone from one half-block to the next (Hamming
     windowed, summed over the pairs (b-1, b) and (b, b+1)) gives its frequency;
     ``|offset| <= 2.5 %``, midway between Q.24's must-accept 1.5 % and must-reject
     3.5 %. A rectangular 104-point bin alone (76.9 Hz wide) cannot tell 1.5 % from
     3.5 % at 1633 Hz; the phase estimate can (error <= 0.4 % at 8 dB twist);
   * octave guard (music): the column tone may not be within 0.75 % of twice the row
     tone, i.e. one note's fundamental and 2nd harmonic;
   * tone powers are corrected by each bin's response at the measured offset (1.5 % at
     1633 Hz costs 1.5 dB in the bin);
   * twist, from a Hamming(104) bin (rectangular leakage between the pair's tones would
     blur it by up to 2 dB): row up to 9 dB above column ("normal", Q.24 accepts 8 dB)
     and column up to 5 dB above row ("reverse", Q.24 accepts 4 dB). A block may exceed
     a limit by 1.5 dB (noise); the average over the digit's blocks may not;
   * level: each tone >= ``MIN_TONE_DBFS`` = -48 dBFS (reference: 0 dBFS is a full-scale
     sine, peak 32767; a digit at -7 dBFS per tone peaks at 0.9 of full scale, so the
     tested range -7 .. -45 dBFS per tone spans 38 dB);
   * peaks: the other row and column bins >= 4 dB below the chosen ones (the choice of
     bin is unambiguous; a third tone is left to the purity test);
   * 2nd harmonic: the column tone's >= 10 dB below it (speech and music are harmonic);
   * purity (the talk-off guard), judged last and only on blocks that passed the rest:
     two sinusoids at the two measured frequencies, fitted by least squares to the block
     (:func:`_pair_share`), must explain >= 92 % of its AC energy. Voiced speech can put
     two of its harmonics on a row and a column frequency (e.g. the 8th and 10th of a
     118 Hz voice on 941 and 1209 Hz, '*'); what betrays it is the energy of its other
     harmonics. Two rectangular DFT bins cannot measure that share: they leak into each
     other and lose energy off their centre, reading a pure pair anywhere from 0.81 to
     1.08, so a limit on them had to sit at 0.80, where speech blocks at 0.80 .. 0.92
     passed at some block alignments and not at others. The fit reads a pure pair as 1.00
     at any offset and phase. Measured: 70 minutes of speech (synthetic voices, espeak-ng,
     13 block alignments) peak at 0.84 (residual -8 dB); a digit at Q.24's 15 dB S/N
     keeps >= 0.95 (residual <= -13 dB); the limit sits between them (residual -11 dB).
     60 ms digits are still detected at 12 dB S/N, not at 10 dB.

4. Duration state machine over the per-block results (hop 6.5 ms):

   * a *run* starts at a block that passes for digit d; further hits of d extend it;
   * up to ``MAX_BRIDGED_MISSES`` = 4 consecutive failed blocks are bridged, the 5th ends
     the run (measured at every block alignment: interruptions <= 16 ms are always
     bridged, pauses >= 23 ms always separate two digits; Q.24: bridge <= 10 ms);
   * a block passing for a different digit ends the run and starts a new one;
   * an ended run is a digit when it holds >= ``MIN_HITS`` = 4 hits, >= ``MIN_STREAK`` = 3
     of them consecutive, and its average twist is within the limits (measured: tones
     >= 38 ms are always detected, <= 30 ms never; Q.24: detect >= 40 ms, reject
     < 20 ms). Only blocks nearly filled by the tone pass the purity test, so a hit is
     one block of tone. The streak rule stops two beating musical notes, which pass
     single blocks once per beat, from being bridged into a digit.

A digit is reported once, when its run ends, as ``DtmfDigit(sample, digit, end_sample)``:
``sample`` is the first sample of the first passing block (within one block of the tone's
onset) and ``end_sample`` the end of the last passing block. Reports therefore lag the
tone's end by the 5 bridging blocks (32.5 ms) plus at most one batch.

Block grid: the grid is anchored at the first sample fed after construction, ``reset()``
or a timeline jump (a ``feed`` whose ``sample`` does not continue the previous one): with
that sample s, blocks start at ``s - HALF_LEN + k * HALF_LEN`` (the first block's first
half is silence). A detector reset and then fed from sample s therefore behaves exactly
like a new one fed from s. Events are stamped on the caller's timeline. Where the grid
falls relative to a tone or a word varies with that first sample; the figures above hold
at every grid phase.
"""

from __future__ import annotations

import logging

import numpy as np

from drivers.dsp.events import SAMPLE_RATE, DetectorEvent, DtmfDigit
from drivers.dsp.goertzel import GoertzelBank

log = logging.getLogger(__name__)

# ITU-T Q.23 §2: the low (row) and high (column) frequency groups.
ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COL_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = "123A456B789C*0#D"  # row-major: KEYPAD[4 * row + col]

HALF_LEN = 52  # samples; two halves make a 104-sample block (bin width 76.9 Hz)
BLOCK_LEN = 2 * HALF_LEN
FULL_SCALE = 32768.0

# ITU-T Q.24 / ES 201 235-3: accept <= 1.5 % offset, reject >= 3.5 %; decide at the midpoint.
FREQ_TOLERANCE = 0.025
# Q.24: accept 8 dB normal twist (row louder) and 4 dB reverse twist; limits 1 dB beyond.
NORMAL_TWIST_DB = 9.0
REVERSE_TWIST_DB = 5.0
# A single block may exceed the twist limits by this much (noise); the digit's average may not.
BLOCK_TWIST_SLACK_DB = 1.5
# Other bins of each group at least this far below the chosen one. At 8 dB twist, 1.5 %
# offsets and 15 dB S/N the weak tone's neighbour bin comes within 5 dB of it (rectangular
# leakage of both tones plus noise); a third tone is the purity test's business.
PEAK_MARGIN_DB = 4.0
# Talk-off guards: share of the block's AC energy that the fitted pair explains (Q.24 S/N
# 15 dB leaves >= 0.95, speech reaches 0.84; see the module docstring); column 2nd harmonic.
MIN_TONE_ENERGY_SHARE = 0.92
MAX_HARMONIC_DB = -10.0
# Music guard: a column tone within 0.75 % of twice the row tone is one note's fundamental and
# 2nd harmonic. Real pairs within 1.5 % of nominal stay >= 1.18 % away from an octave
# (770/1477 Hz: 2 * 770 * 0.985 = 1517 Hz vs 1477 * 1.015 = 1499 Hz).
OCTAVE_GUARD = 0.0075
# Sensitivity floor per tone (0 dBFS = full-scale sine); tested range -7 .. -45 dBFS (38 dB).
MIN_TONE_DBFS = -48.0
# Duration logic in blocks on a HALF_LEN hop (see module docstring).
MIN_HITS = 4
MIN_STREAK = 3
MAX_BRIDGED_MISSES = 4
# Process in batches of at least this many samples (keeps numpy call overhead per line low).
DEFAULT_BATCH_SAMPLES = 640
# ... and of at most this many half-blocks (27 s) per batch (a file is analysed in big
# batches: the per-batch numpy overhead of the few candidate blocks is then paid rarely).
MAX_BATCH_HALVES = 4096
# Matrix products run over at most this many rows at a time: a product over much more is
# big enough for OpenBLAS to spread it over threads (measured: 4096 halves take 3x the CPU
# of 8 x 512, for the same wall time on 2 cores).
PRODUCT_ROWS = 512


def _db_to_power(db: float) -> float:
    return float(10.0 ** (db / 10.0))


# per block: digit code or -1, and the (row, column) tone powers (Hamming bins) used for the
# twist (None when no block passed)
_Blocks = tuple[np.ndarray, np.ndarray | None]


class _Run:
    """The digit run being timed: which digit, where it started and ended, hits, misses."""

    __slots__ = ("best_streak", "code", "col_power", "first", "hits", "last", "misses",
                 "row_power", "streak")

    def __init__(self, code: int, start: int, row_power: float, col_power: float) -> None:
        self.code = code
        self.first = start
        self.last = start
        self.hits = 1
        self.streak = 1
        self.best_streak = 1
        self.misses = 0
        self.row_power = row_power
        self.col_power = col_power

    def hit(self, start: int, row_power: float, col_power: float) -> None:
        self.hits += 1
        self.streak = self.streak + 1 if self.misses == 0 else 1
        self.best_streak = max(self.best_streak, self.streak)
        self.misses = 0
        self.last = start
        self.row_power += row_power
        self.col_power += col_power

    def is_digit(self, normal_twist: float, reverse_twist: float) -> bool:
        return (self.hits >= MIN_HITS and self.best_streak >= MIN_STREAK
                and self.row_power <= self.col_power * normal_twist
                and self.col_power <= self.row_power * reverse_twist)


class DtmfDetector:
    """Streaming DTMF receiver implementing the :class:`~drivers.dsp.events.Detector` protocol."""

    def __init__(self, batch_samples: int = DEFAULT_BATCH_SAMPLES) -> None:
        self._batch_samples = max(batch_samples, BLOCK_LEN)
        self._bank = _make_bank()
        rot = self._bank.block_rotation()
        self._rot = rot[:12]
        self._rot8 = rot[:8]
        self._rot_tw = rot[28:36]
        self._rect_table = GoertzelBank(self._bank.freqs_hz[:8], HALF_LEN).table
        self._rect_gain = _gain_table(np.ones(BLOCK_LEN))
        self._hamming_gain = _gain_table(np.hamming(BLOCK_LEN))
        self._group_base = np.array([0, 4])
        # radians of half-block phase advance -> relative offset of each of the 8 tones
        self._tone_hz = self._bank.freqs_hz[:8]
        self._rel_per_rad = SAMPLE_RATE / (2.0 * np.pi * HALF_LEN * self._bank.freqs_hz[:8])
        self._peak_factor = _db_to_power(PEAK_MARGIN_DB)
        self._normal_twist = _db_to_power(NORMAL_TWIST_DB)
        self._reverse_twist = _db_to_power(REVERSE_TWIST_DB)
        self._block_normal_twist = _db_to_power(NORMAL_TWIST_DB + BLOCK_TWIST_SLACK_DB)
        self._block_reverse_twist = _db_to_power(REVERSE_TWIST_DB + BLOCK_TWIST_SLACK_DB)
        self._harmonic = _db_to_power(MAX_HARMONIC_DB)
        # Batch prescreen on the rectangular bins at nominal frequency: a tone 2.5 % off
        # keeps >= 35 % of its power in the bin. Measured: blocks that pass the purity test
        # read >= 1.37 times this limit (leakage, offsets up to 2.5 %, noise).
        worst_phase = 2.0 * np.pi * FREQ_TOLERANCE * COL_HZ[-1] * HALF_LEN / SAMPLE_RATE
        self._prescreen_share = MIN_TONE_ENERGY_SHARE * float(
            np.interp(worst_phase, *self._rect_gain))
        amp_floor = FULL_SCALE * 10.0 ** (MIN_TONE_DBFS / 20.0)
        bin_floor = (amp_floor * BLOCK_LEN / 2.0) ** 2  # |X|^2 of a floor-level tone
        self._ac_floor = 2.0 * bin_floor / BLOCK_LEN  # its block energy
        self._tw_floor = (amp_floor * np.hamming(BLOCK_LEN).sum() / 2.0) ** 2
        self.reset()

    def reset(self) -> None:
        """Forget buffered audio and any digit in progress.

        The next ``feed`` anchors a new block grid at its first sample, exactly as for a
        new detector (see the module docstring, "Block grid").
        """
        # Two silent half-blocks precede the stream: every block has a previous pair.
        self._tail = np.zeros(2 * HALF_LEN, dtype=np.float64)
        self._tail_start = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._next_sample: int | None = None
        self._run: _Run | None = None

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        """Consume ``pcm`` (int16 or float, 8 kHz) starting at line sample ``sample``."""
        events: list[DetectorEvent] = []
        if self._next_sample is not None and sample != self._next_sample:
            log.debug("dtmf: timeline jump %d -> %d", self._next_sample, sample)
            events.extend(self._process())
            events.extend(self._finish_run())
            self.reset()
        if self._next_sample is None:
            self._tail_start = sample - 2 * HALF_LEN
        self._next_sample = sample + len(pcm)
        self._pending.append(np.asarray(pcm))
        self._pending_len += len(pcm)
        if self._pending_len + len(self._tail) >= self._batch_samples:
            events.extend(self._process())
        return events

    # --- block analysis -----------------------------------------------------------
    def _process(self) -> list[DetectorEvent]:
        buf = np.concatenate([self._tail, *self._pending]).astype(np.float64, copy=False)
        self._pending = []
        self._pending_len = 0
        events: list[DetectorEvent] = []
        while (n_halves := min(len(buf) // HALF_LEN, MAX_BATCH_HALVES)) >= 3:
            halves = buf[: n_halves * HALF_LEN].reshape(n_halves, HALF_LEN)
            codes = self._classify(halves)
            start = self._tail_start + HALF_LEN  # blocks 1 .. n-2 are judged in this batch
            keep = (n_halves - 2) * HALF_LEN  # the last two halves serve the next batch
            buf = buf[keep:]
            self._tail_start += keep
            events.extend(self._track(start, codes))
        self._tail = buf
        return events

    def _classify(self, halves: np.ndarray) -> _Blocks:
        """Digit code (4 * row + col) per block of halves (b, b+1), b = 1 .. n-2, or -1.

        Every block gets the cheap tests: its level and the batch prescreen on the eight
        rectangular tone bins (one small matrix product). Only the blocks that pass them
        (none in silence, a few per second of speech) get the full bank and every other
        test. The frequency estimate of block b sums the phase-advance products of the half
        pairs (b-1, b) and (b, b+1): the leakage of the other tone beats away in the sum.
        """
        n_blocks = len(halves) - 2
        codes = np.full(n_blocks, -1)
        sums = halves.sum(axis=1)
        squares = np.einsum("ij,ij->i", halves, halves)
        block_sum = sums[1:-1] + sums[2:]
        ac_energy = squares[1:-1] + squares[2:] - block_sum * block_sum / BLOCK_LEN
        live = ac_energy >= self._ac_floor  # quieter blocks cannot hold two floor-level tones
        if not live.any():
            return codes, None
        r = np.concatenate([halves[i: i + PRODUCT_ROWS] @ self._rect_table
                            for i in range(0, len(halves), PRODUCT_ROWS)]).view(np.complex128)
        peaks = _peak_pair(_power(r[1:-1] + r[2:] * self._rot8))
        idx = np.flatnonzero(live & (peaks * (2.0 / BLOCK_LEN) >= self._prescreen_share
                                     * ac_energy))
        if not len(idx):
            return codes, None
        ha, hb, hc = (self._bank.analyse(halves[idx + k]) for k in (0, 1, 2))
        energy = _power(hb[:, :12] + hc[:, :12] * self._rot)
        advance = hb[:, 12:20] * np.conj(ha[:, 12:20]) + hc[:, 12:20] * np.conj(hb[:, 12:20])
        phase = np.angle(advance * self._rot8)
        tw = _power(hb[:, 20:28] + hc[:, 28:36] * self._rot_tw)
        ok, tone, freqs_hz, w = self._decide(energy, tw, phase)
        ok = _purity_test(halves[idx + 1], halves[idx + 2], ok, freqs_hz)
        codes[idx] = np.where(ok, tone[:, 0] * 4 + tone[:, 1] - 4, -1)
        powers = np.zeros((n_blocks, 2))
        powers[idx] = w
        return codes, powers

    def _decide(self, energy: np.ndarray, tw_energy: np.ndarray, phase: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per block: passes every test but purity; (row, column) tone index, their measured
        frequencies (Hz) and offset-corrected Hamming powers."""
        groups = energy[:, :8].reshape(-1, 2, 4)
        tone = groups.argmax(axis=2) + self._group_base  # (blocks, 2): row, column index
        at = (np.arange(len(energy))[:, None], tone)
        e = energy[at]
        ph = phase[at]
        rel = ph * self._rel_per_rad[tone]
        f = self._tone_hz[tone] * (1.0 + rel)
        w = tw_energy[at] / np.interp(ph, *self._hamming_gain)  # offset-corrected
        w_row, w_col = w[:, 0], w[:, 1]
        second = np.sort(groups, axis=2)[:, :, 2]
        ok = ((np.abs(rel) <= FREQ_TOLERANCE).all(axis=1)
              & (np.abs(f[:, 1] - 2.0 * f[:, 0]) > OCTAVE_GUARD * f[:, 1])
              & (second * self._peak_factor <= e).all(axis=1)
              & (w_row <= w_col * self._block_normal_twist)
              & (w_col <= w_row * self._block_reverse_twist)
              & (w.min(axis=1) >= self._tw_floor)
              & (energy[at[0][:, 0], tone[:, 1] + 4] <= e[:, 1] * self._harmonic))
        return ok, tone, f, w

    # --- duration state machine -------------------------------------------------
    def _track(self, start: int, blocks: _Blocks) -> list[DetectorEvent]:
        """Walk the passing blocks; the failed blocks between them count as misses."""
        events: list[DetectorEvent] = []
        codes, powers = blocks
        last = -1  # the block walked last
        for i in np.flatnonzero(codes >= 0).tolist():
            events.extend(self._miss(i - last - 1))
            last = i
            code = int(codes[i])
            block_start = start + i * HALF_LEN
            row_power, col_power = powers[i].tolist()  # type: ignore[index]
            run = self._run
            if run is not None and run.code == code:
                run.hit(block_start, row_power, col_power)
            else:
                events.extend(self._finish_run())
                self._run = _Run(code, block_start, row_power, col_power)
        events.extend(self._miss(len(codes) - last - 1))
        return events

    def _miss(self, n_blocks: int) -> list[DetectorEvent]:
        """``n_blocks`` consecutive blocks failed: bridged, or the end of the open run."""
        run = self._run
        if run is None or n_blocks <= 0:
            return []
        run.misses += n_blocks
        return self._finish_run() if run.misses > MAX_BRIDGED_MISSES else []

    def _finish_run(self) -> list[DetectorEvent]:
        run, self._run = self._run, None
        if run is None or not run.is_digit(self._normal_twist, self._reverse_twist):
            return []
        digit = KEYPAD[run.code]
        log.debug("dtmf: digit %s at sample %d (%d blocks)", digit, run.first, run.hits)
        return [DtmfDigit(run.first, digit, run.last + BLOCK_LEN)]


def _make_bank() -> GoertzelBank:
    """The DFT bins computed for every half-block, as columns:

    0-11   rectangular: 8 tones, 4 column 2nd harmonics (peaks, batch prescreen,
           harmonics);
    12-19  Hamming(52): 8 tones, for the frequency estimate (the window keeps the pair's
           other tone out of it: worst case 0.4 % error at 8 dB twist);
    20-35  first and second halves of a Hamming(104): 8 tones, joined into one windowed
           block for twist and level (rectangular leakage between the two tones of a pair
           would blur the twist by up to 2 dB; the window keeps it within 0.2 dB).
    """
    tones = (*ROW_HZ, *COL_HZ)
    freqs = (*tones, *(2.0 * f for f in COL_HZ), *tones, *tones, *tones)
    window = np.ones((HALF_LEN, len(freqs)))
    window[:, 12:20] = np.hamming(HALF_LEN)[:, None]
    block_window = np.hamming(BLOCK_LEN)
    window[:, 20:28] = block_window[:HALF_LEN, None]
    window[:, 28:36] = block_window[HALF_LEN:, None]
    return GoertzelBank(freqs, HALF_LEN, window=window)


def _gain_table(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(half-block phase advance, power response) of a windowed 104-point bin, for np.interp.

    A tone offset by d rad/sample advances ``phase = d * HALF_LEN`` per half-block; the bin
    keeps |sum_n w[n] exp(j d n)|^2 / (sum_n w[n])^2 of its power (for the rectangular
    window, (sin(N d / 2) / (N sin(d / 2)))^2). Floored at 0.3: larger offsets fail the
    frequency test anyway.
    """
    phase = np.linspace(-np.pi, np.pi, 513)
    kernel = np.exp(1j * np.outer(phase / HALF_LEN, np.arange(BLOCK_LEN))) @ window
    return phase, np.maximum(np.abs(kernel / window.sum()) ** 2, 0.3)


def _purity_test(first: np.ndarray, second: np.ndarray, ok: np.ndarray,
                 freqs_hz: np.ndarray) -> np.ndarray:
    """``ok`` narrowed to the blocks whose fitted tone pair explains enough of their energy.

    Run only on the blocks that passed every other test (a few per second of speech).
    Block i is made of the half-blocks ``first[i]`` and ``second[i]``.
    """
    idx = np.flatnonzero(ok)
    if len(idx):
        blocks = np.concatenate([first[idx], second[idx]], axis=1)
        ok[idx] = _pair_share(blocks, freqs_hz[idx]) >= MIN_TONE_ENERGY_SHARE
    return ok


def _pair_share(blocks: np.ndarray, freqs_hz: np.ndarray) -> np.ndarray:
    """Share of each block's AC energy that two sinusoids at ``freqs_hz`` (blocks, 2) explain.

    A least-squares fit of cos and sin at both measured frequencies (DC removed): unlike two
    rectangular DFT bins, which leak into each other and lose energy off their centre (a
    pure pair reads 0.81 .. 1.08 of its energy), the fit reads a pure pair as 1.0 at any
    offset and phase, so the talk-off limit can sit close to it.
    """
    n = np.arange(BLOCK_LEN) - (BLOCK_LEN - 1) / 2.0  # centred: cos and sin near-orthogonal
    arg = (2.0 * np.pi / SAMPLE_RATE) * freqs_hz[:, :, None] * n
    basis = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)  # (blocks, 4, BLOCK_LEN)
    basis -= basis.mean(axis=2, keepdims=True)
    x = blocks - blocks.mean(axis=1, keepdims=True)
    proj = basis @ x[:, :, None]
    coef = np.linalg.solve(basis @ basis.transpose(0, 2, 1), proj)
    captured = (coef * proj).sum(axis=(1, 2))
    return captured / np.maximum(np.einsum("ij,ij->i", x, x), 1e-12)


def _power(x: np.ndarray) -> np.ndarray:
    """|x|^2 of a complex array without a temporary complex product."""
    re, im = x.real, x.imag  # (numpy reductions over a length-2 axis are slow)
    return re * re + im * im


def _peak_pair(energy: np.ndarray) -> np.ndarray:
    """Strongest row bin + strongest column bin of each block's 8 tone energies."""
    e = energy.T
    rows = np.maximum(np.maximum(e[0], e[1]), np.maximum(e[2], e[3]))
    cols = np.maximum(np.maximum(e[4], e[5]), np.maximum(e[6], e[7]))
    return rows + cols
