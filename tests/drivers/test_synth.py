"""Signal generators and caller-ID encoders, checked by independent decoders.

The FSK demodulator and DTMF detector below are deliberately small and written from the
standards (GR-30 / V.23 tone pairs, 8N1 framing, Q.23 pairs, Q.24-style checks); the
external tools (minimodem, multimon-ng) decode the same signals a second time.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import wave
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.sim import callerid, synth
from drivers.toneplan import ToneSpec

FS = 8000
ROWS = (697.0, 770.0, 852.0, 941.0)
COLS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")


# --- independent decoders -----------------------------------------------------------
def fsk_bits(x: np.ndarray, mark_hz: float, space_hz: float, baud: float = 1200.0
             ) -> np.ndarray:
    """Per-sample decision 1 = mark, from one-bit-long quadrature correlators."""
    n = np.arange(x.size)
    width = round(FS / baud)
    kernel = np.ones(width)

    def power(f: float) -> np.ndarray:
        i = np.convolve(x * np.cos(2 * np.pi * f * n / FS), kernel, "same")
        q = np.convolve(x * np.sin(2 * np.pi * f * n / FS), kernel, "same")
        return i * i + q * q

    return (power(mark_hz) > power(space_hz)).astype(np.int8)


def uart_bytes(decision: np.ndarray, active: np.ndarray, baud: float = 1200.0) -> bytes:
    """8N1 async receiver on the per-sample decisions (only where a carrier is present)."""
    spb = FS / baud
    out = bytearray()
    i = 1
    while i < decision.size - int(10 * spb):
        if not (active[i] and decision[i - 1] == 1 and decision[i] == 0):
            i += 1
            continue
        centres = (i + (np.arange(10) + 0.5) * spb).astype(int)
        bits = decision[centres]
        if bits[0] == 0 and bits[9] == 1:
            out.append(int(sum(int(b) << k for k, b in enumerate(bits[1:9]))))
            i = int(centres[9])
        else:
            i += 1
    return bytes(out)


def decode_fsk(x: np.ndarray, mark_hz: float, space_hz: float) -> bytes:
    x = np.concatenate([x, np.zeros(80)])  # the line goes quiet after the burst
    envelope = np.convolve(np.abs(x), np.ones(40) / 40, "same")
    active = envelope > 0.1 * envelope.max()
    return uart_bytes(fsk_bits(x, mark_hz, space_hz), active)


def goertzel_power(block: np.ndarray, freq_hz: float) -> float:
    n = np.arange(block.size)
    return float(np.abs(np.dot(block, np.exp(-2j * np.pi * freq_hz * n / FS))) ** 2)


def dtmf_hits(x: np.ndarray, block: int = 102) -> list[str | None]:
    """Q.24-style test of each block: strongest row and column, 8 dB above the others in
    their group, twist within +4/-8 dB, and together most of the block's energy."""
    blocks = x[: x.size // block * block].reshape(-1, block)
    n = np.arange(block)[:, None]
    basis = np.exp(-2j * np.pi * np.array(ROWS + COLS)[None, :] * n / FS)
    power = np.abs(blocks @ basis) ** 2
    rows, cols = power[:, :4], power[:, 4:]
    r, c = rows.argmax(axis=1), cols.argmax(axis=1)
    row_max, col_max = rows.max(axis=1), cols.max(axis=1)
    row_next = np.sort(rows, axis=1)[:, -2]
    col_next = np.sort(cols, axis=1)[:, -2]
    energy = np.sum(blocks**2, axis=1) * block / 2 + 1e-12
    ok = ((row_max > 6.3 * row_next) & (col_max > 6.3 * col_next)
          & (col_max >= 10 ** -0.8 * row_max) & (col_max <= 10 ** 0.4 * row_max)
          & (row_max + col_max > 0.7 * energy) & (energy > 1e-6 * block**2))
    return [KEYS[i][j] if hit else None for i, j, hit in zip(r, c, ok, strict=True)]


def detect_dtmf(x: np.ndarray, block: int = 102) -> list[tuple[int, str]]:
    """Digits as (start sample, key): two equal hits in a row start a digit, a miss ends it."""
    digits: list[tuple[int, str]] = []
    previous, current = None, None
    for k, hit in enumerate(dtmf_hits(x, block)):
        if hit is not None and hit == previous and current is None:
            digits.append(((k - 1) * block, hit))
            current = hit
        if hit != current:
            current = None
        previous = hit
    return digits


def peak_freqs(x: np.ndarray, count: int, pad: int = 8) -> list[float]:
    """The ``count`` strongest local maxima of the spectrum, Hz, ascending."""
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size), x.size * pad))
    freqs = np.fft.rfftfreq(x.size * pad, 1 / FS)
    local = np.flatnonzero((spec[1:-1] > spec[:-2]) & (spec[1:-1] >= spec[2:])) + 1
    best = local[np.argsort(spec[local])[-count:]]
    return sorted(float(freqs[k]) for k in best)


