"""Pure signal generators for the simulated line, 8 kHz.

Every generator returns a float64 numpy array in [-1, 1]; :func:`to_pcm16` turns a mix
into 16-bit PCM with saturation. Nothing here opens a file or reads a clock, and all
randomness comes from the ``numpy.random.Generator`` passed in.

Levels
------
``level_dbfs`` is the RMS level relative to a full-scale sine (AES17 convention): a sine
at ``L`` dBFS has peak amplitude ``10 ** (L / 20)``. For multi-frequency tones the level
applies to each frequency. Telephone levels in dBm0 convert with :func:`dbm0`
(ITU-T G.711: a full-scale sine is +3.14 dBm0, so 0 dBm0 = -3.14 dBFS).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from drivers.toneplan import ToneSpec

SAMPLE_RATE = 8000
DBM0_TO_DBFS = -3.14  # ITU-T G.711 (A-law): maximum sine level is +3.14 dBm0
RAMP_S = 0.002  # rise/fall of tone bursts, keeps splatter out of neighbouring bands

# DTMF, ITU-T Q.23 frequency pairs.
DTMF_ROWS_HZ = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
DTMF_KEYS = ("123A", "456B", "789C", "*0#D")
# Typical telephone sender: low group -10 dBm0, high group 2 dB higher (pre-emphasis);
# ITU-T Q.24 receivers accept the high group up to 4 dB above / 8 dB below the low group.
DTMF_LEVEL_DBM0 = -10.0
DTMF_TWIST_DB = 2.0

# Caller-ID FSK.
BELL202_MARK_HZ, BELL202_SPACE_HZ = 1200.0, 2200.0  # Telcordia GR-30-CORE
V23_MARK_HZ, V23_SPACE_HZ = 1300.0, 2100.0  # ITU-T V.23 / ETSI EN 300 659-1
CID_BAUD = 1200.0  # GR-30-CORE and EN 300 659-1
CID_LEVEL_DBM0 = -13.5  # GR-30-CORE nominal transmit level -13.5 dBm
BELL202_SEIZURE_BITS = 300  # GR-30-CORE: 300 alternating bits (= 30 framed 0x55 bytes)
BELL202_MARK_BITS = 180  # GR-30-CORE: 180 mark bits before the message
V23_SEIZURE_BITS = 300  # EN 300 659-1: 96-315 alternating bits
V23_MARK_BITS = 80  # EN 300 659-1: 55-150 mark bits
DTAS_HZ = (2130.0, 2750.0)  # ETSI EN 300 659-1 dual tone alerting signal
DTAS_S = 0.100  # EN 300 659-1: 88-110 ms
DTAS_LEVEL_DBM0 = -13.5


def dbm0(level_dbm0: float) -> float:
    """dBm0 -> dBFS (ITU-T G.711 A-law reference)."""
    return level_dbm0 + DBM0_TO_DBFS


def peak_amplitude(level_dbfs: float) -> float:
    """Peak amplitude of a sine at ``level_dbfs``."""
    return float(10.0 ** (level_dbfs / 20.0))


def rms_amplitude(level_dbfs: float) -> float:
    """RMS value of a signal at ``level_dbfs`` (full-scale sine reference)."""
    return peak_amplitude(level_dbfs) / np.sqrt(2.0)


def n_samples(duration_s: float) -> int:
    return max(0, round(duration_s * SAMPLE_RATE))


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float [-1, 1] -> int16, saturating."""
    return np.clip(np.rint(x * 32767.0), -32768, 32767).astype(np.int16)


def silence(duration_s: float) -> np.ndarray:
    return np.zeros(n_samples(duration_s))


