"""Streaming DTMF detector meeting ITU-T Q.24 / ETSI ES 201 235-3 receiver figures.

Signal path (all numpy, per batch of blocks; Python only walks the per-block verdicts):

1. The input is cut into *half-blocks* of ``HALF_LEN`` = 52 samples (6.5 ms). DFT bins
   (:class:`~drivers.dsp.goertzel.GoertzelBank`, matrix products) give each half-block's
   bins: the 8 rectangular tone bins of every half-block in float32 for the screen (the
   level test, the prescreen and the peak test below, each loosened by more than float32
   rounding can move it, so nothing the exact tests pass is lost), then the whole bank
   (see :func:`_make_bank` for the 36 columns) in float64 for the few blocks that pass
   the screen, and every test exactly.
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
     (:func:`_pure_pair`), must explain >= 92 % of its AC energy. Voiced speech can put
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
# The screen makes the level test, the prescreen and the peak test in float32, each
# loosened by this share of the block's energy E (its sum of squares; the peak test by
# twice it). A float32 sum of 52 terms is off by at most 3.1e-6 of the sum of their
# magnitudes, so float32 moves the level term by < 1e-5 E and each tone bin's power,
# scaled as the screen scales it (a pure tone reads its energy), by < 1.3e-5 E: every
# test is off by < 5e-5 E. The exact tests follow on what passes.
SCREEN_TOLERANCE = 1e-4
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
# A batch's matrix products run single-threaded: drivers/__init__.py pins OpenBLAS to one
# thread (its worker threads cost more CPU than they save on products this small).
MAX_BATCH_HALVES = 4096


_TRIPLE = np.arange(3)
_NONE = np.zeros(0, dtype=np.intp)


def _db_to_power(db: float) -> float:
    return float(10.0 ** (db / 10.0))


# The blocks of a batch that pass every test (ascending), of n blocks in all: their digit
# codes and (row, column) tone powers (Hamming bins, used for the twist).
_Hits = tuple[int, list[int], list[int], list[list[float]]]


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
        # The bank's columns per role of a half-block, as complex bins (see _make_bank):
        # half b of block (b, b+1): rectangular (12), Hamming(104) first half (8),
        # Hamming(52) (8); half b+1: the same bins rotated by one half-block (so that the
        # block's bins are a sum), Hamming(104) second half; half b-1: Hamming(52) only.
        # The Hamming(52) bins of an earlier half come with the nominal advance taken off.
        bank = self._bank.table.view(np.complex128)
        rect, ham52, first, second = bank[:, :12], bank[:, 12:20], bank[:, 20:28], bank[:, 28:]
        back = ham52 * np.conj(rot[:8])
        self._table_b = np.hstack([rect, first, ham52, back]).view(np.float64)
        self._table_c = np.hstack([rect * rot[:12], second * rot[28:], ham52]).view(np.float64)
        self._table_a = np.ascontiguousarray(back).view(np.float64)
        # The screen (float32, one row per bin): real and imaginary parts of the 8
        # rectangular tone bins of a half-block, the same rotated by one half-block, and
        # the half-block's sum; scaled so that a block's tone reads its energy and its sum
        # squared is its DC energy.
        tones = rect[:, :8]
        scale = np.sqrt(2.0 / BLOCK_LEN)
        self._screen_table = np.vstack([
            scale * tones.real.T, scale * tones.imag.T, scale * (tones * rot[:8]).real.T,
            scale * (tones * rot[:8]).imag.T, np.full((1, HALF_LEN), 1.0 / np.sqrt(BLOCK_LEN)),
        ]).astype(np.float32)
        self._ones = np.ones(HALF_LEN, dtype=np.float32)
        rows = np.arange(MAX_BATCH_HALVES)[:, None]
        self._rows20, self._rows8 = rows * 20, rows * 8  # row starts in _decide's arrays
        self._rect_gain = _gain_table(np.ones(BLOCK_LEN))
        self._hamming_gain = _gain_table(np.hamming(BLOCK_LEN))
        self._group_base = np.array([0, 4])
        tone_hz = self._bank.freqs_hz[:8]
        # per tone: radians of half-block phase advance -> relative offset, nominal Hz
        self._tone_consts = np.column_stack([
            SAMPLE_RATE / (2.0 * np.pi * HALF_LEN * tone_hz), tone_hz])
        self._picks = np.array([0, 12, 4])  # _decide: a tone's bin -> its powers' places
        self._peak_factor = _db_to_power(PEAK_MARGIN_DB)
        self._normal_twist = _db_to_power(NORMAL_TWIST_DB)
        self._reverse_twist = _db_to_power(REVERSE_TWIST_DB)
        # a block's limits on (row power / column power, column power / row power)
        self._block_twist = np.array([_db_to_power(NORMAL_TWIST_DB + BLOCK_TWIST_SLACK_DB),
                                      _db_to_power(REVERSE_TWIST_DB + BLOCK_TWIST_SLACK_DB)])
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
        self._tail = np.zeros(2 * HALF_LEN, dtype=np.int16)
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

    def flush(self) -> list[DetectorEvent]:
        """End of input: analyse what is buffered, also less than a batch, and report a
        digit still sounding; resets."""
        events = self._process()
        events.extend(self._finish_run())
        self.reset()
        return events

    # --- block analysis -----------------------------------------------------------
    def _process(self) -> list[DetectorEvent]:
        buf = np.concatenate([self._tail, *self._pending])  # int16: a quarter of float64
        self._pending = []
        self._pending_len = 0
        events: list[DetectorEvent] = []
        while (n_halves := min(len(buf) // HALF_LEN, MAX_BATCH_HALVES)) >= 3:
            halves = buf[: n_halves * HALF_LEN].reshape(n_halves, HALF_LEN)
            hits = self._classify(halves)
            start = self._tail_start + HALF_LEN  # blocks 1 .. n-2 are judged in this batch
            keep = (n_halves - 2) * HALF_LEN  # the last two halves serve the next batch
            buf = buf[keep:]
            self._tail_start += keep
            events.extend(self._track(start, hits))
        self._tail = buf
        return events

    def _classify(self, halves: np.ndarray) -> _Hits:
        """The blocks of halves (b, b+1), b = 1 .. n-2, that hold a digit (see _Hits).

        Every block gets the cheap tests (:meth:`_screen`): its level, the batch prescreen
        on the eight rectangular tone bins and their peak test. Only the blocks that pass
        them (none in silence, a few per second of speech) get the full bank and every
        other test. The frequency estimate of block b sums the phase-advance products of
        the half pairs (b-1, b) and (b, b+1): the leakage of the other tone beats away in
        the sum.
        """
        n_blocks = len(halves) - 2
        idx = self._screen(halves)
        if not len(idx):
            return n_blocks, [], [], []
        # halves b-1, b, b+1 of each candidate block, in float64 from here on
        rows = halves[idx[:, None] + _TRIPLE].astype(np.float64)
        before = (rows[:, 0] @ self._table_a).view(np.complex128)
        now = (rows[:, 1] @ self._table_b).view(np.complex128)
        after = (rows[:, 2] @ self._table_c).view(np.complex128)
        bins = _power(now[:, :20] + after[:, :20])  # rectangular (12), Hamming(104) (8)
        advance = now[:, 20:28] * np.conj(before) + after[:, 20:] * np.conj(now[:, 28:])
        phase = np.arctan2(advance.imag, advance.real)  # off the nominal advance
        block = rows[:, 1:].reshape(len(idx), BLOCK_LEN)
        ok, code, freqs_hz, powers, ac_energy = self._decide(bins, phase, block)
        hit = ok.nonzero()[0]
        if len(hit):
            hit = hit[_pure_pair(block[hit], freqs_hz[hit], ac_energy[hit])]
        return n_blocks, idx[hit].tolist(), code[hit].tolist(), powers[hit].tolist()

    def _screen(self, halves: np.ndarray) -> np.ndarray:
        """The blocks that may pass the level test, the prescreen and the peak test.

        All blocks are screened in float32 (half the work of float64); each test is
        loosened by more than float32 can be off (SCREEN_TOLERANCE), so the screen passes
        every block that the exact tests in :meth:`_decide` pass. Bins are rows here (one
        per bin, a column per half-block), so that every step runs along the batch.
        """
        h = halves.astype(np.float32)
        squares = (h * h) @ self._ones
        energy = squares[1:-1] + squares[2:]
        if float(energy.max()) * (1.0 + SCREEN_TOLERANCE) < self._ac_floor:
            return _NONE  # too quiet for two floor-level tones anywhere (AC <= energy)
        r = self._screen_table @ h.T
        block_sum = r[32, 1:-1] + r[32, 2:]  # (scaled by 1 / sqrt(BLOCK_LEN))
        ac_energy = energy - block_sum * block_sum
        tol = energy * np.float32(SCREEN_TOLERANCE)
        bins = r[:16, 1:-1] + r[16:32, 2:]  # the blocks' bins: re of 8 tones, then im
        bins *= bins
        tones = bins[:8] + bins[8:]  # |X|^2 * 2 / BLOCK_LEN: a pure tone reads its energy
        peaks = np.maximum.reduce(tones[:4]) + np.maximum.reduce(tones[4:])
        cand = ac_energy + tol >= self._ac_floor
        cand &= peaks + tol >= np.float32(self._prescreen_share) * ac_energy
        idx = cand.nonzero()[0]
        if len(idx):  # the peak test
            groups = tones[:, idx].T.reshape(-1, 2, 4)
            groups.sort(axis=2)
            passed = groups[:, :, 2] * np.float32(self._peak_factor) <= groups[:, :, 3] + (
                tol[idx, None] * np.float32(2.0))  # (tol in |bin|^2 units: x 2)
            idx = idx[passed[:, 0] & passed[:, 1]]
        return idx

    def _decide(self, bins: np.ndarray, phase: np.ndarray, block: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per block: passes every test but purity; its digit code, the measured tone
        frequencies (Hz), offset-corrected Hamming powers and AC energy.

        ``bins``: per block the powers of the 12 rectangular bins and 8 Hamming(104) tone
        bins; ``phase``: the 8 tones' half-block phase advance; ``block``: the samples.
        """
        n = len(bins)
        groups = bins[:, :8].reshape(n, 2, 4)
        pick = groups.argmax(axis=2)  # (blocks, 2): the row and the column in its group
        tone = pick + self._group_base
        # per tone: rectangular power, Hamming(104) power, 2nd harmonic's rectangular power
        # (meaningful for the column), frequency offset per radian, nominal frequency
        picked = bins.ravel()[(self._rows20[:n] + tone)[:, :, None] + self._picks]
        e = picked[:, :, 0]
        consts = self._tone_consts[tone]
        per_rad, nominal = consts[:, :, 0], consts[:, :, 1]
        ph = phase.ravel()[self._rows8[:n] + tone]
        rel = ph * per_rad
        f = nominal * (1.0 + rel)
        w = picked[:, :, 1] / np.interp(ph, *self._hamming_gain)  # offset-corrected
        ordered = groups.copy()  # (ndarray methods: no Python-level numpy wrappers here)
        ordered.sort(axis=2)
        second = ordered[:, :, 2]
        # per tone: frequency, other bins of its group, level, twist against the other tone
        each = np.abs(rel) <= FREQ_TOLERANCE
        each &= second * self._peak_factor <= e
        each &= w >= self._tw_floor
        each &= w <= w[:, ::-1] * self._block_twist
        total = np.add.reduce(block, axis=1)
        ac_energy = np.add.reduce(block * block, axis=1) - total * total / BLOCK_LEN
        ok = each[:, 0] & each[:, 1]
        ok &= np.abs(f[:, 1] - 2.0 * f[:, 0]) > OCTAVE_GUARD * f[:, 1]
        ok &= picked[:, 1, 2] <= e[:, 1] * self._harmonic  # the column's 2nd harmonic
        ok &= ac_energy >= self._ac_floor  # the screen's level test and prescreen, exactly
        ok &= e[:, 0] + e[:, 1] >= (self._prescreen_share * BLOCK_LEN / 2.0) * ac_energy
        return ok, pick[:, 0] * 4 + pick[:, 1], f, w, ac_energy

    # --- duration state machine -------------------------------------------------
    def _track(self, start: int, hits: _Hits) -> list[DetectorEvent]:
        """Walk the passing blocks; the failed blocks between them count as misses."""
        events: list[DetectorEvent] = []
        n_blocks, blocks, codes, powers = hits
        last = -1  # the block walked last
        for i, code, (row_power, col_power) in zip(blocks, codes, powers, strict=True):
            events.extend(self._miss(i - last - 1))
            last = i
            block_start = start + i * HALF_LEN
            run = self._run
            if run is not None and run.code == code:
                run.hit(block_start, row_power, col_power)
            else:
                events.extend(self._finish_run())
                self._run = _Run(code, block_start, row_power, col_power)
        events.extend(self._miss(n_blocks - last - 1))
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


