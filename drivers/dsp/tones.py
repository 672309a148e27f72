"""Call-progress tone detector: dial, busy, ringback and congestion tones by country.

The tone definitions come only from :mod:`drivers.toneplan`. Signal path:

1. **Bands and groups** (at construction). Every frequency of the country's four tones,
   with the sidebands ``carrier +- am_hz`` of amplitude-modulated tones, is clustered:
   frequencies closer than ``BAND_MERGE_HZ`` form one *band* (a 20 ms block cannot
   resolve them: its bins are 50 Hz apart). Tones that touch the same set of bands form
   one *group*; within a group only the cadence tells the tones apart (DE: 425 Hz for
   all four; AU: 425 Hz and 413+438 Hz are one band). Tones of a group with the same
   cadence cannot be told apart at all (PL, HU, JP, AU, MX busy = congestion); the later
   one in the order dial, busy, ringback, congestion is reported as the earlier one
   (:attr:`ToneDetector.reported_as`).
2. **Blocks** of ``BLOCK_LEN`` = 160 samples (20 ms). One matrix product against
   precomputed orthonormal bases (QR of the cos/sin columns of each band's frequencies)
   gives each block's energy in every band and group subspace. A block is *on* for a
   group when the group holds >= ``MIN_PURITY`` of the block's AC energy (at 15 dB S/N a
   tone keeps ~97 %; speech and music spread over many harmonics), is above
   ``MIN_TONE_DBFS``, and each band of a multi-band group holds >= ``MIN_BAND_SHARE`` of
   it. If several groups pass, the one with more bands wins (UK 400 vs 400+450 Hz).
3. **Bursts**: runs of on-blocks per group, bridging dropouts of up to
   ``BRIDGE_BLOCKS`` (noise, the troughs of AM tones); runs shorter than
   ``MIN_BURST_S`` are dropped (and count as activity in the gap).
4. **Cadence matching** per group: the run's on/off durations are compared with every
   tone's cadence at every phase, each within ``tolerance_s(expected)``. A tone is
   decided when it has matched one full cadence period (all its on and off times; a
   continuous tone: ``dial_confirm_s`` of steady tone) and no other tone of the group is
   still consistent but unconfirmed; between confirmed tones the smallest deviation wins.
   A run ends when the gap exceeds the cadence's off time plus tolerance, when the gap
   holds ``GAP_ACTIVITY_BLOCKS`` of other sound within ``GAP_ACTIVITY_DB`` of the tone
   (DTMF after the dial tone, the far end's voice after ringback), or when a burst breaks
   the cadence. A burst that starts on time but lasts too long is another tone following
   without a pause (ringback, then busy): it is cut where the cadence says the burst
   ends. A single burst that fits no cadence but is >= ``DIAL_MIN_S`` long is a
   (continuous) dial tone; so is a steady burst longer than every on time of its group,
   also where the plan's dial tone is cadenced (IT, CZ, GR). A single burst that also
   fits a cadenced tone (a 1 s DE dial tone, or ringback answered after one burst) is
   ambiguous on its own.
5. **DTMF cuts the dial tone**: a dial tone lasts from off-hook until the exchange hears
   the first digit. The line's DTMF detector tells of each digit
   (:meth:`ToneDetector.note_dtmf`); a lone burst, or a run that fits the dial cadence,
   whose end a digit's start follows within ``DTMF_CUT_S`` (or precedes by up to
   ``DIAL_STOP_LAG_S``; in a cadenced dial tone's pause: until its next burst was due)
   is the dial tone, whatever else its length fits, and ends at the digit at the latest.
   Since a digit is reported only after it ends, every dial tone and every run that may
   be one is held until a digit decided it or ``DTMF_WAIT_S`` have passed; an ambiguous
   run no digit cut is dropped, a run that fitted another tone's whole cadence is
   reported as that tone.

Events: ``Tone(sample, end_sample, tone)`` once the pattern has stopped (a dial tone,
and a run that may be one, ``DTMF_WAIT_S`` after its digit window), with ``sample`` the
first block of the first burst (within one block of the onset) and ``end_sample`` the
end of the last burst. :meth:`ToneDetector.in_progress` tells about a decided tone that
is still going.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np

from drivers.dsp.events import SAMPLE_RATE, DetectorEvent, Tone
from drivers.dsp.runs import true_runs
from drivers.toneplan import TonePlan, TonePlanError, ToneSpec, tone_plan

log = logging.getLogger(__name__)

TONE_NAMES = ("dial", "busy", "ringback", "congestion")
BLOCK_LEN = 160  # 20 ms at 8 kHz: bins 50 Hz apart
FULL_SCALE = 32767.0  # peak of a 0 dBFS sine in int16 samples
# Frequencies closer than this are one band. 400/450 Hz (UK) stay apart; 413/425/438 Hz
# (AU, ACIF S002) and an AM tone's carrier and sidebands are one band.
BAND_MERGE_HZ = 30.0
# A block is on when the group holds this share of its AC energy. A tone at 15 dB S/N in
# white noise keeps ~0.97 (the 2-dim subspace of one tone takes 2/160 of the noise).
MIN_PURITY = 0.7
# Each band of a dual tone must hold this share of the group energy (about 7 dB twist).
MIN_BAND_SHARE = 0.15
# Weakest tone detected, group energy as a sine level (0 dBFS = full-scale sine).
# ITU-T E.180 sends call-progress tones at -10 .. -25 dBm0 (about -13 .. -28 dBFS).
MIN_TONE_DBFS = -42.0
# Dropouts bridged inside a burst: 3 blocks = 60 ms. The shortest gap in the table is
# 165 ms (CZ congestion, Asterisk [cz]); an AM trough at 16 Hz lasts < 30 ms.
BRIDGE_BLOCKS = 3
MIN_BURST_S = 0.1  # shortest on time in the table: 0.165 s (CZ congestion)
# Cadence tolerance: quantisation (one block at each edge) plus a share of the interval.
TOL_ABS_S = 0.06
TOL_REL = 0.08
DIAL_MIN_S = 0.6  # a lone steady burst at least this long can be a dial tone
# A gap is not quiet when it holds this many blocks of other sound at most this far
# below the tone's level (the white noise of a 15 dB S/N line stays 15 dB below).
GAP_ACTIVITY_DB = -10.0
GAP_ACTIVITY_BLOCKS = 3
# A dial tone lasts from off-hook until the exchange hears the first digit, so a lone
# burst (or a run fitting a cadenced dial tone) cut off by a DTMF digit is a dial tone,
# whatever else its length fits (a 1 s DE dial tone is as long as a ringback burst).
# Cut off: the digit starts at most DTMF_CUT_S after the tone stops, or at most
# DIAL_STOP_LAG_S before (the exchange's receiver needs >= 40 ms to accept a digit,
# ITU-T Q.24, before it removes the tone; a weak digit does not break the tone's blocks).
DTMF_CUT_S = 0.1
DIAL_STOP_LAG_S = 0.1
DIAL_CUT_MIN_S = 0.3  # a digit sooner after the tone's start does not cut it (reaction)
# How long after the cut a digit may still be reported: a 0.5 s key press plus the DTMF
# detector's report lag (~0.11 s after the digit ends). Dial tones wait this long.
DTMF_WAIT_S = 0.65
DIGIT_MEMORY_S = 10.0  # digit starts kept behind the analysis (longest cadence gap: 5 s)
DEFAULT_BATCH_SAMPLES = 3200  # 400 ms: numpy call overhead per line stays small


class CallProgressError(Exception):
    """Base of the call-progress detectors' errors (tones, voice, answer)."""


