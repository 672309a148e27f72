"""ToneDetector on every country of drivers/toneplan.py.

The tone vectors are built here from plain numpy (sines with random phases, Asterisk's AM
``f*m`` as ``(1 + d sin) / (1 + d)``, hard cadence gating with 1 ms ramps), independently
of the simulator's generators; the simulator is used once more as a second source.
S/N is the tone's power while on over the power of white noise across the whole band.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from drivers.dsp.events import Tone
from drivers.dsp.tones import BLOCK_LEN, CallProgressConfigError, ToneDetector
from drivers.sim import synth
from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario
from drivers.toneplan import ToneSpec, countries, tone_plan

RATE = 8000
FULL_SCALE = 32767.0
TONES = ("dial", "busy", "ringback", "congestion")
LEVEL_DBFS = -16.0  # per frequency (about -13 dBm0, ITU-T E.180 practice)
LEAD_S = 4037 / 8000  # not on a block boundary
TAIL_S = 6.5  # longer than any cadence gap + tolerance: the pattern's end is reported
START_TOL = 400  # samples: 50 ms
END_TOL = 640  # samples: 80 ms (a cadence gap is >= 165 ms)
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "scenarios"


# --- vectors -------------------------------------------------------------------------
def samples(duration_s: float) -> int:
    return round(duration_s * RATE)


def on_intervals(cadence: tuple[tuple[float, float], ...], duration_s: float
                 ) -> list[tuple[float, float]]:
    """(start, end) seconds of the bursts of ``cadence`` within ``duration_s``."""
    if not cadence:
        return [(0.0, duration_s)]
    out, t = [], 0.0
    while t < duration_s - 1e-9:
        for on_s, off_s in cadence:
            if t >= duration_s - 1e-9:
                break
            out.append((t, min(t + on_s, duration_s)))
            t += on_s + off_s
    return out


def gate(intervals: list[tuple[float, float]], n: int, ramp_s: float = 0.001) -> np.ndarray:
    t = np.arange(n) / RATE
    env = np.zeros(n)
    for a, b in intervals:
        env = np.maximum(env, np.clip(np.minimum(t - a, b - t) / ramp_s, 0.0, 1.0))
    return env


def progress_tone(spec: ToneSpec, duration_s: float, rng: np.random.Generator,
                  level_dbfs: float = LEVEL_DBFS, offset: float = 0.0) -> np.ndarray:
    """A call-progress tone; ``offset`` shifts every frequency (0.01 = +1 %)."""
    n = samples(duration_s)
    t = np.arange(n) / RATE
    x = np.zeros(n)
    for f in spec.freqs_hz:
        x += np.sin(2 * np.pi * f * (1 + offset) * t + rng.uniform(0, 2 * np.pi))
    if spec.am_hz:
        x *= (1 + spec.am_depth * np.sin(2 * np.pi * spec.am_hz * t + rng.uniform(0, 6.3)))
        x /= 1 + spec.am_depth
    amp = FULL_SCALE * 10 ** (level_dbfs / 20)
    return amp * x * gate(on_intervals(spec.cadence, duration_s), n)


def tone_duration_s(spec: ToneSpec) -> float:
    """Two cadence periods and the first burst again (ends on a whole burst)."""
    return 3.0 if spec.continuous else 2 * spec.period_s + spec.cadence[0][0]


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    on = np.abs(x) > 0
    power = np.mean(x[on] ** 2) if on.any() else 1.0
    return x + rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), len(x))


def to_pcm(x: np.ndarray) -> np.ndarray:
    assert np.max(np.abs(x)) < FULL_SCALE, "test vector clips"
    return np.round(x).astype(np.int16)


def padded(x: np.ndarray, lead_s: float = LEAD_S, tail_s: float = TAIL_S) -> np.ndarray:
    return np.concatenate([np.zeros(samples(lead_s)), x, np.zeros(samples(tail_s))])


def detect(country: str, pcm: np.ndarray, frame: int = 160, start: int = 0) -> list[Tone]:
    det = ToneDetector(country)
    events = []
    for i in range(0, len(pcm), frame):
        events += det.feed(start + i, pcm[i:i + frame])
    assert all(isinstance(e, Tone) for e in events)
    return events


def expected_name(country: str, name: str) -> str:
    """The name reported for ``name``: an earlier tone with identical frequencies,
    modulation and cadence cannot be told apart, so it takes that tone's name."""
    plan = tone_plan(country)
    spec = getattr(plan, name)
    for other in TONES[:TONES.index(name)]:
        o = getattr(plan, other)
        if (o.freqs_hz, o.am_hz, o.cadence) == (spec.freqs_hz, spec.am_hz, spec.cadence):
            return other
    return name


