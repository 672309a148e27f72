"""VoiceDetector and AnswerDetector.

Speech comes from three sources: ``babble`` below (plain numpy: harmonics of a wandering
pitch shaped by moving formants, syllabic envelope, fricative noise), the simulator's
``speech_like`` voices, and espeak-ng. Answer timing is checked against the simulator's
ground truth ``CallTruth.far_speech_sample`` (the customer's first word; not
``answer_sample``, the moment the ringback stops, which comes 0.3-0.7 s earlier).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drivers.dsp.answer import ANSWERED, RINGBACK, WAITING, AnswerDetector
from drivers.dsp.events import Answer, DetectorEvent, Tone, Voice
from drivers.dsp.tones import CallProgressConfigError, ToneDetector
from drivers.dsp.vad import (
    FLOOR_WINDOW_S,
    FRAME_LEN,
    LOW_CUT_BINS,
    PEAK_HALF_WIDTH,
    SPECTRUM_ROWS,
    TONAL_SHARE,
    VoiceDetector,
    _Spectra,
)
from drivers.sim import synth
from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario, parse_scenario
from drivers.toneplan import countries, tone_plan
from tests.drivers.dsp.test_tones import (
    add_noise,
    espeak_pcm,
    progress_tone,
    samples,
    to_pcm,
    tone_duration_s,
)

RATE = 8000
FULL_SCALE = 32767.0
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "scenarios"
ONSET_TOL = 2 * FRAME_LEN  # 40 ms
OFFSET_TOL = 3 * FRAME_LEN  # 60 ms
ANSWER_TOL = round(0.5 * RATE)  # the requirement


# --- vectors ---------------------------------------------------------------------------
def babble(duration_s: float, rng: np.random.Generator, f0_hz: float = 130.0,
           level_dbfs: float = -20.0) -> np.ndarray:
    """Speech-like audio with sharp edges (15 ms ramps) at 0 and ``duration_s``."""
    n = samples(duration_s)
    t = np.arange(n) / RATE
    f0 = f0_hz * (1 + 0.1 * np.sin(2 * np.pi * 0.9 * t + rng.uniform(0, 6))
                  + 0.03 * np.sin(2 * np.pi * 7.0 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    f1 = 550 + 200 * np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6))  # moving formants
    f2 = 1500 + 500 * np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 6))
    x = np.zeros(n)
    for k in range(2, int(3400 / f0_hz)):  # telephone band: no fundamental
        fk = k * f0
        w = np.exp(-(((fk - f1) / 250) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 400) ** 2)) + 0.05
        x += w * np.sin(k * phase + rng.uniform(0, 6))
    syllable = 0.35 + 0.65 * np.sin(np.pi * t / 0.21) ** 2  # ~4.8 syllables per second
    fricative = rng.normal(0, 0.3, n) * (np.sin(np.pi * t / 0.21 + 1.2) ** 8)
    x = (x / np.std(x) + fricative) * syllable
    ramp = np.clip(np.minimum(t, duration_s - t) / 0.015, 0, 1)
    x *= ramp
    return x / np.sqrt(np.mean(x**2)) * FULL_SCALE / np.sqrt(2) * 10 ** (level_dbfs / 20)


def floor_noise(n: int, rng: np.random.Generator, level_dbfs: float = -60.0) -> np.ndarray:
    return rng.normal(0, FULL_SCALE / np.sqrt(2) * 10 ** (level_dbfs / 20), n)


def sequence(parts: list[tuple[str, float]], rng: np.random.Generator,
             noise_dbfs: float = -60.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """("speech" | "gap", seconds) parts -> audio and the speech (start, end) samples."""
    out, truth, pos = [], [], 0
    for kind, seconds in parts:
        seg = babble(seconds, rng) if kind == "speech" else np.zeros(samples(seconds))
        if kind == "speech":
            truth.append((pos, pos + len(seg)))
        out.append(seg)
        pos += len(seg)
    x = np.concatenate(out)
    return x + floor_noise(len(x), rng, noise_dbfs), truth


def dtmf_digits(rng: np.random.Generator, count: int = 16) -> np.ndarray:
    """Q.23 pairs, 40-100 ms on, 60-150 ms off, twist -4..+8 dB, -8..-30 dBFS."""
    rows, cols = (697.0, 770.0, 852.0, 941.0), (1209.0, 1336.0, 1477.0, 1633.0)
    parts = []
    for _ in range(count):
        t = np.arange(samples(rng.uniform(0.04, 0.1))) / RATE
        level = FULL_SCALE * 10 ** (rng.uniform(-30, -8) / 20)
        twist = 10 ** (rng.uniform(-4, 8) / 20)
        pair = (np.sin(2 * np.pi * rng.choice(rows) * t + rng.uniform(0, 6)) * twist
                + np.sin(2 * np.pi * rng.choice(cols) * t))
        parts += [pair * level / max(twist, 1.0), np.zeros(samples(rng.uniform(0.06, 0.15)))]
    return np.concatenate(parts)


def run(det: VoiceDetector | AnswerDetector, pcm: np.ndarray, frame: int = 160,
        start: int = 0) -> list[DetectorEvent]:
    events: list[DetectorEvent] = []
    for i in range(0, len(pcm), frame):
        events += det.feed(start + i, pcm[i:i + frame])
    return events


def voices(pcm: np.ndarray, frame: int = 160) -> list[Voice]:
    det = VoiceDetector()
    events = run(det, np.concatenate([pcm, np.zeros(samples(1.0), np.int16)]), frame)
    events += det.flush()
    assert all(isinstance(e, Voice) for e in events)
    return [e for e in events if isinstance(e, Voice)]


def answers(country: str, pcm: np.ndarray, **kw: int) -> list[Answer]:
    events = run(AnswerDetector(country), np.concatenate([pcm, np.zeros(8000, np.int16)]),
                 **kw)
    assert all(isinstance(e, Answer) for e in events)
    return [e for e in events if isinstance(e, Answer)]


# --- VAD timing --------------------------------------------------------------------------
PARTS = [("gap", 1.0), ("speech", 1.2), ("gap", 0.8), ("speech", 0.6), ("gap", 1.5),
         ("speech", 2.0), ("gap", 1.0)]


def test_voice_segments_on_and_off_timing() -> None:
    x, truth = sequence(PARTS, np.random.default_rng(1))
    segs = voices(to_pcm(x))
    assert len(segs) == len(truth)
    for seg, (start, end) in zip(segs, truth, strict=True):
        assert abs(seg.sample - start) <= ONSET_TOL
        assert seg.end_sample is not None and abs(seg.end_sample - end) <= OFFSET_TOL


def test_voice_timing_in_noise_at_15_db() -> None:
    rng = np.random.default_rng(2)
    x, truth = sequence(PARTS, rng, noise_dbfs=-35.0)  # speech -20 dBFS: S/N 15 dB
    segs = voices(to_pcm(x))
    assert len(segs) == len(truth)
    for seg, (start, end) in zip(segs, truth, strict=True):
        assert abs(seg.sample - start) <= ONSET_TOL
        assert seg.end_sample is not None and abs(seg.end_sample - end) <= OFFSET_TOL


def test_short_pauses_are_bridged_by_the_hangover() -> None:
    x, truth = sequence([("gap", 0.5), ("speech", 0.7), ("gap", 0.12), ("speech", 0.7),
                         ("gap", 0.5)], np.random.default_rng(3))
    segs = voices(to_pcm(x))
    assert len(segs) == 1
    assert abs(segs[0].sample - truth[0][0]) <= ONSET_TOL
    assert segs[0].end_sample is not None
    assert abs(segs[0].end_sample - truth[1][1]) <= OFFSET_TOL


def test_simulator_phrases_on_and_off() -> None:
    """speech_like shorter than its shortest phrase is one phrase filling the span."""
    rng = np.random.default_rng(4)
    lead, gap = np.zeros(samples(0.8)), np.zeros(samples(0.9))
    a = synth.speech_like(0.75, "dealer", rng, -14.0)
    b = synth.speech_like(0.75, "customer", rng, -22.0)
    x = np.concatenate([lead, a, gap, b, gap])
    x = synth.to_pcm16(x + rng.normal(0, 10 ** (-65 / 20), len(x)))
    truth = [(len(lead), len(lead) + len(a))]
    truth.append((truth[0][1] + len(gap), truth[0][1] + len(gap) + len(b)))
    segs = voices(x)
    assert len(segs) == 2
    for seg, (start, end) in zip(segs, truth, strict=True):
        assert abs(seg.sample - start) <= 4 * FRAME_LEN  # a phrase fades in over a syllable
        assert seg.end_sample is not None and abs(seg.end_sample - end) <= 4 * FRAME_LEN


def test_espeak_speech_is_covered(tmp_path: Path) -> None:
    pcm = espeak_pcm(tmp_path, "de", "Guten Tag. Ihr Wagen ist fertig. Bis morgen.")
    x = np.concatenate([np.zeros(samples(1.0), np.int16), pcm])
    frames = x[: len(x) // FRAME_LEN * FRAME_LEN].reshape(-1, FRAME_LEN).astype(float)
    loud = np.flatnonzero(np.mean(frames**2, axis=1) > (FULL_SCALE * 10 ** (-40 / 20)) ** 2 / 2)
    segs = voices(x)
    assert segs
    assert abs(segs[0].sample - loud[0] * FRAME_LEN) <= ONSET_TOL
    assert segs[-1].end_sample is not None
    assert abs(segs[-1].end_sample - (loud[-1] + 1) * FRAME_LEN) <= 5 * FRAME_LEN
    covered = sum((s.end_sample or s.sample) - s.sample for s in segs)
    assert covered >= 0.8 * (loud[-1] - loud[0]) * FRAME_LEN


@pytest.mark.parametrize("frame", [1, 37, 160, 1000, 4096])
def test_vad_any_frame_length_same_segments(frame: int) -> None:
    x, _ = sequence(PARTS[:4], np.random.default_rng(5))
    pcm = to_pcm(x)
    assert voices(pcm, frame) == voices(pcm, 160)


def frame_flags(det: VoiceDetector, pcm: np.ndarray, feed: int) -> dict[int, tuple[bool, bool]]:
    """Per judged frame (by its start sample): (active, tonal), ``pcm`` fed ``feed`` at a
    time (no flush: flush resets the frame decisions)."""
    flags: dict[int, tuple[bool, bool]] = {}
    for i in range(0, len(pcm), feed):
        det.feed(i, pcm[i:i + feed])
        if det.last_frames is not None:
            lf = det.last_frames
            for k, (active, tonal) in enumerate(zip(lf.active, lf.tonal, strict=True)):
                flags[lf.sample + k * FRAME_LEN] = (bool(active), bool(tonal))
    return flags


def test_long_batches_judge_loud_frames_as_live_batches_do() -> None:
    """One batch of more than SPECTRUM_ROWS windows (its spectra in several blocks) and
    400 ms batches: the same tonal decision for every loud frame (at >= -21 dBFS both
    windows deciding a frame are transformed at any batch size); tones tonal, speech
    active."""
    rng = np.random.default_rng(11)
    t = np.arange(samples(1.0)) / RATE
    level = FULL_SCALE * 10 ** (-16 / 20)
    parts, tone_spans, pos = [], [], 0
    for k in range(24):  # 1 s tone / 1 s speech: both in every block of spectra
        if k % 2:
            seg = babble(1.0, rng, level_dbfs=-16.0)
        else:
            seg = level * np.sin(2 * np.pi * (500.0 + 100.0 * k) * t)
            tone_spans.append((pos, pos + len(seg)))
        parts.append(seg)
        pos += len(seg)
    x = np.concatenate(parts)
    pcm = to_pcm(x + floor_noise(len(x), rng))
    assert len(pcm) // FRAME_LEN > 2 * SPECTRUM_ROWS
    whole = frame_flags(VoiceDetector(batch_samples=len(pcm)), pcm, len(pcm))
    live = frame_flags(VoiceDetector(), pcm, FRAME_LEN)
    frames = pcm[: len(pcm) // FRAME_LEN * FRAME_LEN].reshape(-1, FRAME_LEN).astype(float)
    level_db = 10 * np.log10(np.var(frames, axis=1) / (FULL_SCALE**2 / 2) + 1e-12)
    loud = [k * FRAME_LEN for k in np.flatnonzero(level_db >= -20.0)]
    judged = [s for s in loud if s in whole and s in live]
    assert len(judged) >= 0.9 * len(loud)
    assert [whole[s][1] for s in judged] == [live[s][1] for s in judged]
    in_tone = [s for s in judged
               if any(a + 2 * FRAME_LEN <= s < b - 2 * FRAME_LEN for a, b in tone_spans)]
    in_speech = [s for s in judged if s not in in_tone
                 and not any(a - 2 * FRAME_LEN <= s < b + 2 * FRAME_LEN for a, b in tone_spans)]
    assert len(in_tone) > 12 * 40 and len(in_speech) > 12 * 30
    assert all(whole[s] == (False, True) for s in in_tone)
    assert sum(whole[s][0] for s in in_speech) >= 0.9 * len(in_speech)


@pytest.mark.parametrize("feed", [FRAME_LEN, 3200, 19900])
def test_speech_running_to_the_end_is_judged_on_flush(feed: int) -> None:
    """flush pads the audio to whole frames plus one: the last frames are judged too."""
    rng = np.random.default_rng(7)
    lead = floor_noise(samples(1.0), rng)
    x = np.concatenate([lead, babble(1.5, rng)[:samples(1.5) - 100]])  # ends mid-frame
    pcm = to_pcm(x + floor_noise(len(x), rng))
    assert len(pcm) == 19900
    det = VoiceDetector()
    events = run(det, pcm, feed) + det.flush()
    assert len(events) == 1 and isinstance(events[0], Voice)
    assert abs(events[0].sample - len(lead)) <= ONSET_TOL
    assert events[0].end_sample is not None
    assert len(pcm) - FRAME_LEN < events[0].end_sample <= len(pcm) + FRAME_LEN


# --- VAD: what is not voice --------------------------------------------------------------
@pytest.mark.parametrize("country", countries())
def test_call_progress_tones_are_not_voice(country: str) -> None:
    plan = tone_plan(country)
    rng = np.random.default_rng(6)
    parts = []
    for name in ("dial", "busy", "ringback", "congestion"):
        spec = getattr(plan, name)
        parts += [progress_tone(spec, min(tone_duration_s(spec), 8.0), rng),
                  np.zeros(samples(0.5))]
    x = np.concatenate(parts)
    assert voices(to_pcm(add_noise(x, 15.0, rng))) == []


def test_dtmf_and_steady_tones_are_not_voice() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(samples(2.0)) / RATE
    beeps = [FULL_SCALE * 0.2 * np.sin(2 * np.pi * f * t) for f in (1000.0, 1400.0, 2100.0)]
    dual = FULL_SCALE * 0.1 * (np.sin(2 * np.pi * 2130 * t) + np.sin(2 * np.pi * 2750 * t))
    x = np.concatenate([dtmf_digits(rng, 24), *beeps, dual, dtmf_digits(rng, 24)])
    x = x + floor_noise(len(x), rng, -50.0)
    assert voices(to_pcm(x)) == []


def test_steady_noise_is_the_floor_not_voice() -> None:
    rng = np.random.default_rng(8)
    quiet, loud = floor_noise(samples(2.0), rng, -60.0), floor_noise(samples(10.0), rng, -38.0)
    segs = voices(to_pcm(np.concatenate([quiet, loud])))
    # the floor follows a rise within FLOOR_WINDOW_S (plus a batch); after that, no voice
    assert all((s.end_sample or 0) <= samples(2.0 + FLOOR_WINDOW_S + 0.5) for s in segs)


def test_a_click_is_not_a_voice_segment() -> None:
    rng = np.random.default_rng(9)
    x = floor_noise(samples(3.0), rng)
    x[samples(1.0):samples(1.0) + 40] += rng.normal(0, 8000, 40)  # 5 ms click
    assert voices(to_pcm(x)) == []


def test_vad_rejects_bad_batch() -> None:
    with pytest.raises(CallProgressConfigError, match="batch_samples"):
        VoiceDetector(batch_samples=0)


# --- answer: simulated outbound calls --------------------------------------------------------
def test_answer_on_the_example_outbound_call() -> None:
    pcm, _, truth = render(load_scenario(EXAMPLES / "outbound.toml"))
    call = truth[0]
    found = answers("DE", pcm)
    assert call.far_speech_sample is not None
    assert len(found) == 1
    assert abs(found[0].sample - call.far_speech_sample) <= ANSWER_TOL


def outbound(country: str, seed: int, ringback_s: float, noise_dbfs: float) -> str:
    return f"""country = "{country}"