class CallProgressConfigError(CallProgressError, ValueError):
    """A detector built with an unknown country or an impossible parameter."""


def tolerance_s(expected_s: float) -> float:
    """How far a measured on or off time may be from ``expected_s``."""
    return TOL_ABS_S + TOL_REL * expected_s


# --- groups of tones -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ToneCandidate:
    """One tone a group may be: its name and flattened cadence (on, off, on, ...)."""

    tone: str
    cadence: tuple[float, ...]  # seconds; () = continuous

    @property
    def continuous(self) -> bool:
        return not self.cadence


@dataclass(frozen=True, slots=True)
class ToneGroup:
    """Tones sharing the same bands; only their cadences tell them apart."""

    bands: tuple[tuple[float, ...], ...]  # frequencies of each band, Hz
    candidates: tuple[ToneCandidate, ...]


def _atoms(spec: ToneSpec) -> list[tuple[float, ...]]:
    """A tone's frequencies that must share a band: an AM carrier with its sidebands."""
    if not spec.am_hz:
        return [(f,) for f in spec.freqs_hz]
    return [tuple(sorted(_spec_freqs(spec)))]


def _spec_freqs(spec: ToneSpec) -> tuple[float, ...]:
    """Frequencies that carry a tone's energy: AM adds the carrier's two sidebands."""
    if not spec.am_hz:
        return spec.freqs_hz
    carrier = spec.freqs_hz[0]
    return (*spec.freqs_hz, carrier - spec.am_hz, carrier + spec.am_hz)