def espeak_pcm(tmp: Path, voice: str, text: str) -> np.ndarray:
    """espeak-ng speech resampled to 8 kHz 16-bit mono by sox."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for the speech vectors")
    raw, out = tmp / f"{voice}.wav", tmp / f"{voice}-8k.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True,
                   capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out)],
                   check=True, capture_output=True)
    with wave.open(str(out)) as w:
        assert w.getframerate() == RATE
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).copy()


def chords(duration_s: float, rng: np.random.Generator, level_dbfs: float = -14.0
           ) -> np.ndarray:
    """Music-like audio: triads of harmonic notes, some holding 400, 425 or 440 Hz, played
    in a steady 0.5 s on / 0.5 s off rhythm like a busy tone, and a sustained pad."""
    n = samples(duration_s)
    t = np.arange(n) / RATE
    roots = [425.0, 440.0, 400.0, 349.2, 392.0, 480.0]
    out = np.zeros(n)
    for i, (a, _) in enumerate(on_intervals(((0.5, 0.5),), duration_s)):
        root = roots[i % len(roots)]
        seg = (t >= a) & (t < a + 0.5)
        for ratio in (1.0, 1.26, 1.5):  # major triad
            for k in range(1, 6):
                out[seg] += np.sin(2 * np.pi * k * root * ratio * t[seg]
                                   + rng.uniform(0, 6.3)) / k
        out[seg] *= np.exp(-(t[seg] - a) * 2.0)
    pad = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * 0.3
    out += pad
    return out / np.max(np.abs(out)) * FULL_SCALE * 10 ** (level_dbfs / 20)


# --- every country, every tone ----------------------------------------------------------
CASES = [(c, name) for c in countries() for name in TONES]


@pytest.mark.parametrize("snr_db", [None, 15.0], ids=["clean", "snr15"])
@pytest.mark.parametrize(("country", "name"), CASES)
def test_every_tone_of_every_country(country: str, name: str, snr_db: float | None) -> None:
    spec = getattr(tone_plan(country), name)
    rng = np.random.default_rng([CASES.index((country, name)), int(snr_db or 0)])
    duration_s = tone_duration_s(spec)
    x = padded(progress_tone(spec, duration_s, rng))
    if snr_db is not None:
        x = add_noise(x, snr_db, rng)
    events = detect(country, to_pcm(x))
    last_end_s = on_intervals(spec.cadence, duration_s)[-1][1]
    assert [e.tone for e in events] == [expected_name(country, name)]
    assert abs(events[0].sample - samples(LEAD_S)) <= START_TOL
    assert abs(events[0].end_sample - samples(LEAD_S + last_end_s)) <= END_TOL


def test_identical_tones_are_reported_under_one_name() -> None:
    for country in countries():
        det = ToneDetector(country)
        expected = {n: expected_name(country, n) for n in TONES if expected_name(country, n) != n}
        assert det.reported_as == expected, country
    assert ToneDetector("PL").reported_as == {"congestion": "busy"}
    assert ToneDetector("DE").reported_as == {}


@pytest.mark.parametrize("country", ["DE", "AT", "NL", "SE", "ES", "BR", "IT", "CZ", "GR"])
def test_same_frequency_tones_told_apart_in_one_stream(country: str) -> None:
    """Ringback, then busy, then congestion (and the dial tone) on one line."""
    plan = tone_plan(country)
    rng = np.random.default_rng(7)
    parts, truth, t = [np.zeros(samples(LEAD_S))], [], LEAD_S
    for name in ("ringback", "busy", "congestion", "dial"):
        spec = getattr(plan, name)
        duration_s = tone_duration_s(spec)
        parts += [progress_tone(spec, duration_s, rng), np.zeros(samples(TAIL_S))]
        truth.append((expected_name(country, name), t,
                      t + on_intervals(spec.cadence, duration_s)[-1][1]))
        t += duration_s + TAIL_S
    events = detect(country, to_pcm(add_noise(np.concatenate(parts), 20.0, rng)))
    assert [e.tone for e in events] == [name for name, _, _ in truth]
    for e, (_, start_s, end_s) in zip(events, truth, strict=True):
        assert abs(e.sample - samples(start_s)) <= START_TOL
        assert abs(e.end_sample - samples(end_s)) <= END_TOL


def test_de_busy_congestion_ringback_by_cadence_alone() -> None:
    """425 Hz in all three: 0.48/0.48 busy, 0.24/0.24 congestion, 1/4 ringback."""
    rng = np.random.default_rng(11)
    for cadence, name in ((((0.48, 0.48),), "busy"), (((0.24, 0.24),), "congestion"),
                          (((1.0, 4.0),), "ringback")):
        spec = ToneSpec((425.0,), cadence)
        x = padded(progress_tone(spec, tone_duration_s(spec), rng))
        assert [e.tone for e in detect("DE", to_pcm(x))] == [name]


def test_busy_straight_after_ringback_splits_at_the_change() -> None:
    """The callee rejects: the ringback stops and busy follows without a pause."""
    plan = tone_plan("DE")
    rng = np.random.default_rng(3)
    ring = progress_tone(plan.ringback, 6.0, rng)  # bursts 0-1 s, 5-6 s
    busy = progress_tone(plan.busy, 0.96 * 3 + 0.48, rng)
    events = detect("DE", to_pcm(padded(np.concatenate([ring, busy]))))
    assert [e.tone for e in events] == ["ringback", "busy"]
    assert abs(events[0].end_sample - samples(LEAD_S + 6.0)) <= END_TOL
    assert abs(events[1].sample - samples(LEAD_S + 6.0)) <= START_TOL


def test_dial_tone_then_digits_then_ringback() -> None:
    """US: 350+440 dial tone cut by the first key, DTMF digits, silence, ringback."""
    plan = tone_plan("US")
    rng = np.random.default_rng(5)
    t = np.arange(samples(0.08)) / RATE
    digits = [np.concatenate([FULL_SCALE * 0.1 * (np.sin(2 * np.pi * 770 * t)
                                                   + np.sin(2 * np.pi * 1336 * t)),
                              np.zeros(samples(0.1))]) for _ in range(7)]
    x = np.concatenate([progress_tone(plan.dial, 1.7, rng), *digits, np.zeros(samples(2.0)),
                        progress_tone(plan.ringback, 14.0, rng)])
    events = detect("US", to_pcm(padded(x)))
    ring_start_s = LEAD_S + 1.7 + 7 * 0.18 + 2.0
    assert [e.tone for e in events] == ["dial", "ringback"]
    assert abs(events[0].sample - samples(LEAD_S)) <= START_TOL
    assert abs(events[0].end_sample - samples(LEAD_S + 1.7)) <= END_TOL
    assert abs(events[1].sample - samples(ring_start_s)) <= START_TOL
    assert abs(events[1].end_sample - samples(ring_start_s + 14.0)) <= END_TOL


# --- dial tones: steady, or cut off by a DTMF digit --------------------------------------------
@pytest.mark.parametrize("country", countries())
def test_steady_tone_longer_than_every_on_time_is_a_dial_tone(country: str) -> None:
    """The dial tone's frequencies, steady for longer than any on time of the country's
    cadenced tones: a dial tone, also where the plan's dial tone is cadenced (IT, CZ, GR)."""
    plan = tone_plan(country)
    longest_on_s = max(on for name in TONES for on, _ in getattr(plan, name).cadence)
    steady = ToneSpec(plan.dial.freqs_hz, (), plan.dial.am_hz, plan.dial.am_depth)
    duration_s = longest_on_s + 0.5
    x = padded(progress_tone(steady, duration_s, np.random.default_rng(21)))
    events = detect(country, to_pcm(x))
    assert [e.tone for e in events] == ["dial"]
    assert abs(events[0].sample - samples(LEAD_S)) <= START_TOL
    assert abs(events[0].end_sample - samples(LEAD_S + duration_s)) <= END_TOL