seed = {seed}
noise_dbfs = {noise_dbfs}
tail_s = 0.5
[[calls]]
gap_s = 0.5
direction = "outbound"
dialed = "0221987"
ringback_s = {ringback_s}
talk_s = 3.0
hangup = "near"
"""


@pytest.mark.parametrize("ringback_s", [0.0, 7.0], ids=["no-ringback", "ringback"])
@pytest.mark.parametrize("country", ["DE", "US", "UK", "FR", "IT", "IN", "JP", "AU", "SE"])
def test_answer_on_simulated_calls(country: str, ringback_s: float) -> None:
    seed = countries().index(country) + int(ringback_s)
    noise = -45.0 if seed % 2 else -65.0
    pcm, _, truth = render(parse_scenario(outbound(country, seed, ringback_s, noise)))
    call = truth[0]
    found = answers(country, pcm)
    assert call.far_speech_sample is not None
    assert len(found) == 1
    assert abs(found[0].sample - call.far_speech_sample) <= ANSWER_TOL


# --- answer: own vectors ------------------------------------------------------------------
def ringback_then(country: str, rng: np.random.Generator, *after: np.ndarray) -> np.ndarray:
    """Two ringback periods and a burst, 0.6 s of quiet, then ``after``."""
    spec = tone_plan(country).ringback
    ring = progress_tone(spec, tone_duration_s(spec), rng)
    x = np.concatenate([np.zeros(samples(0.5)), ring, np.zeros(samples(0.6)), *after])
    return x + floor_noise(len(x), rng)


@pytest.mark.parametrize("country", ["DE", "US", "UK", "JP"])
def test_answer_at_first_voice_after_ringback(country: str) -> None:
    rng = np.random.default_rng(10)
    speech = babble(2.0, rng)
    x = ringback_then(country, rng, speech, np.zeros(samples(1.0)))
    start = len(x) - samples(3.0)
    found = answers(country, to_pcm(x))
    assert len(found) == 1
    assert abs(found[0].sample - start) <= ONSET_TOL


def false_events(rng: np.random.Generator) -> list[np.ndarray]:
    """A click (< 30 ms), 100 ms tone bursts (1 kHz, and 425 Hz of the plan), a 150 ms
    noise burst, each followed by a second of quiet."""
    t = np.arange(samples(0.1)) / RATE
    click = rng.normal(0, 6000, samples(0.025)) * np.exp(-np.arange(200) / 40)
    tone_1k = FULL_SCALE * 0.2 * np.sin(2 * np.pi * 1000 * t)
    tone_425 = FULL_SCALE * 0.2 * np.sin(2 * np.pi * 425 * t)
    noise = rng.normal(0, FULL_SCALE * 0.07, samples(0.15))
    gap = np.zeros(samples(1.0))
    return [click, gap, tone_1k, gap, tone_425, gap, noise, gap]


def test_click_tone_burst_and_noise_burst_do_not_answer() -> None:
    rng = np.random.default_rng(11)
    x = ringback_then("DE", rng, *false_events(rng), np.zeros(samples(3.0)))
    assert answers("DE", to_pcm(x)) == []


def test_real_voice_answers_after_false_events() -> None:
    rng = np.random.default_rng(12)
    x = ringback_then("DE", rng, *false_events(rng), babble(1.5, rng))
    start = len(x) - samples(1.5)
    found = answers("DE", to_pcm(x))
    assert len(found) == 1
    assert abs(found[0].sample - start) <= ONSET_TOL


def test_dialing_without_ringback_then_voice() -> None:
    """Dial tone, DTMF digits, silence, no ringback, then the far end speaks."""
    rng = np.random.default_rng(13)
    dial = progress_tone(tone_plan("NL").dial, 1.5, rng)
    x = np.concatenate([dial, dtmf_digits(rng, 10), np.zeros(samples(2.0)), babble(1.5, rng)])
    x = x + floor_noise(len(x), rng)
    found = answers("NL", to_pcm(x))
    assert len(found) == 1
    assert abs(found[0].sample - (len(x) - samples(1.5))) <= ONSET_TOL


def test_voice_in_a_ringback_gap_while_it_goes_on_is_not_the_answer() -> None:
    """The dealer says something between two ringback bursts: the ringback resumes, so
    that was not the answer; the answer is the voice after the ringback stops."""
    rng = np.random.default_rng(14)
    spec = tone_plan("DE").ringback  # 1 s on, 4 s off
    ring = progress_tone(spec, 11.0, rng)  # bursts at 0, 5, 10 s
    ring[samples(6.5):samples(6.5) + samples(0.8)] += babble(0.8, rng, 110.0, -14.0)
    x = np.concatenate([np.zeros(samples(0.5)), ring, progress_tone(spec, 6.0, rng),
                        np.zeros(samples(0.5)), babble(1.5, rng)])
    x = x + floor_noise(len(x), rng)
    found = answers("DE", to_pcm(x))
    assert len(found) == 1
    assert abs(found[0].sample - (len(x) - samples(1.5))) <= ONSET_TOL


def test_once_per_call_arm_and_reset() -> None:
    rng = np.random.default_rng(15)
    x, truth = sequence([("gap", 0.5), ("speech", 1.0), ("gap", 1.0), ("speech", 1.0),
                         ("gap", 1.0)], rng)
    pcm = to_pcm(x)
    det = AnswerDetector("DE")
    first = [e for e in run(det, pcm) if isinstance(e, Answer)]
    assert len(first) == 1 and abs(first[0].sample - truth[0][0]) <= ONSET_TOL
    assert det.state == ANSWERED
    det.reset()
    assert det.state == WAITING
    again = [e for e in run(det, pcm, start=len(pcm)) if isinstance(e, Answer)]
    assert len(again) == 1 and abs(again[0].sample - len(pcm) - truth[0][0]) <= ONSET_TOL
    det.reset()
    det.arm(truth[0][1] + samples(0.3))  # off-hook after the first stretch of speech
    late = [e for e in run(det, pcm) if isinstance(e, Answer)]
    assert len(late) == 1 and abs(late[0].sample - truth[1][0]) <= ONSET_TOL


def test_dialing_done_hint_ignores_voice_before_it() -> None:
    rng = np.random.default_rng(16)
    x, truth = sequence([("gap", 0.5), ("speech", 1.0), ("gap", 1.0), ("speech", 1.0),
                         ("gap", 1.0)], rng)
    det = AnswerDetector("DE")
    det.dialing_done(truth[0][1] + samples(0.5))
    found = [e for e in run(det, to_pcm(x)) if isinstance(e, Answer)]
    assert len(found) == 1 and abs(found[0].sample - truth[1][0]) <= ONSET_TOL


def test_report_inner_gives_tones_voice_and_answer() -> None:
    rng = np.random.default_rng(17)
    x = to_pcm(ringback_then("DE", rng, babble(1.5, rng), np.zeros(samples(1.0))))
    det = AnswerDetector("DE", report_inner=True)
    events = run(det, x)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("Answer") == 1 and kinds.count("Voice") == 1
    assert [e.tone for e in events if isinstance(e, Tone)] == ["ringback"]
    assert det.state == ANSWERED
    assert [e.sample for e in events] == sorted(e.sample for e in events)


def test_ringback_state_is_seen_before_the_answer() -> None:
    rng = np.random.default_rng(18)
    spec = tone_plan("DE").ringback
    x = to_pcm(np.concatenate([np.zeros(samples(0.5)), progress_tone(spec, 7.0, rng)]))
    det = AnswerDetector("DE")
    assert run(det, x) == []
    assert det.state == RINGBACK


@pytest.mark.parametrize("frame", [1, 160, 999])
def test_answer_independent_of_frame_length(frame: int) -> None:
    rng = np.random.default_rng(19)
    pcm = to_pcm(ringback_then("FR", rng, babble(1.5, rng), np.zeros(samples(1.0))))
    assert answers("FR", pcm, frame=frame) == answers("FR", pcm)


def test_answer_rejects_bad_config() -> None:
    with pytest.raises(CallProgressConfigError, match="'ZZ'"):
        AnswerDetector("ZZ")
    with pytest.raises(CallProgressConfigError, match="batch_samples"):
        AnswerDetector("DE", batch_samples=10)


def reference_share(frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The tonality share of each window, one window at a time (the plain definition)."""
    window = np.hanning(2 * FRAME_LEN + 2)[1:-1]
    out = []
    for i in rows:
        spec = np.fft.rfft(np.concatenate([frames[i], frames[i + 1]]) * window)
        power = spec.real * spec.real + spec.imag * spec.imag
        power[:LOW_CUT_BINS] = 0.0
        total = power.sum() + 1e-9
        share = 0.0
        for _ in range(2):
            peak = int(power.argmax())
            lo, hi = max(peak - PEAK_HALF_WIDTH, 0), peak + PEAK_HALF_WIDTH + 1
            share += power[lo:hi].sum()
            power[lo:hi] = 0.0
        out.append(share / total)
    return np.array(out)


