"""Test vectors for the DTMF and caller-ID detectors, built from the standards' numbers.

In the manner of the Mitel/Bellcore receiver test tapes: every signal is synthesised here
from first principles (frequencies, levels, timing, message layout), independently of the
detectors and of the line simulator, so that each cross-checks the other.

Levels are in dBFS per tone: 0 dBFS is a sine of peak 32767 (full scale).
"""

from __future__ import annotations

import numpy as np

RATE = 8000
FULL_SCALE = 32767.0

ROW_HZ = (697.0, 770.0, 852.0, 941.0)  # ITU-T Q.23
COL_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")

BELL202 = (1200.0, 2200.0)  # mark, space (Telcordia GR-30)
V23 = (1300.0, 2100.0)  # mark, space (ETSI EN 300 659-1 / ITU-T V.23)
BAUD = 1200.0
DT_AS_HZ = (2130.0, 2750.0)  # ETSI EN 300 659-1 dual-tone alerting signal


def amplitude(level_dbfs: float) -> float:
    return FULL_SCALE * 10.0 ** (level_dbfs / 20.0)


def samples(duration_s: float) -> int:
    return round(duration_s * RATE)


def silence(duration_s: float) -> np.ndarray:
    return np.zeros(samples(duration_s))


def tone(freqs_hz: tuple[float, ...], levels_dbfs: tuple[float, ...], duration_s: float,
         phases: tuple[float, ...] | None = None) -> np.ndarray:
    t = np.arange(samples(duration_s)) / RATE
    phases = phases or (0.0,) * len(freqs_hz)
    out = np.zeros(len(t))
    for f, lvl, ph in zip(freqs_hz, levels_dbfs, phases, strict=True):
        out += amplitude(lvl) * np.sin(2 * np.pi * f * t + ph)
    return out


def dtmf_freqs(digit: str) -> tuple[float, float]:
    for r, keys in enumerate(KEYS):
        if digit in keys:
            return ROW_HZ[r], COL_HZ[keys.index(digit)]
    raise ValueError(f"not a DTMF digit: {digit!r}")


def dtmf(digit: str, duration_s: float = 0.07, level_dbfs: float = -10.0,
         twist_db: float = 0.0, row_offset: float = 0.0, col_offset: float = 0.0,
         phases: tuple[float, float] = (0.3, 1.9)) -> np.ndarray:
    """One DTMF tone pair. ``twist_db`` > 0: row tone louder (normal twist), < 0: reverse.

    ``level_dbfs`` is the louder tone's level; offsets are relative (0.015 = +1.5 %).
    """
    f_row, f_col = dtmf_freqs(digit)
    row_lvl = level_dbfs - max(0.0, -twist_db)
    col_lvl = level_dbfs - max(0.0, twist_db)
    return tone((f_row * (1 + row_offset), f_col * (1 + col_offset)),
                (row_lvl, col_lvl), duration_s, phases)


def dtmf_string(digits: str, tone_s: float = 0.07, gap_s: float = 0.07,
                level_dbfs: float = -10.0, lead_s: float = 0.1,
                trail_s: float = 0.1) -> np.ndarray:
    parts = [silence(lead_s)]
    for d in digits:
        parts += [dtmf(d, tone_s, level_dbfs), silence(gap_s)]
    parts.append(silence(trail_s))
    return np.concatenate(parts)


def white_noise(n: int, rms: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, n)


def with_snr(signal: np.ndarray, snr_db: float, seed: int,
             reference: np.ndarray | None = None) -> np.ndarray:
    """Add white noise at ``snr_db`` below the power of ``reference`` (default: signal)."""
    ref = signal if reference is None else reference
    rms = np.sqrt(np.mean(ref * ref) / 10.0 ** (snr_db / 10.0))
    return signal + white_noise(len(signal), rms, seed)


def to_int16(x: np.ndarray) -> np.ndarray:
    if np.max(np.abs(x)) > FULL_SCALE:
        raise ValueError("test vector clips")
    return np.round(x).astype(np.int16)