def write_wav(path: Path, x: np.ndarray, pad_s: float = 0.3) -> Path:
    z = np.concatenate([np.zeros(int(pad_s * FS)), x, np.zeros(int(pad_s * FS))])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(FS)
        w.writeframes(synth.to_pcm16(z).tobytes())
    return path


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def multimon(tmp_path: Path, x: np.ndarray, demod: str) -> list[str]:
    """Run multimon-ng on x (resampled to its 22050 Hz raw input by sox, no dither)."""
    wav = write_wav(tmp_path / "in.wav", x)
    raw = tmp_path / "in.raw"
    subprocess.run([tool("sox"), "-D", str(wav), "-t", "raw", "-r", "22050", "-e", "signed",
                    "-b", "16", "-c", "1", str(raw)], check=True, capture_output=True)
    done = subprocess.run([tool("multimon-ng"), "-q", "-c", "-a", demod, "-t", "raw",
                           str(raw)], check=True, capture_output=True, text=True, timeout=30)
    return [line for line in done.stdout.splitlines() if line.strip()]


# --- levels and tones ---------------------------------------------------------------
def test_tone_level_is_rms_relative_to_full_scale_sine() -> None:
    x = synth.tone((1000.0,), 1.0, -10.0)
    rms_db = 20 * np.log10(np.sqrt(np.mean(x**2)) * np.sqrt(2))
    assert rms_db == pytest.approx(-10.0, abs=0.05)
    assert np.max(np.abs(x)) == pytest.approx(10 ** (-10 / 20), rel=1e-3)
    assert peak_freqs(x, 1) == pytest.approx([1000.0], abs=1.0)


def test_dbm0_maps_to_g711_full_scale() -> None:
    assert synth.dbm0(3.14) == pytest.approx(0.0)
    assert synth.dbm0(-13.0) == pytest.approx(-16.14)


def test_tone_chunks_join_without_phase_jump() -> None:
    whole = synth.tone((425.0, 350.0), 0.5, -12.0)
    first = synth.tone((425.0, 350.0), 0.25, -12.0)
    second = synth.tone((425.0, 350.0), 0.25, -12.0, start_sample=2000)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, atol=1e-9)


def test_am_tone_has_carrier_and_sidebands() -> None:
    x = synth.tone((400.0,), 2.0, -10.0, am_hz=25.0, am_depth=0.9)
    assert peak_freqs(x, 3) == pytest.approx([375.0, 400.0, 425.0], abs=1.0)
    assert np.max(np.abs(x)) <= 10 ** (-10 / 20) + 1e-9