def _pure_pair(blocks: np.ndarray, freqs_hz: np.ndarray, ac_energy: np.ndarray,
               ) -> np.ndarray:
    """Per block: two sinusoids at ``freqs_hz`` (blocks, 2) explain at least
    MIN_TONE_ENERGY_SHARE of its AC energy (``ac_energy``).

    A least-squares fit of cos and sin at both measured frequencies (DC removed): unlike two
    rectangular DFT bins, which leak into each other and lose energy off their centre (a
    pure pair reads 0.81 .. 1.08 of its energy), the fit reads a pure pair as 1.0 at any
    offset and phase, so the talk-off limit can sit close to it.

    With the block's time axis centred, the cosines are even and the sines odd, so the fit
    splits in two: the cosines (their mean removed) fit the block's even part, the sines
    its odd part, each a 2 x 2 system solved in closed form; both are computed on one half
    of the block, exp(j w n) by a running product.
    """
    half = BLOCK_LEN // 2
    step = (2.0 * np.pi / SAMPLE_RATE) * freqs_hz  # radians per sample
    wave = np.empty((len(step), 2, half), dtype=np.complex128)  # exp(j w n), n = 0.5, 1.5..
    wave[...] = np.exp(1j * step)[:, :, None]
    wave[:, :, 0] = np.exp(0.5j * step)
    np.multiply.accumulate(wave, axis=2, out=wave)  # (numpy's complex exp is slow)
    basis = np.empty((len(step), 2, 2, half))  # (blocks, cos / sin, f1 / f2, n)
    basis[:, 0] = wave.real
    basis[:, 1] = wave.imag
    cos = basis[:, 0]
    cos -= np.add.reduce(cos, axis=2, keepdims=True) / half  # (the sines' mean is 0)
    later, earlier = blocks[:, half:], blocks[:, half - 1::-1]
    parts = np.empty((len(blocks), 2, half, 1))  # twice the even and the odd part of x
    np.add(later, earlier, out=parts[:, 0, :, 0])
    np.subtract(later, earlier, out=parts[:, 1, :, 0])
    proj = (basis @ parts)[..., 0]  # (blocks, 2, 2): x against each basis function
    gram = basis @ basis.swapaxes(2, 3)  # (blocks, 2, 2, 2): half of each 2 x 2 system
    a, b, d = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    u, v = proj[..., 0], proj[..., 1]
    captured = np.add.reduce((d * u * u - 2.0 * b * u * v + a * v * v) / (a * d - b * b),
                             axis=1)  # twice the fitted energy
    return captured >= (2.0 * MIN_TONE_ENERGY_SHARE) * ac_energy


def _power(x: np.ndarray) -> np.ndarray:
    """|x|^2 of a complex array without a temporary complex product."""
    re, im = x.real, x.imag  # (numpy reductions over a length-2 axis are slow)
    return re * re + im * im