def test_tonality_share_matches_its_plain_definition() -> None:
    """Silent windows, a tone on the lowest and on the highest bin counted, pairs, speech
    and noise: the batched share picks the same peaks as the plain definition."""
    rng = np.random.default_rng(5)
    t = np.arange(2 * FRAME_LEN) / RATE
    windows = [np.zeros(2 * FRAME_LEN), np.full(2 * FRAME_LEN, 300.0)]
    windows += [8000.0 * np.sin(2 * np.pi * f * t) for f in (100.0, 425.0, 3950.0, 3975.0)]
    windows += [4000.0 * (np.sin(2 * np.pi * 697.0 * t) + np.sin(2 * np.pi * 1209.0 * t))]
    windows += [rng.normal(0.0, 500.0, 2 * FRAME_LEN) for _ in range(4)]
    windows += list(babble(0.2, rng).reshape(-1, 2 * FRAME_LEN))
    frames = np.concatenate(windows).reshape(-1, FRAME_LEN)
    rows = np.arange(len(frames) - 1)
    got = _Spectra().share(frames, rows)
    want = reference_share(frames, rows)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)
    assert np.array_equal(got >= TONAL_SHARE, want >= TONAL_SHARE)
    assert (want[[4, 6, 8, 10, 12]] >= TONAL_SHARE).all()  # the tones and the pair
    assert want[0] == 0.0  # silence