def on_off_runs(x: np.ndarray) -> list[tuple[bool, float]]:
    """(tone on?, seconds) runs of x after 0.5 s of lead-in silence, from a 20 ms
    moving average of |x| (one beat period of 400+450 Hz) cut at half its peak."""
    padded = np.concatenate([np.zeros(FS // 2), x])
    env = np.convolve(np.abs(padded), np.ones(160) / 160, "same")
    on = env > 0.5 * env.max()
    edges = np.flatnonzero(np.diff(on.astype(int))) + 1
    bounds = [0, *edges.tolist(), padded.size]
    runs = [(bool(on[a]), (b - a) / FS) for a, b in itertools.pairwise(bounds)]
    assert runs[0][0] is False and runs[0][1] == pytest.approx(0.5, abs=0.004)
    return runs[1:]


def test_cadenced_tone_follows_its_cadence() -> None:
    spec = ToneSpec((400.0, 450.0), ((0.4, 0.2), (0.4, 2.0)))
    runs = on_off_runs(synth.cadenced(spec, None, 6.0, -12.0))
    expected = [(True, 0.4), (False, 0.2), (True, 0.4), (False, 2.0)] * 2
    assert [on for on, _ in runs[:8]] == [on for on, _ in expected]
    assert [s for _, s in runs[:8]] == pytest.approx([s for _, s in expected], abs=0.01)


def test_cadence_override_and_continuous() -> None:
    spec = ToneSpec((425.0,))
    runs = on_off_runs(synth.cadenced(spec, None, 1.0, -12.0))
    assert runs[0][0] is True
    assert runs[0][1] == pytest.approx(1.0, abs=0.01)
    runs = on_off_runs(synth.cadenced(spec, ((0.48, 0.48),), 1.92, -12.0))
    assert [s for _, s in runs[:3]] == pytest.approx([0.48] * 3, abs=0.01)


# --- DTMF ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list("0123456789*#ABCD"))
def test_each_dtmf_key_has_its_q23_pair(key: str) -> None:
    x = synth.dtmf(key, 0.5, -10.0)
    row = next(i for i, keys in enumerate(KEYS) if key in keys)
    assert peak_freqs(x, 2) == pytest.approx([ROWS[row], COLS[KEYS[row].index(key)]], abs=1.0)
    assert detect_dtmf(x) == [(0, key)]


def test_dtmf_twist_raises_the_high_group() -> None:
    x = synth.dtmf("5", 0.5, -12.0, twist_db=3.0)
    ratio_db = 10 * np.log10(goertzel_power(x, 1336.0) / goertzel_power(x, 770.0))
    assert ratio_db == pytest.approx(3.0, abs=0.1)


def test_dtmf_string_timing_and_digits() -> None:
    x = synth.dtmf_string("0221987", 0.07, 0.08)
    assert x.size == 7 * round(0.15 * FS)
    found = detect_dtmf(x)
    assert "".join(k for _, k in found) == "0221987"
    starts = [s for s, _ in found]
    assert np.diff(starts) == pytest.approx([0.15 * FS] * 6, abs=102)


def test_dtmf_string_decoded_by_multimon(tmp_path: Path) -> None:
    x = synth.dtmf_string("0123456789*#ABCD", 0.07, 0.07)
    lines = multimon(tmp_path, x, "DTMF")
    assert [line.split()[-1] for line in lines] == list("0123456789*#ABCD")


def test_dtmf_rejects_non_keys() -> None:
    with pytest.raises(ValueError, match="not a DTMF key"):
        synth.dtmf("E", 0.1)


# --- FSK and caller ID ------------------------------------------------------------------
def test_frame_8n1_is_lsb_first_with_start_and_stop() -> None:
    assert synth.frame_8n1(b"\x80\x01").tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
                                                     0, 1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_fsk_is_continuous_phase_with_exact_bit_timing() -> None:
    bits = [0, 1] * 600
    x = synth.fsk(bits, 1200.0, 2200.0, 1200.0, level_dbfs=0.0)
    assert x.size == 8000  # 1200 bits at 1200 baud = 1 s, no drift
    max_step = 2 * np.pi * 2200 / FS  # largest per-sample change of a unit sine at 2200 Hz
    assert np.max(np.abs(np.diff(x))) <= max_step + 1e-9


# 300 alternating bits start with a 0 that follows no mark, so an async receiver first
# locks on bit 2: it reads 29 bytes 0x55 and then 0xD5 (the last seizure bits plus the
# first mark bits) before the message; minimodem prints the same bytes.
SEIZURE_AS_DECODED = b"\x55" * 29 + b"\xd5"


def gr30_message() -> bytes:
    return callerid.mdmf(number="2125551234", name="DOE JOHN", when="03141523")


def test_bell202_burst_round_trip() -> None:
    message = gr30_message()
    x = synth.bell202(message)
    assert x.size == int(np.ceil((300 + 180 + 10 * len(message)) * FS / 1200))
    assert decode_fsk(x, 1200.0, 2200.0) == SEIZURE_AS_DECODED + message


def test_v23_burst_round_trip() -> None:
    message = callerid.etsi_call_setup(number="022112345", name="MUELLER", when="03141523")
    x = synth.v23(message)
    assert x.size == int(np.ceil((300 + 80 + 10 * len(message)) * FS / 1200))
    assert decode_fsk(x, 1300.0, 2100.0) == SEIZURE_AS_DECODED + message


def test_fsk_tone_pairs_match_the_standards() -> None:
    marks = synth.fsk([1] * 1200, synth.BELL202_MARK_HZ, synth.BELL202_SPACE_HZ, 1200.0)
    spaces = synth.fsk([0] * 1200, synth.V23_MARK_HZ, synth.V23_SPACE_HZ, 1200.0)
    assert peak_freqs(marks, 1) == pytest.approx([1200.0], abs=1.0)
    assert peak_freqs(spaces, 1) == pytest.approx([2100.0], abs=1.0)


def test_bell202_mdmf_decoded_by_minimodem(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "cid.wav", synth.bell202(gr30_message()))
    done = subprocess.run([tool("minimodem"), "--rx", "-q", "-f", str(wav), "callerid"],
                          check=True, capture_output=True, text=True, timeout=30)
    assert "Time:  03/14 15:23" in done.stdout
    assert "Phone: 212-555-1234" in done.stdout
    assert "Name:  DOE JOHN" in done.stdout


def test_bell202_sdmf_decoded_by_minimodem(tmp_path: Path) -> None:
    message = callerid.sdmf("2125551234", datetime(2025, 3, 14, 15, 23))
    wav = write_wav(tmp_path / "sdmf.wav", synth.bell202(message))
    done = subprocess.run([tool("minimodem"), "--rx", "-q", "-f", str(wav), "callerid"],
                          check=True, capture_output=True, text=True, timeout=30)
    assert "Phone: 212-555-1234" in done.stdout
    assert "Time:  03/14 15:23" in done.stdout


def test_v23_call_setup_decoded_by_multimon_clipfsk(tmp_path: Path) -> None:
    message = callerid.etsi_call_setup(number="022112345", name="MUELLER", when="03141523")
    lines = multimon(tmp_path, synth.v23(message), "CLIPFSK")
    assert lines == ["CLIPFSK: CS DATE=03141523 CID=022112345 CNT=MUELLER"]


def test_dt_as_is_the_etsi_dual_tone() -> None:
    x = synth.dt_as()
    assert x.size == 800  # 100 ms
    assert peak_freqs(x, 2) == pytest.approx([2130.0, 2750.0], abs=6.0)


# --- caller-ID messages -------------------------------------------------------------
def parse_params(message: bytes) -> tuple[int, dict[int, bytes]]:
    assert message[1] == len(message) - 3
    assert sum(message) % 256 == 0
    body, params = message[2:-1], {}
    while body:
        params[body[0]] = body[2:2 + body[1]]
        body = body[2 + body[1]:]
    return message[0], params


def test_mdmf_layout() -> None:
    kind, params = parse_params(gr30_message())
    assert kind == 0x80
    assert params == {0x01: b"03141523", 0x02: b"2125551234", 0x07: b"DOE JOHN"}


def test_withheld_mdmf_carries_absence_reasons() -> None:
    _, params = parse_params(callerid.mdmf(when="01010000", number_absence="P",
                                           name_absence="P"))
    assert params == {0x01: b"01010000", 0x04: b"P", 0x08: b"P"}


def test_sdmf_layout() -> None:
    message = callerid.sdmf(None, "12312359", absence="O")
    assert message[:2] == bytes([0x04, 9])
    assert message[2:-1] == b"12312359O"
    assert sum(message) % 256 == 0


@settings(max_examples=60, deadline=None)
@given(number=st.text("0123456789", min_size=1, max_size=20),
       name=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                    max_size=50))
def test_etsi_messages_always_checksum_and_round_trip(number: str, name: str) -> None:
    kind, params = parse_params(callerid.etsi_call_setup(number=number, name=name))
    assert kind == 0x80
    assert params == {0x02: number.encode(), 0x07: name.encode()}


@pytest.mark.parametrize(("bad", "match"), [
    ({"number": "12a"}, "number must be"),
    ({"name": "É"}, "name must be"),
    ({"name": "X" * 16}, "name must be"),
    ({"number": "1", "number_absence": "P"}, "not both"),
    ({"number_absence": "X"}, "absence reason"),
    ({"when": "2025-01-01"}, "MMDDHHMM"),
])
def test_mdmf_rejects_what_it_cannot_carry(bad: dict[str, str], match: str) -> None:
    with pytest.raises(callerid.CallerIdEncodeError, match=match):
        callerid.mdmf(**bad)


@pytest.mark.parametrize(("variant", "absence", "expected"), [
    ("A_C", None, "A0221234C"), ("A_#", None, "A0221234#"), ("D_C", None, "D0221234C"),
    ("_#", None, "0221234#"), ("A_C", "O", "B00C"), ("A_C", "P", "B10C"),
    ("D_C", "P", "D1#"), ("D_C", "O", "D3#"),
])
def test_dtmf_caller_id_strings(variant: str, absence: str | None, expected: str) -> None:
    number = None if absence else "0221234"
    assert callerid.dtmf_cid(number, variant, absence) == expected


# --- speech and noise -----------------------------------------------------------------
def line_ratio_db(x: np.ndarray, window: int = 256, hop: int = 80) -> np.ndarray:
    """Per 32 ms frame: power of the strongest spectral line (+-2 bins) over the rest."""
    frames = np.lib.stride_tricks.sliding_window_view(x, window)[::hop] * np.hanning(window)
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    k = np.argmax(spec, axis=1)
    idx = np.clip(k[:, None] + np.arange(-2, 3)[None, :], 0, spec.shape[1] - 1)
    peak = np.take_along_axis(spec, idx, axis=1).sum(axis=1)
    rest = spec.sum(axis=1) - peak
    loud = spec.sum(axis=1) > 1e-6 * spec.sum(axis=1).max()
    ratio = np.divide(peak, rest, out=np.full(peak.shape, 1e12), where=rest > 0)
    return np.where(loud, 10 * np.log10(ratio), -99.0)


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    return {"dealer": synth.speech_like(45.0, "dealer", rng, -14.0),
            "customer": synth.speech_like(45.0, "customer", rng, -22.0)}


@pytest.mark.parametrize("who", ["dealer", "customer"])
def test_speech_has_no_steady_spectral_line(voices: dict[str, np.ndarray], who: str) -> None:
    above = line_ratio_db(voices[who]) > 20.0
    longest = max((len(run) for run in "".join("1" if a else "0" for a in above).split("0")),
                  default=0)
    assert longest * 80 / FS <= 0.040
    pure = line_ratio_db(synth.tone((425.0,), 0.5, -20.0))  # the check does see a tone
    assert pure.min() > 20.0


@pytest.mark.parametrize("who", ["dealer", "customer"])
def test_speech_does_not_talk_off_dtmf(voices: dict[str, np.ndarray], who: str) -> None:
    assert detect_dtmf(voices[who]) == []


@pytest.mark.parametrize(("who", "level"), [("dealer", -14.0), ("customer", -22.0)])
def test_speech_active_level(voices: dict[str, np.ndarray], who: str, level: float) -> None:
    x = voices[who]
    frames = x[: x.size // 80 * 80].reshape(-1, 80)
    power = np.mean(frames**2, axis=1)
    active = power > 10 ** (-50 / 10)
    active_db = 10 * np.log10(np.mean(power[active]) * 2)
    assert active_db == pytest.approx(level, abs=2.0)
    assert 0.4 < active.mean() < 0.95  # pauses between phrases
    assert np.max(np.abs(x)) < 1.0


def median_f0(x: np.ndarray) -> float:
    frames = np.lib.stride_tricks.sliding_window_view(x, 320)[::160]
    loud = frames[np.mean(frames**2, axis=1) > 0.3 * np.mean(frames**2, axis=1).max()]
    f0 = []
    for frame in loud:
        ac = np.correlate(frame, frame, "full")[319:]
        lag = 20 + int(np.argmax(ac[20:100]))  # 80-400 Hz
        f0.append(FS / lag)
    return float(np.median(f0))


def test_voices_differ_in_pitch(voices: dict[str, np.ndarray]) -> None:
    assert 85.0 < median_f0(voices["dealer"]) < 145.0
    assert 160.0 < median_f0(voices["customer"]) < 260.0


@pytest.mark.parametrize("who", ["dealer", "customer"])
def test_speech_has_syllabic_rhythm(voices: dict[str, np.ndarray], who: str) -> None:
    x = voices[who]
    env = np.sqrt(np.mean(x[: x.size // 80 * 80].reshape(-1, 80) ** 2, axis=1))  # 100 Hz
    env = np.convolve(env, np.hanning(9) / np.hanning(9).sum(), "same")
    peaks = np.flatnonzero((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:])
                           & (env[1:-1] > 0.2 * env.max()))
    active_s = np.count_nonzero(env > 0.05 * env.max()) / 100
    assert 3.0 < peaks.size / active_s < 8.0  # syllable-like bursts, not a drone


def test_speech_is_deterministic_per_generator() -> None:
    a = synth.speech_like(3.0, "customer", np.random.default_rng(5))
    b = synth.speech_like(3.0, "customer", np.random.default_rng(5))
    c = synth.speech_like(3.0, "customer", np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert a.size == c.size == 24000
    assert not np.allclose(a, c)


def test_speech_blocks_cover_exactly_n_samples() -> None:
    blocks = list(synth.speech_blocks(12345, "dealer", np.random.default_rng(1), -14.0))
    assert sum(b.size for b in blocks) == 12345
    assert max(b.size for b in blocks) <= 3 * FS  # phrase-sized, never the whole turn


def test_noise_level_and_pcm_saturation() -> None:
    x = synth.noise(2.0, -40.0, np.random.default_rng(0))
    assert 20 * np.log10(np.std(x) * np.sqrt(2)) == pytest.approx(-40.0, abs=0.2)
    pcm = synth.to_pcm16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]))
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [-32768, -32767, 0, 16384, 32767, 32767]