def _bands(atoms: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Frequencies clustered into bands: ``atoms`` (one tone's carrier and sidebands, or a
    single frequency) closer than ``BAND_MERGE_HZ`` to each other share a band."""
    bands: list[list[float]] = []
    for atom in sorted(set(atoms)):
        if bands and atom[0] - bands[-1][-1] < BAND_MERGE_HZ:
            bands[-1] = sorted({*bands[-1], *atom})
        else:
            bands.append(sorted(atom))
    return [tuple(b) for b in bands]


def tone_groups(plan: TonePlan) -> tuple[list[ToneGroup], dict[str, str]]:
    """The plan's tones grouped by bands, and which tone is reported as which.

    The second value maps a tone name to the name reported for it when its frequencies
    and cadence equal an earlier tone's (e.g. ``{"congestion": "busy"}`` for PL).
    """
    specs = {name: getattr(plan, name) for name in TONE_NAMES}
    atoms = [a for spec in specs.values() for a in _atoms(spec)]
    bands = _bands(atoms)
    band_of = {f: i for i, band in enumerate(bands) for f in band}
    by_key: dict[frozenset[int], list[ToneCandidate]] = {}
    reported_as: dict[str, str] = {}
    for name, spec in specs.items():
        key = frozenset(band_of[f] for f in _spec_freqs(spec))
        cadence = tuple(x for pair in spec.cadence for x in pair)
        members = by_key.setdefault(key, [])
        twin = next((c for c in members if c.cadence == cadence), None)
        if twin is not None:
            reported_as[name] = twin.tone
            log.debug("tones %s: %s is indistinguishable from %s", plan.country, name,
                      twin.tone)
            continue
        members.append(ToneCandidate(name, cadence))
    groups = [ToneGroup(tuple(bands[i] for i in sorted(key)), tuple(members))
              for key, members in by_key.items()]
    return groups, reported_as


# --- block analysis ------------------------------------------------------------------
def _basis(freqs: tuple[float, ...]) -> np.ndarray:
    """Orthonormal basis (BLOCK_LEN, 2 * len(freqs)) of the sinusoids at ``freqs``."""
    n = np.arange(BLOCK_LEN)[:, None]
    phase = 2.0 * np.pi * n * np.asarray(freqs)[None, :] / SAMPLE_RATE
    q, _ = np.linalg.qr(np.hstack([np.cos(phase), np.sin(phase)]))
    return q


class _BlockAnalyser:
    """Per block: which group's tone it holds (-1 = none) and its AC energy."""

    def __init__(self, groups: list[ToneGroup]) -> None:
        measures: list[tuple[float, ...]] = []  # frequency sets whose energy is measured

        def index(freqs: tuple[float, ...]) -> int:
            if freqs not in measures:
                measures.append(freqs)
            return measures.index(freqs)

        def union(bands: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
            return tuple(f for b in bands for f in b)

        self._group_idx = [index(union(g.bands)) for g in groups]
        # per band of a multi-band group: the other bands' subspace; the band's own share is
        # what the group holds beyond it (a 400 Hz tone leaks 40 % into a 440+450 Hz basis)
        self._rest_idx = [[index(union(g.bands[:i] + g.bands[i + 1:])) for i in range(len(g.bands))]
                          if len(g.bands) > 1 else [] for g in groups]
        bases = [_basis(freqs) for freqs in measures]
        self._matrix = np.hstack(bases)
        self._starts = np.cumsum([0] + [b.shape[1] for b in bases[:-1]])
        self._n_bands = np.array([len(g.bands) for g in groups], dtype=np.float64)
        amp = FULL_SCALE * 10.0 ** (MIN_TONE_DBFS / 20.0)
        self._floor = BLOCK_LEN * amp * amp / 2.0  # energy of a floor-level sine

    def analyse(self, blocks: np.ndarray, ac: np.ndarray | None = None,
                ) -> tuple[np.ndarray | None, np.ndarray]:
        """(chosen group per block, AC energy per block) of float64 ``blocks``; ``ac``: the
        AC energies if already known (computed exactly as here).

        The first value is None when no block holds a tone (the common case: speech,
        silence), so callers can skip their per-group work."""
        if ac is None:
            sums = blocks.sum(axis=1)
            ac = np.einsum("ij,ij->i", blocks, blocks) - sums * sums / BLOCK_LEN
        if float(ac.max()) < self._floor:
            return None, ac
        y = blocks @ self._matrix
        energy = np.add.reduceat(y * y, self._starts, axis=1)
        group_e = energy[:, self._group_idx]
        ok = (group_e >= MIN_PURITY * ac[:, None]) & (group_e >= self._floor)
        if not ok.any():
            return None, ac
        for g, rest in enumerate(self._rest_idx):
            if rest:
                own = group_e[:, g:g + 1] - energy[:, rest]
                ok[:, g] &= (own >= MIN_BAND_SHARE * group_e[:, g:g + 1]).all(axis=1)
        score = np.where(ok, self._n_bands + group_e / np.maximum(ac, 1e-9)[:, None], 0.0)
        chosen = np.where(ok.any(axis=1), score.argmax(axis=1), -1)
        return chosen, ac


# --- bursts --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Burst:
    start: int  # first sample of the first on-block
    end: int  # end of the last on-block
    energy: float  # mean AC energy of its on-blocks
    loud_before: int  # blocks of other sound in the gap before it


@dataclass(frozen=True, slots=True)
class _OpenState:
    """A group's tracker at the end of the analysed audio."""

    burst_start: int | None  # a burst in progress (>= MIN_BURST_S long), else None
    burst_end: int
    loud: int  # other sound since the last burst (gap) or before the open burst
    gap_end: int | None = None  # start of a burst too young to count: the gap ends there


class _BurstTracker:
    """Turns one group's on-blocks into bursts, bridging short dropouts."""

    def __init__(self) -> None:
        self._min_blocks = round(MIN_BURST_S * SAMPLE_RATE / BLOCK_LEN)
        self._activity = 10.0 ** (GAP_ACTIVITY_DB / 10.0)
        self.open_start: int | None = None
        self.open_end = 0
        self._open_energy = 0.0
        self._open_blocks = 0
        self._open_loud = 0
        self._off_blocks = BRIDGE_BLOCKS + 1  # blocks since the last on-block
        self._gap_loud = 0  # other sound since the last on-block
        self._carry_loud = 0  # other sound before it that a dropped burst took along
        self._level = 0.0  # energy of the last burst (reference for "other sound")
        self.last_burst_end: int | None = None  # of the latest burst >= MIN_BURST_S

    def process(self, start: int, on: np.ndarray, ac: np.ndarray) -> list[_Burst]:
        """Closed bursts found in a batch of blocks starting at sample ``start``."""
        n = len(on)
        near = on.copy()  # a burst's edge blocks are part tone: not "other sound"
        near[1:] |= on[:-1]
        near[:-1] |= on[1:]
        loud = (ac >= self._level * self._activity) & ~near if self._level else near & False
        cum = np.concatenate([[0], np.cumsum(loud)])
        closed: list[_Burst] = []
        prev = -1 - self._off_blocks  # index of the last on-block (may be negative)
        for a, end in true_runs(on):
            b = end - 1  # the run's last block
            gap = a - prev - 1
            if self.open_start is not None and gap <= BRIDGE_BLOCKS:
                self._extend(start, a, b, ac)
            else:
                carried = self._gap_loud if prev < 0 else 0
                loud_before = carried + int(cum[a] - cum[max(prev + 1, 0)])
                closed.extend(self._close())
                self._open(start, a, b, ac, loud_before)
            prev = b
        if prev >= 0:
            self._off_blocks = n - 1 - prev
            self._gap_loud = int(cum[n] - cum[prev + 1])
        else:
            self._off_blocks += n
            self._gap_loud += int(cum[n])
        if self.open_start is not None and self._off_blocks > BRIDGE_BLOCKS:
            closed.extend(self._close())
        return closed

    @property
    def idle(self) -> bool:
        """No burst in progress."""
        return self.open_start is None

    def skip(self, n_blocks: int) -> None:
        """Blocks without any tone while idle (only the gap's length matters)."""
        self._off_blocks += n_blocks

    def state(self) -> _OpenState:
        if self.open_start is not None and self._open_blocks >= self._min_blocks:
            return _OpenState(self.open_start, self.open_end, self._carry_loud + self._open_loud)
        before = self._open_loud if self.open_start is not None else 0  # a burst starting
        return _OpenState(None, self.open_end, self._carry_loud + before + self._gap_loud,
                          self.open_start)

    def close(self) -> list[_Burst]:
        """End the burst in progress (the stream stops)."""
        return self._close()

    def _open(self, start: int, a: int, b: int, ac: np.ndarray, loud_before: int) -> None:
        self.open_start = start + a * BLOCK_LEN
        self._open_energy, self._open_blocks = 0.0, 0
        self._open_loud = loud_before
        self._extend(start, a, b, ac)

    def _extend(self, start: int, a: int, b: int, ac: np.ndarray) -> None:
        self.open_end = start + (b + 1) * BLOCK_LEN
        self._open_energy += float(ac[a:b + 1].sum())
        self._open_blocks += b + 1 - a
        if self._open_blocks >= self._min_blocks:
            self.last_burst_end = self.open_end

    def _close(self) -> list[_Burst]:
        if self.open_start is None:
            return []
        begin, self.open_start = self.open_start, None
        if self._open_blocks < self._min_blocks:
            self._carry_loud += self._open_loud + self._open_blocks  # noise, not a burst
            return []
        self._level = self._open_energy / self._open_blocks
        burst = _Burst(begin, self.open_end, self._level, self._carry_loud + self._open_loud)
        self._carry_loud = 0
        return [burst]


# --- cadence matching ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Fit:
    ok: bool  # consistent with everything seen so far
    ended: bool  # ...but only if the pattern has stopped
    truncated: bool  # the last burst was cut short
    matched: int  # intervals matched within tolerance
    error: float  # mean squared deviation in tolerances


_MISFIT = _Fit(False, False, False, 0, 0.0)
_DIAL_CUT_MIN = round(DIAL_CUT_MIN_S * SAMPLE_RATE)
_DTMF_CUT = round(DTMF_CUT_S * SAMPLE_RATE)
_DIAL_STOP_LAG = round(DIAL_STOP_LAG_S * SAMPLE_RATE)
_DTMF_WAIT = round(DTMF_WAIT_S * SAMPLE_RATE)


@dataclass(frozen=True, slots=True)
class _DialRun:
    """A stopped run that is a dial tone if a DTMF digit cut it off, else ``otherwise``
    (a tone name, or None: nothing). A digit cuts it when it starts by ``cut_by``: the end
    plus ``DTMF_CUT_S``, or the end of the pause a cadenced dial tone was in."""

    start: int
    end: int
    otherwise: str | None
    cut_by: int


def _fit(cand: ToneCandidate, phase: int, closed: list[float], open_on: bool,
         open_s: float, first: int = 0) -> _Fit:
    """How well intervals (on, off, on, ... then an open one) fit ``cand`` at ``phase``.

    Closed intervals before ``first`` are taken as already checked."""
    if cand.continuous:
        if len(closed) == 0:
            return _Fit(True, False, False, 0, 0.0)
        return _Fit(True, True, False, 1, 0.0) if len(closed) == 1 else _MISFIT
    flat, m = cand.cadence, len(cand.cadence)
    matched, error, truncated = 0, 0.0, False
    for j in range(first, len(closed)):
        d, e = closed[j], flat[(2 * phase + j) % m]
        tol = tolerance_s(e)
        if j == len(closed) - 1 and not open_on and d < e - tol:
            truncated = True  # the last burst ended early: the tone stopped
        elif abs(d - e) > tol:
            return _MISFIT
        else:
            matched += 1
            error += ((d - e) / tol) ** 2
    e_open = flat[(2 * phase + len(closed)) % m]
    overdue = open_s > e_open + tolerance_s(e_open)
    if overdue and open_on:
        return _MISFIT
    return _Fit(True, overdue or truncated, truncated, matched, error / max(matched, 1))


class _CadenceMatcher:
    """Follows one group's bursts and decides which tone they are."""

    def __init__(self, group: ToneGroup) -> None:
        self.group = group
        self._dial = next((c for c in group.candidates if c.tone == "dial"), None)
        # a cadenced dial tone (IT, CZ, GR) may also come steady: a lone burst longer than
        # every on time of the group is a dial tone there as well
        steady = ((ToneCandidate("dial", ()),)
                  if self._dial is not None and not self._dial.continuous else ())
        self._keys = [(c, p) for c in (*group.candidates, *steady)
                      for p in range(max(1, len(c.cadence) // 2))]
        longest_on = max((max(c.cadence[0::2]) for c in group.candidates if c.cadence),
                         default=0.0)
        self.dial_confirm_s = max(DIAL_MIN_S, longest_on + tolerance_s(longest_on))
        self.bursts: list[_Burst] = []
        self.decided: tuple[ToneCandidate, int] | None = None
        self.open_start: int | None = None
        self.open_end = 0
        self._cut: tuple[int, int] | None = None  # (burst start, where it was cut)
        self.dial_runs: list[_DialRun] = []  # runs waiting for DTMF; the detector takes them

    def step(self, closed: list[_Burst], state: _OpenState, now: int) -> list[Tone]:
        out: list[Tone] = []
        for burst in map(self._after_cut, closed):
            if self.bursts:
                gap_s = (burst.start - self.bursts[-1].end) / SAMPLE_RATE
                out += self._check(None, gap_s, burst.loud_before)
            self.bursts.append(burst)
            out += self._check(None, 0.0, 0)
        start = state.burst_start
        if start is not None and self._cut is not None and start == self._cut[0]:
            start = self._cut[1]  # the rest of a burst cut between two tones
        self.open_start, self.open_end = start, state.burst_end
        if start is not None and state.burst_end > start:
            out += self._check(start, (state.burst_end - start) / SAMPLE_RATE, state.loud)
        elif self.bursts:
            gap_end = now if state.gap_end is None else state.gap_end
            out += self._check(None, (gap_end - self.bursts[-1].end) / SAMPLE_RATE, state.loud)
        return out

    def _after_cut(self, burst: _Burst) -> _Burst:
        """The part of a closed burst after the cut made while it was open."""
        if self._cut is None or burst.start != self._cut[0]:
            return burst
        cut, self._cut = self._cut[1], None
        return _Burst(cut, burst.end, burst.energy, 0)

    def finish(self) -> list[Tone]:
        """The stream stopped: every pattern has ended."""
        return self._check(None, float("inf"), 0) if self.bursts else []

    def next_due(self) -> int | None:
        """Latest sample at which the decided tone's next burst may start, while in a gap."""
        if self.decided is None or not self.bursts or self.open_start is not None:
            return None
        cand, phase = self.decided
        if cand.continuous:
            return None
        off_s = cand.cadence[(2 * phase + 2 * len(self.bursts) - 1) % len(cand.cadence)]
        return self.bursts[-1].end + round((off_s + tolerance_s(off_s)) * SAMPLE_RATE)

    def in_progress(self) -> Tone | None:
        if self.decided is None:
            return None
        start = self.bursts[0].start if self.bursts else self.open_start
        if start is None:
            return None
        end = self.open_end if self.open_start is not None else self.bursts[-1].end
        return Tone(start, end, self.decided[0].tone)

    # --- decisions ---------------------------------------------------------------------
    def _intervals(self, open_start: int | None) -> list[float]:
        out: list[float] = []
        for i, b in enumerate(self.bursts):
            if i:
                out.append((b.start - self.bursts[i - 1].end) / SAMPLE_RATE)
            out.append((b.end - b.start) / SAMPLE_RATE)
        if open_start is not None and self.bursts:
            out.append((open_start - self.bursts[-1].end) / SAMPLE_RATE)
        return out

    def _check(self, open_start: int | None, open_s: float, loud: int) -> list[Tone]:
        """Re-judge the run; ``loud`` blocks of other sound in the last gap end it."""
        out: list[Tone] = []
        while self.bursts or (open_start is not None and self.decided is None):
            closed = self._intervals(open_start)
            on = open_start is not None
            noisy = loud >= GAP_ACTIVITY_BLOCKS and bool(self.bursts)
            if self.decided is not None:
                return out + self._follow(closed, open_start, open_s, noisy)
            fits = {k: _fit(k[0], k[1], closed, on, open_s) for k in self._keys}
            live = [k for k, f in fits.items() if f.ok and not f.ended and not noisy]
            if live:
                self._try_decide(live, fits, on, open_s)
                return out
            ended = [k for k, f in fits.items() if f.ok]
            if ended or not self.bursts:
                return out + self._final(ended, fits)
            self._drop_oldest()  # fits nothing: forget the oldest burst and retry
        return out

    def _drop_oldest(self) -> None:
        """Forget the run's first burst; alone it may still be a dial tone cut by a digit."""
        first = self.bursts.pop(0)
        if self._dial is not None:
            self.dial_runs.append(_DialRun(first.start, first.end, None,
                                           first.end + _DTMF_CUT))

    def _try_decide(self, live: list[tuple[ToneCandidate, int]],
                    fits: dict[tuple[ToneCandidate, int], _Fit], on: bool,
                    open_s: float) -> None:
        def confirmed(k: tuple[ToneCandidate, int]) -> bool:
            if k[0].continuous:
                return on and not self.bursts and open_s >= self.dial_confirm_s
            return fits[k].matched >= len(k[0].cadence)

        done = [k for k in live if confirmed(k)]
        if not done:
            return
        best = min(done, key=lambda k: (fits[k].error, TONE_NAMES.index(k[0].tone)))
        if all(confirmed(k) or k[0].tone == best[0].tone for k in live):
            self.decided = best
            log.debug("tones: %s decided at %s", best[0].tone,
                      self.bursts[0].start if self.bursts else self.open_start)

    def _follow(self, closed: list[float], open_start: int | None, open_s: float,
                noisy: bool) -> list[Tone]:
        """A decided tone: go on, end it, or cut it where its cadence broke."""
        cand, phase = self.decided or (None, 0)
        assert cand is not None
        on = open_start is not None
        fit = _fit(cand, phase, closed, on, open_s, max(0, len(closed) - 2))
        if fit.ok and not fit.ended and not noisy:
            return []
        if fit.ok:
            cut_by = self._dial_cut_by() if cand.tone != "dial" else None
            if cut_by is not None:  # the pattern stopped; it may be a dial tone's start
                return self._hold(cand.tone, cut_by)
            return self._emit(len(self.bursts))  # the pattern stopped
        # the newest burst came too early, or lasts too long: another tone follows
        newest = None if on else self.bursts.pop()
        start = open_start if newest is None else newest.start
        head = closed if on else closed[:-1]  # up to the gap before the newest burst
        in_time = not cand.continuous and _fit(cand, phase, head, True, 0.0,
                                               max(0, len(head) - 2)).ok
        if in_time and start is not None:  # no pause between the tones: cut at the cadence
            on_s = cand.cadence[(2 * phase + len(head)) % len(cand.cadence)]
            cut = start + round(on_s * SAMPLE_RATE)
            self.bursts.append(_Burst(start, cut, 0.0, 0))
            self._cut = (start, cut)
            if newest is not None:
                newest = _Burst(cut, newest.end, newest.energy, 0)
        out = self._emit(len(self.bursts))
        if newest is not None:
            self.bursts = [newest]
            out += self._check(None, 0.0, 0)
        return out

    def _final(self, ended: list[tuple[ToneCandidate, int]],
               fits: dict[tuple[ToneCandidate, int], _Fit]) -> list[Tone]:
        """The run stopped before a decision: report what it clearly was, if anything. A
        run that a dial tone may be waits for DTMF (:class:`_DialRun`): cut off by a digit,
        it is the dial tone whatever else its cadence fits."""
        cut_by = self._dial_cut_by()  # None: no dial tone fits the run
        done = [k for k in ended if not k[0].continuous and fits[k].matched >= len(k[0].cadence)]
        if done:
            self.decided = min(done, key=lambda k: (fits[k].error, TONE_NAMES.index(k[0].tone)))
            if cut_by is not None and self.decided[0].tone != "dial":
                return self._hold(self.decided[0].tone, cut_by)
            return self._emit(len(self.bursts))
        lone = self.bursts[0] if len(self.bursts) == 1 else None
        dial = next((k for k in ended if k[0].continuous), None)
        fits_cadence = any(fits[k].matched >= 1 for k in ended if not k[0].continuous)
        if (lone is not None and dial is not None and not fits_cadence
                and (lone.end - lone.start) / SAMPLE_RATE >= DIAL_MIN_S):
            self.decided = dial
            return self._emit(1)
        if cut_by is not None:  # every lone burst of a group with a dial tone
            return self._hold(None, cut_by)
        self.bursts = []
        return []

    def _hold(self, otherwise: str | None, cut_by: int) -> list[Tone]:
        """Hand the run to the detector as a possible dial tone; ``otherwise`` (the decided
        tone, or None) is what it is when no digit cuts it."""
        self.dial_runs.append(_DialRun(self.bursts[0].start, self.bursts[-1].end, otherwise,
                                       cut_by))
        self.bursts, self.decided = [], None
        return []

    def _dial_cut_by(self) -> int | None:
        """When the stopped run fits the group's dial tone (a lone burst always does): the
        latest start of a digit that cut it off, ``DTMF_CUT_S`` after its end or, in a
        cadenced dial tone's pause, when the next burst was due."""
        if self._dial is None or not self.bursts:
            return None
        closed = self._intervals(None)
        end = self.bursts[-1].end
        latest = None
        for cand, phase in self._keys:
            fit = _fit(cand, phase, closed, False, 0.0) if cand.tone == "dial" else _MISFIT
            if not fit.ok:
                continue
            pause_s = 0.0 if cand.continuous or fit.truncated else cand.cadence[
                (2 * phase + len(closed)) % len(cand.cadence)]
            pause = round((pause_s + tolerance_s(pause_s)) * SAMPLE_RATE) if pause_s else 0
            latest = max(latest or 0, end + max(_DTMF_CUT, pause))
        return latest

    def _emit(self, count: int) -> list[Tone]:
        """Report the first ``count`` bursts as the decided tone; keep the rest."""
        done, self.bursts = self.bursts[:count], self.bursts[count:]
        decided, self.decided = self.decided, None
        if not done or decided is None:
            return []
        return [Tone(done[0].start, done[-1].end, decided[0].tone)]


# --- the detector --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BlockTones:
    """Block verdicts of one analysed stretch: block i covers ``sample + i * BLOCK_LEN``."""

    sample: int
    n_blocks: int
    group: np.ndarray | None  # index into ToneDetector.groups per block, -1 = none;
    # None = no block held a tone

    def tone_on(self) -> np.ndarray:
        """bool per block: one of the plan's tones is sounding."""
        if self.group is None:
            return np.zeros(self.n_blocks, dtype=bool)
        return self.group >= 0


class ToneDetector:
    """Streaming call-progress tone detector for one country's tone plan.

    Implements the :class:`~drivers.dsp.events.Detector` protocol. Audio is buffered and
    analysed ``batch_samples`` at a time; timestamps are line samples, independent of the
    batching. A ``Tone`` is reported once its pattern has stopped (at most the longest
    off time plus tolerance, and a batch, after its last burst); :meth:`in_progress` shows
    a decided tone before that. ``reported_as`` maps a tone to the name it is reported
    under when the plan makes it identical to an earlier one (PL congestion -> busy).
    :meth:`note_dtmf` tells it of the line's DTMF digits, which end the dial tone.
    """

    def __init__(self, country: str = "DE", *,
                 batch_samples: int = DEFAULT_BATCH_SAMPLES) -> None:
        try:
            self.plan = tone_plan(country)
        except TonePlanError as exc:
            raise CallProgressConfigError(f"ToneDetector: {exc}") from exc
        if batch_samples < 1:
            raise CallProgressConfigError(
                f"ToneDetector: batch_samples {batch_samples} must be >= 1")
        self.groups, self.reported_as = tone_groups(self.plan)
        self._analyser = _BlockAnalyser(self.groups)
        self._batch_samples = batch_samples
        self.reset()

    def reset(self) -> None:
        """Forget buffered audio and every tone in progress."""
        self._trackers = [_BurstTracker() for _ in self.groups]
        self._matchers = [_CadenceMatcher(g) for g in self.groups]
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._next_sample: int | None = None
        self._block_start = 0  # line sample of the first untracked block
        self.last_blocks: BlockTones | None = None
        # blocks analysed by the last batch: (line sample of the first, chosen group per
        # block or None, AC energies), of which the first ``_tracked`` have been walked
        self._analysed: tuple[int, np.ndarray | None, np.ndarray] | None = None
        self._tracked = 0
        self._held: list[_DialRun] = []  # dial tones waiting for DTMF
        self._digits: list[int] = []  # start samples of the DTMF digits noted, ascending

    def note_dtmf(self, sample: int) -> None:
        """A DTMF digit started at line ``sample``. Call it as the line's DTMF detector reports
        digits (at most ``DTMF_WAIT_S`` after the digit's start): a dial tone the digit cuts
        off is reported, and ends where the digit starts."""
        bisect.insort(self._digits, sample)

    def feed(self, sample: int, pcm: np.ndarray, *,
             blocks: tuple[int, np.ndarray, np.ndarray] | None = None,
             track: bool = True) -> list[DetectorEvent]:
        """Consume ``pcm`` (int16, 8 kHz) starting at line sample ``sample``.

        ``blocks``: the same audio already cut into float64 blocks on this detector's grid,
        with their AC energies (a :class:`~drivers.dsp.vad.VoiceDetector`'s ``last_audio``:
        its frames are these blocks): used instead of cutting them again when they are
        exactly what this call analyses. ``track=False``: analyse the batch but leave
        walking its blocks to :meth:`advance` (before the next ``feed``)."""
        events: list[DetectorEvent] = []
        self.last_blocks = None
        if self._next_sample is not None and sample != self._next_sample:
            log.debug("tones: timeline jump %d -> %d", self._next_sample, sample)
            events += self.flush()
        if self._next_sample is None:
            self._block_start = sample
        self._next_sample = sample + len(pcm)
        self._pending.append(np.asarray(pcm))
        self._pending_len += len(pcm)
        if self._pending_len >= self._batch_samples:
            events += self._process(blocks, track=track)
        return events

    def flush(self) -> list[DetectorEvent]:
        """Analyse what is buffered and end every pattern (the stream stops); resets."""
        events: list[DetectorEvent] = list(self._process())
        for tracker, matcher in zip(self._trackers, self._matchers, strict=True):
            closed = tracker.close()
            tones = matcher.step(closed, tracker.state(), self._block_start) + matcher.finish()
            events += self._take(tones, matcher)
        events += self._release(final=True)
        self.reset()
        return sorted(events, key=_event_sample)

    def in_progress(self) -> Tone | None:
        """The decided tone still going on (``end_sample`` = its latest burst end)."""
        tones = [t for m in self._matchers if (t := m.in_progress()) is not None]
        return max(tones, key=_event_sample) if tones else None

    def next_burst_due(self, tone: str) -> int | None:
        """While a decided ``tone`` is in a cadence gap: the latest sample at which its next
        burst may start (later, the pattern has stopped). None otherwise."""
        for matcher in self._matchers:
            if matcher.decided is not None and matcher.decided[0].tone == tone:
                return matcher.next_due()
        return None

    def tone_on(self) -> bool:
        """True when a burst (>= MIN_BURST_S) of one of the plan's tones is under way."""
        return any(t.state().burst_start is not None for t in self._trackers)

    def last_tone_end(self) -> int | None:
        """End sample of the latest tone burst (>= MIN_BURST_S; open ones: so far)."""
        ends = [t.last_burst_end for t in self._trackers if t.last_burst_end is not None]
        return max(ends) if ends else None

    def analysed_to(self) -> int:
        """Line sample up to which audio has been analysed."""
        return self._block_start

    def untracked_blocks(self) -> int:
        """Blocks analysed by a ``feed(..., track=False)`` and not yet walked by
        :meth:`advance`."""
        return 0 if self._analysed is None else len(self._analysed[2]) - self._tracked

    def advance(self, n_blocks: int | None = None) -> list[DetectorEvent]:
        """Walk the next ``n_blocks`` (default: all) of the blocks analysed but not yet
        tracked: the events and the state (:meth:`tone_on`, :meth:`analysed_to`,
        :attr:`last_blocks`, ...) are then those of a detector fed up to their end.

        Lets a caller look at the state within a long batch (the answer detector does, 400
        ms at a time, as it would live) while the numpy work runs on the whole batch."""
        if self._analysed is None:
            return []
        first, chosen, ac = self._analysed
        lo = self._tracked
        hi = len(ac) if n_blocks is None else min(len(ac), lo + n_blocks)
        self._tracked = hi
        if hi == len(ac):
            self._analysed = None
        if hi == lo:
            return []
        group = None
        if chosen is not None:
            group = chosen[lo:hi] if lo or hi < len(chosen) else chosen
            if lo or hi < len(chosen):
                group = group if bool((group >= 0).any()) else None
        ac = ac[lo:hi] if lo or hi < len(ac) else ac
        return self._track(first + lo * BLOCK_LEN, group, ac)

    def _process(self, shared: tuple[int, np.ndarray, np.ndarray] | None = None, *,
                 track: bool = True) -> list[DetectorEvent]:
        events = self.advance()  # what an earlier batch left untracked comes first
        if not self._pending:
            return events
        start = self._block_start
        if (shared is not None and len(self._pending) == 1 and shared[0] == start
                and shared[1].shape[1:] == (BLOCK_LEN,)
                and len(shared[1]) * BLOCK_LEN == len(self._pending[0])):
            self._pending, self._pending_len = [], 0
            chosen, ac = self._analyser.analyse(shared[1], shared[2])
        else:
            buf = np.concatenate(self._pending).astype(np.float64, copy=False)
            n_blocks = len(buf) // BLOCK_LEN
            used = n_blocks * BLOCK_LEN
            self._pending = [buf[used:]] if used < len(buf) else []
            self._pending_len = len(buf) - used
            if n_blocks == 0:
                return events
            chosen, ac = self._analyser.analyse(buf[:used].reshape(n_blocks, BLOCK_LEN))
        self._analysed, self._tracked = (start, chosen, ac), 0
        return events + self.advance() if track else events

    def _track(self, start: int, chosen: np.ndarray | None, ac: np.ndarray,
               ) -> list[DetectorEvent]:
        """Walk the verdicts of the blocks from line sample ``start`` (the next ones)."""
        n_blocks = len(ac)
        self._block_start = start + n_blocks * BLOCK_LEN
        self.last_blocks = BlockTones(start, n_blocks, chosen)
        # digits older than this cannot cut a run that starts in (or reaches into) these
        # blocks: counted from their start, so a batch longer than the memory keeps its own
        horizon = start - round(DIGIT_MEMORY_S * SAMPLE_RATE)
        events: list[DetectorEvent] = []
        for g, (tracker, matcher) in enumerate(zip(self._trackers, self._matchers,
                                                   strict=True)):
            if chosen is None and tracker.idle and not matcher.bursts:
                tracker.skip(n_blocks)  # nothing going on for this group
                continue
            on = chosen == g if chosen is not None else np.zeros(n_blocks, dtype=bool)
            closed = tracker.process(start, on, ac)
            events += self._take(matcher.step(closed, tracker.state(), self._block_start),
                                 matcher)
        events += self._release(final=False, horizon=horizon)
        return sorted(events, key=_event_sample)

    # --- dial tones and DTMF ---------------------------------------------------------------
    def _take(self, tones: list[Tone], matcher: _CadenceMatcher) -> list[Tone]:
        """Hold back dial tones and the matcher's possible ones; return the other tones."""
        self._held += [_DialRun(t.sample, t.end_sample, "dial", t.end_sample + _DTMF_CUT)
                       for t in tones if t.tone == "dial"]
        self._held += matcher.dial_runs
        matcher.dial_runs = []
        return [t for t in tones if t.tone != "dial"]

    def _release(self, *, final: bool, horizon: int | None = None) -> list[Tone]:
        """Report the held runs whose fate is known (all of them when ``final``); forget
        the digits noted before ``horizon`` (a line sample) after that."""
        out: list[Tone] = []
        keep: list[_DialRun] = []
        for run in self._held:
            tone = self._cut_tone(run)
            window_end = run.cut_by
            if tone is None and not (final or self._block_start >= window_end + _DTMF_WAIT
                                     or (self._digits and self._digits[-1] > window_end)):
                keep.append(run)  # a digit may yet be reported
                continue
            if tone is None and run.otherwise is not None:
                tone = Tone(run.start, run.end, run.otherwise)
            if tone is not None:
                out.append(tone)
        self._held = keep
        if horizon is not None:
            del self._digits[:bisect.bisect_left(self._digits, horizon)]
        return out

    def _cut_tone(self, run: _DialRun) -> Tone | None:
        """The dial tone ``run`` is when a noted digit cut it off (it ends at the digit)."""
        first = bisect.bisect_left(self._digits, run.start + _DIAL_CUT_MIN)
        for digit in self._digits[first:]:
            if digit > run.cut_by:
                break
            if run.otherwise == "dial" or digit >= run.end - _DIAL_STOP_LAG:
                log.debug("tones: dial tone %d .. %d cut by a digit at %d", run.start,
                          run.end, digit)
                return Tone(run.start, min(run.end, digit), "dial")
        return None


def _event_sample(event: DetectorEvent) -> int:
    return event.sample