def detect_with_digit(country: str, pcm: np.ndarray, digit: int | None) -> list[Tone]:
    """Like detect(), telling the detector of a DTMF digit starting at ``digit`` once the
    audio is 0.2 s past it (a DTMF detector reports a digit after it ends)."""
    det = ToneDetector(country)
    events = []
    for i in range(0, len(pcm), 160):
        if digit is not None and i == (digit + samples(0.2)) // 160 * 160:
            det.note_dtmf(digit)
        events += det.feed(i, pcm[i:i + 160])
    return events + det.flush()


@pytest.mark.parametrize(("after_s", "expected"), [
    (None, []), (0.03, ["dial"]), (-0.04, ["dial"]), (0.3, [])],
    ids=["no-digit", "digit-after", "digit-under-the-tone", "digit-too-late"])
def test_a_burst_cut_off_by_a_digit_is_a_dial_tone(after_s: float | None,
                                                  expected: list[str]) -> None:
    """DE: 1 s of 425 Hz is a dial tone or a ringback burst; a digit starting at its end
    (or 40 ms before, a weak digit under the tone) makes it the dial tone, ending at the
    digit; a digit 0.3 s later does not."""
    dial_s = 1.0
    x = to_pcm(padded(progress_tone(tone_plan("DE").dial, dial_s, np.random.default_rng(6))))
    end = samples(LEAD_S + dial_s)
    digit = None if after_s is None else end + samples(after_s)
    events = detect_with_digit("DE", x, digit)
    assert [e.tone for e in events] == expected
    if expected:
        assert abs(events[0].sample - samples(LEAD_S)) <= START_TOL
        assert abs(events[0].end_sample - min(end, digit or end)) <= BLOCK_LEN