def test_tone_detector_uses_the_vads_frames_only_when_they_fit() -> None:
    """The answer detector hands the VAD's frames and energies to the tone detector: the
    tones found are those of a lone tone detector; frames of another stretch are ignored;
    frames that fit are used as given."""
    rng = np.random.default_rng(9)
    pcm = to_pcm(ringback_then("DE", rng, babble(2.0, rng)))
    names = ("lone", "shared", "late", "short", "forged")
    det = {name: ToneDetector("DE", batch_samples=1) for name in names}
    vad = VoiceDetector(batch_samples=1)
    events: dict[str, list[DetectorEvent]] = {name: [] for name in names}
    batch = 3200
    for i in range(0, len(pcm) - batch + 1, batch):
        piece = pcm[i:i + batch]
        vad.feed(i, piece)
        audio = vad.last_audio
        assert audio is not None and audio[0] == i and len(audio[1]) == batch // FRAME_LEN
        quiet = np.zeros(len(audio[2]))  # forged energies: nothing is loud enough for a tone
        events["lone"] += det["lone"].feed(i, piece)
        events["shared"] += det["shared"].feed(i, piece, blocks=audio)
        events["late"] += det["late"].feed(i, piece, blocks=(i + FRAME_LEN, audio[1], quiet))
        events["short"] += det["short"].feed(i, piece, blocks=(i, audio[1][1:], quiet[1:]))
        events["forged"] += det["forged"].feed(i, piece, blocks=(i, audio[1], quiet))
    assert any(isinstance(e, Tone) and e.tone == "ringback" for e in events["lone"])
    assert events["shared"] == events["lone"]
    assert events["late"] == events["lone"] and events["short"] == events["lone"]
    assert events["forged"] == []  # used as given
    answer = AnswerDetector("DE", report_inner=True, batch_samples=batch)
    got = run(answer, pcm[:len(pcm) // batch * batch], frame=batch)
    assert [e for e in got if isinstance(e, Tone)] == events["lone"]