def music_like(duration_s: float, seed: int, level_dbfs: float = -12.0) -> np.ndarray:
    """Chords and arpeggios of harmonic notes (equal temperament, 1/k partials, decay).

    Notes are drawn near the DTMF bands on purpose: F5 (698.5 Hz) and F#6 (1480 Hz) lie
    within 0.2 % of 697 and 1477 Hz.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros(samples(duration_s))
    pos = 0
    while pos < len(out):
        n = samples(float(rng.choice([0.06, 0.12, 0.25])))
        chord = rng.integers(70, 92, size=int(rng.integers(1, 4)))  # MIDI notes 70..91
        if rng.random() < 0.3:
            chord = np.array([77, 90])  # F5 + F#6: the DTMF pair of digit 3
        seg = np.zeros(n)
        t = np.arange(n) / RATE
        for note in chord:
            f0 = 440.0 * 2.0 ** ((int(note) - 69) / 12.0)
            for k in range(1, 8):
                if k * f0 < RATE / 2:
                    seg += np.sin(2 * np.pi * k * f0 * t + rng.random() * 6.28) / k
        seg *= np.exp(-t * float(rng.uniform(1.0, 6.0)))
        end = min(len(out), pos + n)
        out[pos:end] += seg[: end - pos]
        pos = end
    return out / np.max(np.abs(out)) * amplitude(level_dbfs)


# --- FSK caller ID -----------------------------------------------------------------

def uart_bits(data: bytes) -> list[int]:
    """8N1, LSB first: start bit 0 (space), 8 data bits, stop bit 1 (mark)."""
    bits: list[int] = []
    for byte in data:
        bits += [0, *((byte >> i) & 1 for i in range(8)), 1]
    return bits


def checksum(body: bytes) -> int:
    """Two's complement of the byte sum (GR-30 / EN 300 659-1)."""
    return (-sum(body)) & 0xFF


def sdmf(when: str, number: str) -> bytes:
    """Bell SDMF (type 0x04): MMDDHHMM then the number or 'O'/'P'."""
    payload = (when + number).encode("ascii")
    body = bytes([0x04, len(payload)]) + payload
    return body + bytes([checksum(body)])


def mdmf(params: list[tuple[int, bytes]], msg_type: int = 0x80) -> bytes:
    """MDMF / ETSI call-setup message from (parameter type, value) pairs."""
    payload = b"".join(bytes([ptype, len(value)]) + value for ptype, value in params)
    body = bytes([msg_type, len(payload)]) + payload
    return body + bytes([checksum(body)])


def fsk(bits: list[int], mark_space_hz: tuple[float, float], level_dbfs: float = -12.0,
        baud: float = BAUD, phase: float = 0.0) -> np.ndarray:
    """Phase-continuous FSK of ``bits`` (1 = mark) with fractional bit timing."""
    n = int(np.ceil(len(bits) * RATE / baud))
    bit_index = np.minimum((np.arange(n) * baud / RATE).astype(int), len(bits) - 1)
    mark, space = mark_space_hz
    freq = np.where(np.asarray(bits)[bit_index] == 1, mark, space)
    return amplitude(level_dbfs) * np.sin(phase + 2 * np.pi * np.cumsum(freq) / RATE)


def fsk_with_doubts(bits: list[int], doubts: dict[int, float],
                    mark_space_hz: tuple[float, float], level_dbfs: float = -12.0,
                    baud: float = BAUD) -> np.ndarray:
    """Phase-continuous FSK of ``bits`` where bit i of ``doubts`` also carries the other
    tone at relative amplitude doubts[i]: 0.9 makes that decision doubtful, not wrong."""
    x = fsk(bits, mark_space_hz, level_dbfs, baud)
    t = np.arange(len(x)) / RATE
    for i, rel in doubts.items():
        lo, hi = round(i * RATE / baud), round((i + 1) * RATE / baud)
        other = mark_space_hz[1] if bits[i] else mark_space_hz[0]
        x[lo:hi] += rel * amplitude(level_dbfs) * np.sin(2 * np.pi * other * t[lo:hi])
    return x


def cid_bits(message: bytes, seizure_bits: int = 300, mark_bits: int = 180) -> list[int]:
    """Channel seizure (alternating 0/1), mark, then the 8N1 message, then 2 mark bits."""
    seizure = [i % 2 for i in range(seizure_bits)]
    return seizure + [1] * mark_bits + uart_bits(message) + [1, 1]


def cid_burst(message: bytes, mark_space_hz: tuple[float, float] = BELL202,
              seizure_bits: int = 300, mark_bits: int = 180, level_dbfs: float = -12.0,
              lead_s: float = 0.2, trail_s: float = 0.2) -> np.ndarray:
    bits = cid_bits(message, seizure_bits, mark_bits)
    return np.concatenate([silence(lead_s), fsk(bits, mark_space_hz, level_dbfs),
                           silence(trail_s)])


def dt_as(level_dbfs: float = -15.0, duration_s: float = 0.1) -> np.ndarray:
    return tone(DT_AS_HZ, (level_dbfs, level_dbfs), duration_s)