def test_digit_in_a_cadenced_dial_tone_pause_cuts_it() -> None:
    """IT dial tone 0.2 on, 0.2 off, 0.6 on, 1.0 off: the first key 0.5 s into the long
    pause ends it; the tone ends with its last burst."""
    spec = tone_plan("IT").dial
    x = to_pcm(padded(progress_tone(spec, 1.0, np.random.default_rng(8))))
    digit = samples(LEAD_S + 1.5)
    events = detect_with_digit("IT", x, digit)
    assert [e.tone for e in events] == ["dial"]
    assert abs(events[0].end_sample - samples(LEAD_S + 1.0)) <= END_TOL
    assert detect_with_digit("IT", x, None) == []


# --- sox as an independent generator ---------------------------------------------------------
def sox_tone(tmp: Path, spec: ToneSpec, periods: int) -> np.ndarray:
    """The tone made by sox's ``synth`` (sines mixed, AM by ``amod`` at 100 % depth),
    each burst padded with its off time; a continuous tone lasts 3 s."""
    if not shutil.which("sox"):
        pytest.skip("sox is needed for the independent tone vectors")
    pieces = spec.cadence * periods or ((3.0, 0.0),)
    files = []
    for i, (on_s, off_s) in enumerate(pieces):
        out = tmp / f"burst{i}.wav"
        effects = ["synth", f"{on_s}", "sine", f"{spec.freqs_hz[0]}"]
        for f in spec.freqs_hz[1:]:
            effects += ["synth", f"{on_s}", "sine", "mix", f"{f}"]
        if spec.am_hz:
            effects += ["synth", f"{on_s}", "sine", "amod", f"{spec.am_hz}"]
        effects += ["vol", "0.15", "pad", "0", f"{off_s}"]
        subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(out), *effects],
                       check=True, capture_output=True)
        files.append(str(out))
    joined = tmp / "tone.wav"
    subprocess.run(["sox", *files, str(joined)], check=True, capture_output=True)
    with wave.open(str(joined)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).copy()