def noise(duration_s: float, level_dbfs: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``level_dbfs`` RMS."""
    return rng.standard_normal(n_samples(duration_s)) * rms_amplitude(level_dbfs)


# --- tones -------------------------------------------------------------------------
def _phase(freq_hz: float, idx: np.ndarray) -> np.ndarray:
    # (f * n) mod fs keeps the phase exact far into an hour-long timeline.
    return 2.0 * np.pi * np.mod(freq_hz * idx, SAMPLE_RATE) / SAMPLE_RATE


def tone(freqs_hz: Sequence[float], duration_s: float, level_dbfs: float, *,
         start_sample: int = 0, am_hz: float | None = None,
         am_depth: float = 0.0) -> np.ndarray:
    """Sum of sines, each at ``level_dbfs``; optionally amplitude-modulated.

    ``start_sample`` is the position on the tone's own timeline, so consecutive chunks
    join without a phase jump. With ``am_hz`` the envelope is
    ``(1 + am_depth * sin(2 pi am_hz t)) / (1 + am_depth)`` (peak = unmodulated peak).
    """
    idx = start_sample + np.arange(n_samples(duration_s), dtype=np.float64)
    out = np.zeros(idx.size)
    for f in freqs_hz:
        out += np.sin(_phase(f, idx))
    out *= peak_amplitude(level_dbfs)
    if am_hz:
        out *= (1.0 + am_depth * np.sin(_phase(am_hz, idx))) / (1.0 + am_depth)
    return out


def cadence_envelope(cadence: Sequence[tuple[float, float]], n: int,
                     start_sample: int = 0, ramp_s: float = RAMP_S) -> np.ndarray:
    """0..1 on/off envelope of ``cadence`` with raised-cosine edges; () = always on."""
    if not cadence:
        return np.ones(n)
    period_s = sum(on + off for on, off in cadence)
    t = np.mod((start_sample + np.arange(n, dtype=np.float64)) / SAMPLE_RATE, period_s)
    env = np.zeros(n)
    seg_start = 0.0
    for on_s, off_s in cadence:
        x = t - seg_start
        inside = (x >= 0.0) & (x < on_s)
        edge = np.clip(np.minimum(x, on_s - x) / ramp_s, 0.0, 1.0)
        env = np.where(inside, 0.5 - 0.5 * np.cos(np.pi * edge), env)
        seg_start += on_s + off_s
    return env


def cadenced(tone_spec: ToneSpec, cadence: Sequence[tuple[float, float]] | None,
             duration_s: float, level_dbfs: float, *, start_sample: int = 0) -> np.ndarray:
    """A call-progress tone with its cadence (``None`` = the spec's own cadence)."""
    pattern = tone_spec.cadence if cadence is None else tuple(cadence)
    out = tone(tone_spec.freqs_hz, duration_s, level_dbfs, start_sample=start_sample,
               am_hz=tone_spec.am_hz, am_depth=tone_spec.am_depth)
    return out * cadence_envelope(pattern, out.size, start_sample)


def burst(freqs_hz: Sequence[float], duration_s: float, level_dbfs: float) -> np.ndarray:
    """A single tone burst with soft edges."""
    out = tone(freqs_hz, duration_s, level_dbfs)
    return out * cadence_envelope(((duration_s, 0.0),), out.size)


# --- DTMF --------------------------------------------------------------------------
def dtmf_freqs(digit: str) -> tuple[float, float]:
    """(row, column) frequencies of a DTMF key (ITU-T Q.23)."""
    for row, keys in enumerate(DTMF_KEYS):
        col = keys.find(digit.upper())
        if col >= 0 and len(digit) == 1:
            return DTMF_ROWS_HZ[row], DTMF_COLS_HZ[col]
    raise ValueError(f"not a DTMF key: {digit!r} (expected one of 0-9 * # A-D)")


def dtmf(digit: str, on_s: float, level_dbfs: float = dbm0(DTMF_LEVEL_DBM0),
         twist_db: float = 0.0) -> np.ndarray:
    """One DTMF digit; low group at ``level_dbfs``, high group ``twist_db`` above it."""
    low, high = dtmf_freqs(digit)
    return (burst((low,), on_s, level_dbfs)
            + burst((high,), on_s, level_dbfs + twist_db))


def dtmf_string(digits: str, on_s: float, off_s: float,
                level_dbfs: float = dbm0(DTMF_LEVEL_DBM0),
                twist_db: float = DTMF_TWIST_DB) -> np.ndarray:
    """Digits with fixed tone and pause lengths (a pause follows every digit)."""
    gap = silence(off_s)
    parts = [np.concatenate([dtmf(d, on_s, level_dbfs, twist_db), gap]) for d in digits]
    return np.concatenate(parts) if parts else np.zeros(0)


# --- FSK ---------------------------------------------------------------------------
def frame_8n1(data: bytes) -> np.ndarray:
    """Async framing: start bit 0, 8 data bits LSB first, stop bit 1."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)[:, None], axis=1,
                         bitorder="little")
    framed = np.hstack([np.zeros((len(data), 1), np.uint8), bits,
                        np.ones((len(data), 1), np.uint8)])
    return framed.reshape(-1)


def fsk(bits: Sequence[int] | np.ndarray, mark_hz: float, space_hz: float, baud: float,
        level_dbfs: float = dbm0(CID_LEVEL_DBM0)) -> np.ndarray:
    """Continuous-phase binary FSK; bit 1 = mark. Bit edges fall on exact bit times."""
    bit_arr = np.asarray(bits, dtype=np.uint8)
    total = int(np.ceil(bit_arr.size * SAMPLE_RATE / baud))
    which = np.minimum((np.arange(total) * baud / SAMPLE_RATE).astype(np.int64),
                       bit_arr.size - 1)
    freq = np.where(bit_arr[which] == 1, mark_hz, space_hz)
    phase = 2.0 * np.pi * np.concatenate([[0.0], np.cumsum(freq[:-1])]) / SAMPLE_RATE
    return np.sin(phase) * peak_amplitude(level_dbfs)


def _cid_bits(message: bytes, seizure_bits: int, mark_bits: int) -> np.ndarray:
    seizure = np.arange(seizure_bits, dtype=np.uint8) % 2  # 0101..., starts with 0
    marks = np.ones(mark_bits, np.uint8)
    return np.concatenate([seizure, marks, frame_8n1(message)])


def bell202(message: bytes, level_dbfs: float = dbm0(CID_LEVEL_DBM0),
            seizure_bits: int = BELL202_SEIZURE_BITS,
            mark_bits: int = BELL202_MARK_BITS) -> np.ndarray:
    """GR-30 caller-ID burst: channel seizure, mark, the 8N1-framed message."""
    bits = _cid_bits(message, seizure_bits, mark_bits)
    return fsk(bits, BELL202_MARK_HZ, BELL202_SPACE_HZ, CID_BAUD, level_dbfs)


def v23(message: bytes, level_dbfs: float = dbm0(CID_LEVEL_DBM0),
        seizure_bits: int = V23_SEIZURE_BITS, mark_bits: int = V23_MARK_BITS) -> np.ndarray:
    """ETSI EN 300 659-1 V.23 caller-ID burst: seizure, mark, the 8N1-framed message."""
    bits = _cid_bits(message, seizure_bits, mark_bits)
    return fsk(bits, V23_MARK_HZ, V23_SPACE_HZ, CID_BAUD, level_dbfs)


def dt_as(level_dbfs: float = dbm0(DTAS_LEVEL_DBM0)) -> np.ndarray:
    """ETSI EN 300 659-1 dual tone alerting signal (2130 + 2750 Hz, 100 ms)."""
    return burst(DTAS_HZ, DTAS_S, level_dbfs)


# --- speech-like audio -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VoiceProfile:
    """How one synthetic talker sounds."""

    name: str
    f0_hz: float  # mean pitch
    formant_scale: float  # vocal-tract length factor relative to the adult male table
    syllables_per_s: float  # syllabic rate (speech envelope ~4-5 Hz)
    phrase_s: tuple[float, float]  # phrase length range
    pause_s: tuple[float, float]  # pause between phrases


VOICES: dict[str, VoiceProfile] = {
    "dealer": VoiceProfile("dealer", 112.0, 1.0, 4.6, (0.9, 2.8), (0.25, 0.7)),
    "customer": VoiceProfile("customer", 205.0, 1.16, 4.1, (0.8, 2.5), (0.3, 0.9)),
}

# Vowel formants F1-F3 (Hz) of adult male speakers, Peterson & Barney (1952) averages.
VOWEL_FORMANTS_HZ = np.array([
    (270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410),
    (730, 1090, 2440), (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240),
    (640, 1190, 2390), (490, 1350, 1690)], dtype=np.float64)
# Bandwidths kept wide (low Q) so no single harmonic dominates: talk-off margin.
FORMANT_BW_HZ = np.array([240.0, 300.0, 400.0, 550.0])
F4_HZ = 3300.0
STFT_N, STFT_HOP = 256, 64
# Frames filtered at a time. Bounds the spectra alive at once (a 2.8 s phrase held as
# whole spectra took 3.6 MB per line); any size gives the same samples.
STFT_CHUNK_FRAMES = 16
PHONE_BAND_HZ = (300.0, 3400.0)  # ITU-T G.712 telephone channel


def _rosenberg(phase: np.ndarray) -> np.ndarray:
    """Glottal flow pulse shape over one period (Rosenberg 1971, open quotient 0.56)."""
    rise, fall = 0.40, 0.16
    pulse = np.zeros(phase.size)  # closed
    closing = phase < rise + fall
    y = phase[closing] - rise
    y /= fall
    np.clip(y, 0.0, 1.0, out=y)
    pulse[closing] = 1.0 - y**2
    del closing, y
    opening = phase < rise  # overrides the closing branch below rise
    x = phase[opening] / rise
    np.clip(x, 0.0, 1.0, out=x)
    pulse[opening] = 3 * x**2 - 2 * x**3
    return pulse


def _smooth_noise(n: int, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Band-limited random wander, unit-ish amplitude, ``rate_hz`` knots per second."""
    knots = max(2, int(n / SAMPLE_RATE * rate_hz) + 2)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots),
                     rng.standard_normal(knots))


