"""Voice activity detector: energy over a tracked noise floor, with a tonality guard.

Signal path (numpy per batch, the spectra ``SPECTRUM_ROWS`` windows at a time; Python
only walks the edges of active runs):

1. Frames of ``FRAME_LEN`` = 160 samples (20 ms). Each frame's AC energy in dBFS (0 dBFS
   = full-scale sine).
2. Tonality: the power spectrum of a 40 ms Hann window (the frame and the one before it,
   bins 25 Hz apart) above 100 Hz; the *share* of its two strongest peaks (+-2 bins each)
   in the total. A steady single or dual tone (dial, busy, DTMF, an AM tone whose
   sidebands sit within 2 bins) keeps >= 0.9 of its energy there; speech spreads over
   many harmonics (median 0.45-0.65, 95th percentile ~0.85). A frame is *tonal* when the
   window ending with it or the next window has a share >= ``TONAL_SHARE`` (the ragged
   first frame of a burst only shows in the window after it).
3. Noise floor: the minimum energy of the non-tonal frames seen in the last
   ``FLOOR_WINDOW_S`` up to the frame judged (follows a rising floor within that time, a
   falling one at once), kept within ``FLOOR_MIN_DBFS`` .. ``FLOOR_MAX_DBFS``.
4. A frame is *active* when it is >= ``ON_MARGIN_DB`` above the floor, >=
   ``MIN_VOICE_DBFS`` and not tonal.
5. Segments: active frames closer than ``HANGOVER_FRAMES`` join one segment; a segment
   with >= ``MIN_VOICE_FRAMES`` active frames is reported as
   ``Voice(sample, end_sample)``: ``sample`` the start of its first active frame,
   ``end_sample`` the end of its last active frame, once the hangover has run out.

Frame decisions lag the audio by one frame (the tonality looks one window ahead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from drivers.dsp.events import SAMPLE_RATE, DetectorEvent, Voice
from drivers.dsp.runs import true_runs
from drivers.dsp.tones import CallProgressConfigError

log = logging.getLogger(__name__)

FRAME_LEN = 160  # 20 ms
WINDOW_LEN = 2 * FRAME_LEN  # 40 ms spectrum: bins 25 Hz apart
FULL_SCALE_POWER = 32767.0**2 / 2.0  # mean square of a full-scale sine (0 dBFS)
LOW_CUT_BINS = 4  # ignore < 100 Hz (hum, DC, the line's low-frequency thumps)
PEAK_HALF_WIDTH = 2  # bins each side of a peak: Hann main lobe, AM sidebands <= 50 Hz
TONAL_SHARE = 0.85  # two peaks hold this share: a steady tone (speech: 95th pct ~0.85)
ON_MARGIN_DB = 9.0  # active above the floor (white noise frames: sigma 0.5 dB)
MIN_VOICE_DBFS = -50.0
FLOOR_WINDOW_S = 3.0
FLOOR_FRAMES = round(FLOOR_WINDOW_S * SAMPLE_RATE / FRAME_LEN)
FLOOR_MIN_DBFS = -70.0
FLOOR_MAX_DBFS = -30.0  # a floor above this is speech without pauses, not noise
HANGOVER_FRAMES = 10  # 200 ms of inactivity ends a segment
MIN_VOICE_FRAMES = 3  # shorter segments (a click, < 60 ms) are not reported
DEFAULT_BATCH_SAMPLES = 3200  # 400 ms: numpy call overhead per line stays small
SPECTRUM_ROWS = 512  # windows transformed at a time: 500 frames (10 s) at once
KEEP_AUDIO_SAMPLES = 1 << 17  # a batch's audio buffer up to 16 s (1 MB) is kept for the next


@dataclass(frozen=True, slots=True)
class FrameActivity:
    """Per-frame decisions of one analysed stretch: frame i covers
    ``sample + i * FRAME_LEN`` .. ``+ FRAME_LEN``."""

    sample: int
    active: np.ndarray  # bool: voice-like energy in this frame
    tonal: np.ndarray  # bool: a steady tone in this frame


# The whole frames of the latest analysed batch, for a detector on the same 20 ms grid:
# (line sample of frame 0, float64 frames (n, FRAME_LEN), their AC energies as
# :meth:`_Spectra.frame_ac` gives them). The frames are valid until the next ``feed``.
FrameAudio = tuple[int, np.ndarray, np.ndarray]


class _Spectra:
    """Frame energy and spectral peak share (vectorised over frames).

    The windowed frames and the power spectra live in work buffers kept from call to call
    (fresh megabytes for every file batch cost more in page faults than the FFT itself);
    the windows go through ``SPECTRUM_ROWS`` at a time, so a batch of any length needs no
    more memory than that.
    """

    def __init__(self) -> None:
        self._window = np.hanning(WINDOW_LEN + 2)[1:-1]
        self._bins = WINDOW_LEN // 2 + 1
        self._width = self._bins + 2 * PEAK_HALF_WIDTH  # a power row padded with zeros
        self._offsets = np.arange(2 * PEAK_HALF_WIDTH + 1)  # a peak's bins, padded index
        self._pair = np.arange(2)  # a window's frames: the one before and its own
        self._pair_sum = np.ones(2)
        self._rows = 0
        self._grow(0)

    def _grow(self, rows: int) -> None:
        """Work buffers for ``rows`` windows (at most SPECTRUM_ROWS)."""
        self._rows = rows
        self._windowed = np.empty((rows, WINDOW_LEN))
        # power at [PEAK_HALF_WIDTH, PEAK_HALF_WIDTH + bins) of each row; only zeros are
        # ever written to the padding and to the bins below LOW_CUT_BINS
        self._power = np.zeros((rows, self._width))
        # a peak's bins in the flattened power: core bins argmax-2 .. argmax+2 are padded
        # bins argmax .. argmax+4
        self._peak_base = (np.arange(rows) * self._width)[:, None] + self._offsets

    @staticmethod
    def frame_ac(frames: np.ndarray) -> np.ndarray:
        """AC energy of each frame: its sum of squares less its sum squared / FRAME_LEN."""
        sums = frames.sum(axis=1)
        return np.einsum("ij,ij->i", frames, frames) - sums * sums / FRAME_LEN

    @staticmethod
    def energy_db(ac: np.ndarray) -> np.ndarray:
        """dBFS of the frames' AC energies (:meth:`frame_ac`)."""
        return 10.0 * np.log10(ac / FRAME_LEN / FULL_SCALE_POWER + 1e-12)

    def share(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Share of the two strongest spectral peaks (+-PEAK_HALF_WIDTH bins each) in the
        power above LOW_CUT_BINS of the Hann-windowed 40 ms windows ``frames[i]``,
        ``frames[i + 1]`` for each ``i`` in ``rows`` (``frames``: float64, C order)."""
        shares = np.empty(len(rows))
        if self._rows < min(len(rows), SPECTRUM_ROWS):
            self._grow(min(len(rows), SPECTRUM_ROWS))
        for start in range(0, len(rows), SPECTRUM_ROWS):
            chunk = rows[start:start + SPECTRUM_ROWS]
            shares[start:start + len(chunk)] = self._share(frames, chunk)
        return shares

    def _share(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        n = len(rows)
        windowed = self._windowed[:n]
        # the rows are valid: "clip" only spares the copy that "raise" makes of ``out``
        np.take(frames, rows[:, None] + self._pair, axis=0,
                out=windowed.reshape(n, 2, FRAME_LEN), mode="clip")
        windowed *= self._window
        parts = np.fft.rfft(windowed, axis=1).view(np.float64)
        np.multiply(parts, parts, out=parts)  # re^2, im^2, re^2, im^2, ...
        power = self._power[:n]
        core = power[:, PEAK_HALF_WIDTH:PEAK_HALF_WIDTH + self._bins]
        # re^2 + im^2 of each bin: a product with (1, 1) adds each pair with the one
        # rounding of a plain sum, faster than adding two stride-2 views
        np.matmul(parts.reshape(n, self._bins, 2)[:, LOW_CUT_BINS:], self._pair_sum,
                  out=core[:, LOW_CUT_BINS:])
        total = core.sum(axis=1) + 1e-9
        flat = power.reshape(-1)
        peak = self._peak_base[:n] + self._argmax(power)
        share = flat[peak].sum(axis=1)
        flat[peak] = 0.0
        peak = self._peak_base[:n] + self._argmax(power)
        share += flat[peak].sum(axis=1)
        return share / total

    @staticmethod
    def _argmax(power: np.ndarray) -> np.ndarray:
        """Per padded power row: the core bin that ``argmax`` of its core bins gives, as a
        column. Taken over the whole (contiguous) row: argmax of the core view would copy
        it first. The padding is zero and powers are >= 0, so a positive maximum is first
        met in the core; a row of zeros gives padded bin 0, i.e. core bin 0 as well."""
        at = power.argmax(axis=1)
        np.maximum(at, PEAK_HALF_WIDTH, out=at)
        at -= PEAK_HALF_WIDTH
        return at[:, None]


class VoiceDetector:
    """Streaming voice activity detector (the :class:`~drivers.dsp.events.Detector`
    protocol); reports finished ``Voice(sample, end_sample)`` segments.

    Audio is analysed ``batch_samples`` at a time. :attr:`last_frames` holds the frame
    decisions of the latest analysis (for the answer detector), :attr:`last_audio` its
    frames (:data:`FrameAudio`), :meth:`active_since` the start of a segment still in
    progress.
    """

    def __init__(self, *, batch_samples: int = DEFAULT_BATCH_SAMPLES) -> None:
        if batch_samples < 1:
            raise CallProgressConfigError(
                f"VoiceDetector: batch_samples {batch_samples} must be >= 1")
        self._batch_samples = batch_samples
        self._spectra = _Spectra()
        self._work = np.empty(0)  # float64 audio of the batch being analysed (scratch)
        self.reset()

    def reset(self) -> None:
        """Forget buffered audio, the noise floor and any segment in progress."""
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._next_sample: int | None = None
        self._frame_start = 0  # line sample of the next unanalysed frame
        self._prev = np.zeros(FRAME_LEN)
        self._held: tuple[float, bool] | None = None  # newest frame: energy, tonal window
        # non-tonal energies (dBFS; inf for tonal frames) of the frames before the next one
        self._quiet_history = np.full(FLOOR_FRAMES - 1, np.inf)
        self._seg_start: int | None = None
        self._seg_end = 0
        self._seg_frames = 0
        self._off_frames = HANGOVER_FRAMES + 1
        self.last_frames: FrameActivity | None = None
        self.last_audio: FrameAudio | None = None

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        """Consume ``pcm`` (int16, 8 kHz) starting at line sample ``sample``."""
        events: list[DetectorEvent] = []
        if self._next_sample is not None and sample != self._next_sample:
            log.debug("vad: timeline jump %d -> %d", self._next_sample, sample)
            events += self.flush()
        if self._next_sample is None:
            self._frame_start = sample
        self._next_sample = sample + len(pcm)
        self._pending.append(np.asarray(pcm))
        self._pending_len += len(pcm)
        self.last_frames = None
        self.last_audio = None
        if self._pending_len >= self._batch_samples:
            events += self._process()
        return events

    def flush(self) -> list[DetectorEvent]:
        """Analyse what is buffered, end the segment in progress, and reset."""
        if self._next_sample is not None:  # silence to a whole frame, and one more frame,
            # lets the newest audio be judged
            self._pending.append(np.zeros(-self._pending_len % FRAME_LEN + FRAME_LEN))
        events = self._process()
        events += self._close()
        self.reset()
        return events

    def active_since(self) -> int | None:
        """Start sample of a confirmed voice segment still in progress, else None."""
        if self._seg_start is not None and self._seg_frames >= MIN_VOICE_FRAMES:
            return self._seg_start
        return None

    # --- analysis ------------------------------------------------------------------------
    def _process(self) -> list[DetectorEvent]:
        if not self._pending:
            return []
        # counted from the pieces: _pending_len leaves out the silence flush appends
        n = sum(len(piece) for piece in self._pending) // FRAME_LEN
        if n == 0:
            return []
        used = n * FRAME_LEN
        # the frame before the batch, then the batch's whole frames (float64)
        flat = self._audio(FRAME_LEN + used)
        flat[:FRAME_LEN] = self._prev
        pos, rest = FRAME_LEN, []
        for piece in self._pending:
            take = min(len(piece), len(flat) - pos)
            flat[pos:pos + take] = piece[:take]
            pos += take
            if take < len(piece):
                rest.append(piece[take:])
        self._pending = [np.concatenate(rest).astype(np.float64)] if rest else []
        self._pending_len = sum(len(piece) for piece in self._pending)
        frames = flat.reshape(n + 1, FRAME_LEN)  # frames[i + 1] is the batch's frame i
        ac = self._spectra.frame_ac(frames[1:])
        self.last_audio = (self._frame_start, frames[1:], ac)
        energy = self._spectra.energy_db(ac)
        core = self._tonal_windows(frames, energy)
        self._prev = frames[-1].copy()
        # a frame is tonal when the window ending with it or the next one is: the ragged
        # first frame of a burst only shows in the window that follows. So the newest
        # frame waits for the next batch, and the one held from the last batch joins now.
        first_sample = self._frame_start
        if self._held is not None:
            energy = np.concatenate([[self._held[0]], energy])
            core = np.concatenate([[self._held[1]], core])
            first_sample -= FRAME_LEN
        self._frame_start += used
        self._held = (float(energy[-1]), bool(core[-1]))
        if len(energy) < 2:
            return []
        tonal = core[:-1] | core[1:]
        active = self._active(energy[:-1], tonal)
        self.last_frames = FrameActivity(first_sample, active, tonal)
        return self._segments(first_sample, active)

    def _audio(self, size: int) -> np.ndarray:
        """A float64 work array of ``size`` samples; one up to KEEP_AUDIO_SAMPLES is reused
        by the next batch (a fresh one per batch costs its page faults every time)."""
        if len(self._work) >= size:
            return self._work[:size]
        if size > KEEP_AUDIO_SAMPLES:
            return np.empty(size)
        # rounded up to 4096 samples: the same batch with a different leftover still fits
        self._work = np.empty(min(-(-size // 4096) * 4096, KEEP_AUDIO_SAMPLES))
        return self._work[:size]

    def _tonal_windows(self, frames: np.ndarray, energy: np.ndarray) -> np.ndarray:
        """Per frame: its 40 ms window (previous frame + this one) holds a steady tone.
        ``frames``: the frame before the batch, then the batch's frames."""
        core = np.zeros(len(energy), dtype=bool)
        # the floor can only fall to the batch's quietest frame: frames below this bound
        # stay inactive whatever their spectrum; only the windows that decide whether a
        # frame above it is tonal (its own and the next) are transformed
        bound = max(min(self._floor(), float(energy.min()), FLOOR_MAX_DBFS) + ON_MARGIN_DB,
                    MIN_VOICE_DBFS)
        loud = energy >= bound
        held_loud = self._held is not None and self._held[0] >= bound
        need = np.flatnonzero(loud | np.concatenate([[held_loud], loud[:-1]]))
        if len(need):
            core[need] = self._spectra.share(frames, need) >= TONAL_SHARE
        return core

    def _active(self, energy: np.ndarray, tonal: np.ndarray) -> np.ndarray:
        """Frames above the floor: the lowest non-tonal energy of the FLOOR_FRAMES frames up
        to and including each frame (the same at any batch size)."""
        quiet = np.concatenate([self._quiet_history, np.where(tonal, np.inf, energy)])
        self._quiet_history = quiet[len(quiet) - (FLOOR_FRAMES - 1):]
        # quiet[i:i + FLOOR_FRAMES] for each frame i: a read-only view (no copy)
        lowest = as_strided(quiet, (len(energy), FLOOR_FRAMES), quiet.strides * 2,
                            writeable=False).min(axis=1)
        floor = np.clip(lowest, FLOOR_MIN_DBFS, FLOOR_MAX_DBFS)
        return (energy >= floor + ON_MARGIN_DB) & (energy >= MIN_VOICE_DBFS) & ~tonal

    def _floor(self) -> float:
        """Lowest non-tonal frame energy of the last FLOOR_FRAMES - 1 frames (inf: none)."""
        return float(self._quiet_history.min())

    # --- segments ------------------------------------------------------------------------
    def _segments(self, first_sample: int, active: np.ndarray) -> list[DetectorEvent]:
        events: list[DetectorEvent] = []
        prev = -1 - self._off_frames
        for a, end in true_runs(active):
            b = end - 1  # the run's last frame
            if self._seg_start is None or a - prev - 1 > HANGOVER_FRAMES:
                events += self._close()
                self._seg_start = first_sample + a * FRAME_LEN
            self._seg_frames += b + 1 - a
            self._seg_end = first_sample + (b + 1) * FRAME_LEN
            prev = b
        n = len(active)
        self._off_frames = n - 1 - prev if prev >= 0 else self._off_frames + n
        if self._seg_start is not None and self._off_frames > HANGOVER_FRAMES:
            events += self._close()
        return events

    def _close(self) -> list[DetectorEvent]:
        start, frames = self._seg_start, self._seg_frames
        self._seg_start, self._seg_frames = None, 0
        if start is None or frames < MIN_VOICE_FRAMES:
            return []
        log.debug("vad: voice %d .. %d (%d frames)", start, self._seg_end, frames)
        return [Voice(start, self._seg_end)]