@pytest.mark.parametrize(("country", "name"), [
    ("DE", "busy"), ("DE", "congestion"), ("DE", "ringback"), ("US", "ringback"),
    ("US", "dial"), ("UK", "ringback"), ("UK", "congestion"), ("IN", "dial"),
    ("ZA", "ringback"), ("IT", "dial"), ("ES", "congestion"), ("AU", "dial")])
def test_tones_made_by_sox(tmp_path: Path, country: str, name: str) -> None:
    spec = getattr(tone_plan(country), name)
    tone = sox_tone(tmp_path, spec, periods=3)
    lead = np.zeros(samples(LEAD_S), np.int16)
    events = detect(country, np.concatenate([lead, tone, np.zeros(samples(TAIL_S), np.int16)]))
    last_off_s = spec.cadence[-1][1] if spec.cadence else 0.0
    assert [e.tone for e in events] == [name]
    assert abs(events[0].sample - len(lead)) <= START_TOL
    assert abs(events[0].end_sample - (len(lead) + len(tone) - samples(last_off_s))) <= END_TOL


# --- robustness ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-0.015, 0.015])
@pytest.mark.parametrize(("country", "name"), [("DE", "busy"), ("US", "busy"),
                                               ("UK", "ringback"), ("IN", "dial")])
def test_frequency_offset_within_tolerance(country: str, name: str, offset: float) -> None:
    spec = getattr(tone_plan(country), name)
    rng = np.random.default_rng(2)
    x = add_noise(padded(progress_tone(spec, tone_duration_s(spec), rng, offset=offset)),
                  20.0, rng)
    assert [e.tone for e in detect(country, to_pcm(x))] == [name]


@pytest.mark.parametrize("level_dbfs", [-6.0, -36.0])
def test_level_range(level_dbfs: float) -> None:
    spec = tone_plan("DE").busy
    x = padded(progress_tone(spec, tone_duration_s(spec), np.random.default_rng(1),
                             level_dbfs=level_dbfs))
    assert [e.tone for e in detect("DE", to_pcm(x))] == ["busy"]


def test_too_weak_a_tone_is_ignored() -> None:
    spec = tone_plan("DE").busy
    x = padded(progress_tone(spec, 6.0, np.random.default_rng(1), level_dbfs=-55.0))
    assert detect("DE", to_pcm(x)) == []


def test_wrong_frequency_is_not_a_tone() -> None:
    """A 1/4 s cadence at 600 Hz is nothing in DE (the plan has only 425 Hz)."""
    spec = ToneSpec((600.0,), ((1.0, 4.0),))
    x = padded(progress_tone(spec, tone_duration_s(spec), np.random.default_rng(1)))
    assert detect("DE", to_pcm(x)) == []


@pytest.mark.parametrize("frame", [1, 37, 160, 1000, 4096])
def test_any_frame_length_and_start_give_the_same_events(frame: int) -> None:
    plan = tone_plan("UK")
    rng = np.random.default_rng(9)
    x = to_pcm(padded(np.concatenate([progress_tone(plan.busy, 3.0, rng),
                                      np.zeros(samples(2.0)),
                                      progress_tone(plan.congestion, 4.5, rng)])))
    start = 1_234_567  # not a multiple of the block length
    events = detect("UK", x, frame=frame, start=start)
    assert [e.tone for e in events] == ["busy", "congestion"]
    assert abs(events[0].sample - (start + samples(LEAD_S))) <= BLOCK_LEN
    assert events == detect("UK", x, frame=160, start=start)