@dataclass(frozen=True, slots=True)
class _Syllables:
    bounds: np.ndarray  # sample index of each syllable start, plus the end
    formants: np.ndarray  # (n_syll, 3) vowel targets, Hz
    gains: np.ndarray  # (n_syll,) linear
    onset_s: np.ndarray  # fricative onset length per syllable (0 = none)


def _plan_syllables(n: int, voice: VoiceProfile, rng: np.random.Generator) -> _Syllables:
    mean_s = 1.0 / voice.syllables_per_s
    lengths = rng.gamma(6.0, mean_s / 6.0, size=int(n / SAMPLE_RATE / mean_s * 1.5) + 2)
    bounds = np.concatenate([[0.0], np.cumsum(lengths)]) * SAMPLE_RATE
    count = max(1, int(np.argmin(np.abs(bounds[1:] - n))) + 1)  # nearest whole syllable
    bounds = bounds[:count + 1] * (n / bounds[count])  # then stretch to fill exactly n
    vowels = VOWEL_FORMANTS_HZ[rng.integers(0, len(VOWEL_FORMANTS_HZ), count)]
    formants = vowels * voice.formant_scale * rng.uniform(0.94, 1.06, (count, 3))
    gains = 10.0 ** (rng.normal(0.0, 3.0, count) / 20.0)
    onset = np.where(rng.random(count) < 0.35, rng.uniform(0.04, 0.1, count), 0.0)
    return _Syllables(bounds.astype(np.int64), formants, gains, onset)