def test_flush_reports_a_tone_still_going_and_reset_forgets() -> None:
    det = ToneDetector("FR")
    spec = tone_plan("FR").busy
    pcm = to_pcm(padded(progress_tone(spec, 3.0, np.random.default_rng(4)), tail_s=0.0))
    events = []
    for i in range(0, len(pcm), 160):
        events += det.feed(i, pcm[i:i + 160])
    assert events == []
    assert det.in_progress() is not None and det.in_progress().tone == "busy"
    events = det.flush()
    assert [e.tone for e in events] == ["busy"]
    assert abs(events[0].end_sample - samples(LEAD_S + 2.5)) <= END_TOL
    assert det.in_progress() is None and det.flush() == []


def test_unknown_country_is_a_config_error() -> None:
    with pytest.raises(CallProgressConfigError, match="'XX'"):
        ToneDetector("XX")
    with pytest.raises(CallProgressConfigError, match="batch_samples"):
        ToneDetector("DE", batch_samples=0)


def test_country_alias_and_case() -> None:
    assert ToneDetector("gb").plan.country == "UK"


# --- talk-off: speech and music are not tones ------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_speech() -> np.ndarray:
    rng = np.random.default_rng(2024)
    parts = [synth.speech_like(30.0, voice, rng, level)
             for voice in ("dealer", "customer") for level in (-14.0, -24.0)]
    x = np.concatenate(parts)
    return synth.to_pcm16(x + rng.normal(0, 10 ** (-60 / 20), len(x)))


@pytest.fixture(scope="module")
def espeak_speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("espeak")
    texts = {
        "de": ("Autohaus Müller, guten Tag. Ihr Wagen ist fertig, Sie können ihn ab "
               "sechzehn Uhr abholen. Die Inspektion hat vierhundertzwanzig Euro gekostet."),
        "en": ("Good morning, this is the service desk. Your car is ready for pick up; "
               "please bring the key and the papers. Four hundred and twenty five."),
        "fr": "Bonjour, votre voiture est prête. Nous sommes ouverts jusqu'à dix-huit heures.",
    }
    return np.concatenate([espeak_pcm(tmp, voice, text) for voice, text in texts.items()])


@pytest.mark.parametrize("country", countries())
def test_synthetic_speech_gives_no_tone(country: str, synthetic_speech: np.ndarray) -> None:
    assert detect(country, synthetic_speech) == []


@pytest.mark.parametrize("country", countries())
def test_espeak_speech_gives_no_tone(country: str, espeak_speech: np.ndarray) -> None:
    x = np.concatenate([espeak_speech, np.zeros(samples(1.0), np.int16), espeak_speech // 4])
    assert detect(country, x) == []


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    return to_pcm(chords(20.0, np.random.default_rng(8)))


@pytest.mark.parametrize("country", countries())
def test_music_like_chords_give_no_tone(country: str, music: np.ndarray) -> None:
    assert detect(country, music) == []


# --- the simulator as a second source ------------------------------------------------------
def test_simulated_outbound_call_ringback_and_busy() -> None:
    """examples/scenarios/outbound.toml (DE): ringback until the far end answers, and the
    busy tone after the far end hangs up."""
    scenario = load_scenario(EXAMPLES / "outbound.toml")
    pcm, _, truth = render(scenario)
    call = truth[0]
    events = detect("DE", np.concatenate([pcm, np.zeros(samples(TAIL_S), np.int16)]))
    ring = [e for e in events if e.tone == "ringback"]
    busy = [e for e in events if e.tone == "busy"]
    ringback_s = scenario.calls[0].ringback_s
    assert len(ring) == 1 and len(busy) == 1
    assert call.answer_sample is not None
    assert abs(ring[0].sample - (call.answer_sample - samples(ringback_s))) <= START_TOL
    assert abs(ring[0].end_sample - call.answer_sample) <= END_TOL
    assert call.far_speech_sample is not None
    assert busy[0].sample > call.far_speech_sample
    assert busy[0].end_sample <= call.end_sample