def _envelopes(n: int, syl: _Syllables) -> tuple[np.ndarray, np.ndarray]:
    """Voiced and fricative amplitude envelopes (syllabic rhythm)."""
    voiced, fric = np.zeros(n), np.zeros(n)
    for i in range(len(syl.gains)):
        a, b = int(syl.bounds[i]), int(syl.bounds[i + 1])
        onset = min(int(syl.onset_s[i] * SAMPLE_RATE), (b - a) // 3)
        v0 = a + onset
        length = b - v0
        if length <= 0:
            continue
        x = np.arange(length) / length
        shape = np.minimum(np.clip(x / 0.25, 0, 1), np.clip((1.0 - x) / 0.35, 0, 1))
        voiced[v0:b] = syl.gains[i] * np.sin(0.5 * np.pi * shape) ** 2
        if onset:
            fric[a:v0] = 0.5 * syl.gains[i] * np.hanning(onset)
    return voiced, fric


def _f0_contour(n: int, voice: VoiceProfile, syl: _Syllables,
                rng: np.random.Generator) -> np.ndarray:
    """Pitch in Hz: declination + accents + wander, in log frequency."""
    log_f0 = np.linspace(0.10, -0.12, n)  # declination
    log_f0 += np.interp(np.arange(n), 0.5 * (syl.bounds[:-1] + syl.bounds[1:]),
                        rng.normal(0.0, 0.08, len(syl.gains)))  # accents
    wander = _smooth_noise(n, 3.0, rng)
    wander *= 0.04
    fast = _smooth_noise(n, 40.0, rng)
    fast *= 0.012
    wander += fast
    del fast
    log_f0 += wander
    del wander
    np.exp(log_f0, out=log_f0)
    log_f0 *= voice.f0_hz
    return log_f0


def _formant_gain(tracks: np.ndarray) -> np.ndarray:
    """|H(f)| of a cascade of 2-pole resonators; tracks: (frames, 4) centre frequencies."""
    f = np.fft.rfftfreq(STFT_N, 1.0 / SAMPLE_RATE)[None, :]
    gain = np.ones((tracks.shape[0], f.shape[1]))
    for j in range(tracks.shape[1]):
        fc = tracks[:, j:j + 1]
        gain *= fc**2 / np.sqrt((fc**2 - f**2) ** 2 + (FORMANT_BW_HZ[j] * f) ** 2)
    return gain


def _stft_filter(x: np.ndarray, gains: _FrameGains) -> np.ndarray:
    """Weighted overlap-add filtering with one gain curve per frame.

    Frames are filtered :data:`STFT_CHUNK_FRAMES` at a time. Each output hop is the sum
    of the hop-sized parts of the frames covering it, added in order of the part's place
    in its frame (first part first), the same order for every chunk size.
    """
    overlap = STFT_N // STFT_HOP
    window = np.sqrt(np.hanning(STFT_N + 1)[:-1])
    # Frame f covers x[f * hop - n : f * hop] (zeros outside x); hop h of the output
    # (before the first n samples are dropped) is covered by frames h - overlap + 1 .. h.
    n_frames = (x.size + STFT_N) // STFT_HOP + 1
    out = np.empty(x.size)
    earlier = np.zeros((overlap - 1, overlap, STFT_HOP))  # parts of the frames before
    for start in range(0, n_frames + overlap, STFT_CHUNK_FRAMES):
        stop = min(start + STFT_CHUNK_FRAMES, n_frames + overlap)
        parts = np.zeros((stop - start, overlap, STFT_HOP))  # past the last frame: silence
        last = min(stop, n_frames)
        if last > start:
            span = _zero_padded(x, start * STFT_HOP - STFT_N, (last - 1) * STFT_HOP)
            frames = sliding_window_view(span, STFT_N)[::STFT_HOP]
            spec = np.fft.rfft(frames * window, axis=1) * gains.rows(start, last)
            parts[:last - start] = (np.fft.irfft(spec, STFT_N, axis=1) * window).reshape(
                last - start, overlap, STFT_HOP)
        covering = np.concatenate([earlier, parts])
        hops = np.zeros((stop - start, STFT_HOP))
        for k in range(overlap):
            hops += covering[overlap - 1 - k:overlap - 1 - k + stop - start, k]
        _place(out, hops.ravel(), start * STFT_HOP - STFT_N)
        earlier = covering[-(overlap - 1):]
    out /= 2.0  # sqrt-Hann pair at 75 % overlap sums to 2
    return out


def _zero_padded(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """x[lo:hi] with zeros where the range lies outside x."""
    span = np.zeros(hi - lo)
    a, b = max(lo, 0), min(hi, x.size)
    if b > a:
        span[a - lo:b - lo] = x[a:b]
    return span


def _place(out: np.ndarray, values: np.ndarray, at: int) -> None:
    """out[at:at + len(values)] = values, clipped to out."""
    a, b = max(at, 0), min(at + values.size, out.size)
    if b > a:
        out[a:b] = values[a - at:b - at]


def _band_gain(f: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Smooth band-pass magnitude (telephone channel skirts)."""
    return 1.0 / (1.0 + (low_hz / np.maximum(f, 1.0)) ** 8) / (1.0 + (f / high_hz) ** 16)


@dataclass(frozen=True, slots=True)
class _FrameGains:
    """Per-STFT-frame gain curves of one phrase: formants while voiced, a hiss shape on
    fricatives. The curves are made on demand, a few frames at a time (:meth:`rows`)."""

    tracks: np.ndarray  # (frames, 4) formant centres, Hz
    voiced: np.ndarray  # (frames, 1) voiced envelope at each frame
    fric: np.ndarray  # (frames, 1) fricative envelope at each frame
    hiss: np.ndarray  # (bins,) fricative spectrum, unit RMS
    channel: np.ndarray  # (bins,) telephone band and handset tilt

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Gain curves of frames ``start`` to ``stop`` - 1, shape (frames, bins)."""
        formant = _formant_gain(self.tracks[start:stop])
        formant /= np.sqrt(np.mean(formant**2, axis=1, keepdims=True))
        v, u = self.voiced[start:stop], self.fric[start:stop]
        mix = (v * formant + u * self.hiss[None, :]) / (v + u + 1e-9)
        return mix * self.channel[None, :]


def _frame_gains(n: int, voice: VoiceProfile, syl: _Syllables, voiced_env: np.ndarray,
                 fric_env: np.ndarray) -> _FrameGains:
    centres = 0.5 * (syl.bounds[:-1] + syl.bounds[1:])
    frame_pos = np.arange(n // STFT_HOP + STFT_N // STFT_HOP + 2) * STFT_HOP - STFT_N / 2
    tracks = np.column_stack(
        [np.interp(frame_pos, centres, syl.formants[:, j]) for j in range(3)]
        + [np.full(frame_pos.size, F4_HZ * voice.formant_scale ** 0.5)])
    f = np.fft.rfftfreq(STFT_N, 1.0 / SAMPLE_RATE)
    hiss = 1.0 / (1.0 + ((f - 3000.0) / 900.0) ** 2)
    hiss /= np.sqrt(np.mean(hiss**2))
    idx = np.clip(frame_pos.astype(np.int64), 0, n - 1)
    return _FrameGains(np.minimum(tracks, 3700.0), voiced_env[idx][:, None],
                       fric_env[idx][:, None], hiss,
                       _band_gain(f, *PHONE_BAND_HZ) * _send_tilt(f))


def _send_tilt(f: np.ndarray) -> np.ndarray:
    """Rising handset send response, about +6 dB/octave above 800 Hz (IRS-like)."""
    return np.maximum(f / 800.0, 0.3)


def _soft_limit(x: np.ndarray, ceiling: float = 0.95) -> np.ndarray:
    """Gentle peak limiter (a handset/codec never exceeds full scale)."""
    out = x / ceiling
    np.tanh(out, out=out)
    out *= ceiling
    return out


def _glottal_phase(n: int, voice: VoiceProfile, syl: _Syllables,
                   rng: np.random.Generator) -> np.ndarray:
    """Position within the pitch period, 0..1, sample by sample."""
    phase = np.cumsum(_f0_contour(n, voice, syl, rng))
    phase /= SAMPLE_RATE
    np.mod(phase, 1.0, out=phase)
    return phase


def _glottal_pulses(n: int, voice: VoiceProfile, syl: _Syllables,
                    rng: np.random.Generator) -> np.ndarray:
    """Glottal flow derivative with shimmer, unit RMS."""
    glottal = np.diff(_rosenberg(_glottal_phase(n, voice, syl, rng)), prepend=0.0)
    shimmer = rng.standard_normal(n)
    shimmer *= 0.1
    shimmer += 1.0
    glottal *= shimmer
    del shimmer
    glottal /= np.std(glottal) + 1e-12
    return glottal


def _phrase(n: int, voice: VoiceProfile, rng: np.random.Generator,
            level_dbfs: float) -> np.ndarray:
    """One phrase: a run of syllables with a falling intonation.

    Phrase-long arrays (175 kB each for a 2.8 s phrase) are made as late as possible,
    updated in place and dropped as soon as they are used: the simulated lines count
    against the daemon's memory budget. The envelopes draw no random numbers, so making
    them after the pulses keeps the generator's order and the samples.
    """
    syl = _plan_syllables(n, voice, rng)
    source = _glottal_pulses(n, voice, syl, rng)
    voiced_env, fric_env = _envelopes(n, syl)
    gains = _frame_gains(n, voice, syl, voiced_env, fric_env)
    active = (voiced_env + fric_env) > 0.05
    source *= voiced_env
    noise_env = 0.06 * voiced_env  # breath while voiced, hiss on fricatives
    noise_env += 0.2 * fric_env
    del voiced_env, fric_env
    breath = rng.standard_normal(n)
    breath *= noise_env
    del noise_env
    source += breath
    del breath
    out = _stft_filter(source, gains)
    del source
    rms = np.sqrt(np.mean(out[active] ** 2)) if active.any() else 1.0
    gain_db = rng.normal(0.0, 1.5)
    out /= rms + 1e-12
    out *= rms_amplitude(level_dbfs + gain_db)
    return _soft_limit(out)


MIN_PHRASE_S = 0.3


def speech_blocks(n: int, voice: VoiceProfile | str, rng: np.random.Generator,
                  level_dbfs: float) -> Iterator[np.ndarray]:
    """Speech-like audio of exactly ``n`` samples, phrase by phrase (small blocks).

    ``level_dbfs`` is the active speech level (RMS over the sounding parts). Phrases are
    separated by pauses; the first phrase starts at sample 0.
    """
    profile = VOICES[voice] if isinstance(voice, str) else voice
    remaining, first = n, True
    while remaining > 0:
        if not first:
            pause = min(remaining, n_samples(rng.uniform(*profile.pause_s)))
            yield np.zeros(pause)
            remaining -= pause
        first = False
        length = min(remaining, n_samples(rng.uniform(*profile.phrase_s)))
        if remaining - length < n_samples(MIN_PHRASE_S):
            length = remaining  # absorb a tail too short for a phrase
        if length < n_samples(MIN_PHRASE_S):
            yield np.zeros(length)
        elif length > 0:
            yield _phrase(length, profile, rng, level_dbfs)
        remaining -= length


def speech_like(duration_s: float, voice: VoiceProfile | str, rng: np.random.Generator,
                level_dbfs: float = -20.0) -> np.ndarray:
    """Speech-like audio: voiced syllables with a wandering pitch, formant-shaped
    harmonics, a 4-5 Hz syllabic envelope, fricative noise bursts and pauses.

    It has no steady pure tones, so tone and DTMF detectors must stay silent on it.
    """
    n = n_samples(duration_s)
    blocks = list(speech_blocks(n, voice, rng, level_dbfs))
    return np.concatenate(blocks) if blocks else np.zeros(0)
