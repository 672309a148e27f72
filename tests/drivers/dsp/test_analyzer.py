"""LineAnalyzer: every live detector of a line behind one feed().

The dial tone is the case that needs them together: a dial tone lasts from off-hook until
the exchange hears the first digit, so its length says nothing (a 1 s DE dial tone is as
long as a ringback burst); the DTMF digit that cuts it off does. Tone vectors come from
the plain-numpy generators of test_tones, DTMF from tests/drivers/dsp/vectors.py, whole
calls from the line simulator with its ground truth.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest

from drivers.dsp.analyzer import FILE_BATCH_SAMPLES, LineAnalyzer
from drivers.dsp.events import Answer, CallerId, DetectorEvent, DtmfDigit, Tone
from drivers.sim import synth
from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario, parse_scenario
from drivers.toneplan import tone_plan
from tests.drivers.dsp import vectors
from tests.drivers.dsp.test_tones import (
    chords,
    on_intervals,
    progress_tone,
    samples,
    to_pcm,
    tone_duration_s,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "scenarios"
START_TOL = samples(0.05)  # the requirement: dial tone start within 50 ms
CUT_TOL = samples(0.06)  # ...and its end within ~60 ms of the first digit
ANSWER_TOL = samples(0.5)
RATE = 8000
OFF_HOOK_S = 4011 / RATE  # not on a block boundary
DTMF_DBFS = -11.0  # a phone's high group (ITU-T Q.23 practice: -6 .. -10 dBm0)
DTMF_TWIST_DB = -2.0  # the high group 2 dB above the low group (pre-emphasis)


# --- vectors ---------------------------------------------------------------------------
def keyed(digits: str, rng: np.random.Generator, level_dbfs: float = DTMF_DBFS,
          on_s: tuple[float, float] = (0.07, 0.1)) -> tuple[np.ndarray, list[int]]:
    """Hand-keyed digits (``on_s`` on, 120-400 ms off) and their start offsets."""
    parts, starts, pos = [], [], 0
    for i, digit in enumerate(digits):
        if i:
            gap = np.zeros(samples(rng.uniform(0.12, 0.4)))
            parts.append(gap)
            pos += len(gap)
        tone = vectors.dtmf(digit, rng.uniform(*on_s), level_dbfs, DTMF_TWIST_DB,
                            phases=(rng.uniform(0, 6.3), rng.uniform(0, 6.3)))
        starts.append(pos)
        parts.append(tone)
        pos += len(tone)
    return np.concatenate(parts), starts


def dial_end(country: str, off_hook: int, first_digit: int) -> int:
    """Where the dial tone ends in the truth: at the first digit, or at the end of the
    last burst of a cadenced dial tone (IT, CZ, GR) when the digit comes in a pause."""
    spec = tone_plan(country).dial
    dial_s = (first_digit - off_hook) / RATE
    last_on_s = max(b for a, b in on_intervals(spec.cadence, dial_s) if a < dial_s)
    return off_hook + min(samples(last_on_s), first_digit - off_hook)


def dial_then_digits(country: str, dial_s: float, digits: str, rng: np.random.Generator,
                     overlap_s: float = 0.0, dtmf_dbfs: float = DTMF_DBFS
                     ) -> tuple[np.ndarray, int, int]:
    """Quiet, off-hook, ``dial_s`` of dial tone, the digits, 2 s of quiet; ``overlap_s``
    more of dial tone sounds under the first digit (the exchange is slow to remove it;
    the keys are held 100-140 ms then). Returns the audio, the dial tone's start and its
    end in the truth."""
    off_hook = samples(OFF_HOOK_S)
    first_digit = off_hook + samples(dial_s)
    dial = progress_tone(tone_plan(country).dial, dial_s + overlap_s, rng)
    keys, _ = keyed(digits, rng, dtmf_dbfs, (0.1, 0.14) if overlap_s else (0.07, 0.1))
    x = np.zeros(first_digit + len(keys) + samples(2.0))
    x[off_hook:off_hook + len(dial)] += dial
    x[first_digit:first_digit + len(keys)] += keys
    x += rng.normal(0.0, vectors.amplitude(-60.0) / np.sqrt(2), len(x))
    return x, off_hook, dial_end(country, off_hook, first_digit)


def analyse(analyzer: LineAnalyzer, pcm: np.ndarray, frame: int = 160,
            start: int = 0) -> list[DetectorEvent]:
    events: list[DetectorEvent] = []
    for i in range(0, len(pcm), frame):
        events += analyzer.feed(start + i, pcm[i:i + frame])
    return events + analyzer.finish(start + len(pcm))


def tones(events: list[DetectorEvent]) -> list[Tone]:
    return [e for e in events if isinstance(e, Tone)]


def digits_of(events: list[DetectorEvent]) -> str:
    return "".join(e.digit for e in sorted((e for e in events if isinstance(e, DtmfDigit)),
                                           key=lambda e: e.sample))


# --- dial tone cut off by the first digit ------------------------------------------------
DIAL_CASES = [
    ("DE", 0.8), ("DE", 1.0), ("DE", 1.1), ("DE", 1.3), ("AT", 1.0), ("AT", 1.5),
    ("NL", 0.9), ("NL", 0.5), ("UK", 1.2), ("US", 0.8), ("US", 1.5), ("FR", 1.5),
    ("IT", 0.9), ("IT", 1.4), ("CZ", 1.2), ("GR", 1.1), ("CH", 1.0), ("ES", 1.5),
    ("SE", 1.0), ("PL", 1.0), ("JP", 1.0), ("IN", 1.1), ("AU", 0.8), ("ZA", 1.3),
]


@pytest.mark.parametrize(("country", "dial_s"), DIAL_CASES)
def test_dial_tone_cut_off_by_the_first_digit(country: str, dial_s: float) -> None:
    """Lengths that equal a ringback (DE, AT, FR) or busy (NL 0.5 s) burst included."""
    rng = np.random.default_rng([DIAL_CASES.index((country, dial_s)), 1])
    x, start, end = dial_then_digits(country, dial_s, "0221987", rng)
    events = analyse(LineAnalyzer(country), to_pcm(x))
    found = tones(events)
    assert [t.tone for t in found] == ["dial"]
    assert abs(found[0].sample - start) <= START_TOL
    assert abs(found[0].end_sample - end) <= CUT_TOL
    assert digits_of(events) == "0221987"


@pytest.mark.parametrize("country", ["DE", "US", "FR"])
@pytest.mark.parametrize("dtmf_dbfs", [-8.0, -28.0], ids=["loud-keys", "weak-keys"])
def test_dial_tone_sounding_under_the_first_digit_ends_at_it(country: str,
                                                             dtmf_dbfs: float) -> None:
    """The exchange removes the dial tone 40 ms into the first digit: the digit is not
    part of the dial tone, even when it is too weak to break the tone's blocks."""
    rng = np.random.default_rng([7, int(-dtmf_dbfs)])
    x, start, end = dial_then_digits(country, 1.1, "5550123", rng, overlap_s=0.04,
                                     dtmf_dbfs=dtmf_dbfs)
    events = analyse(LineAnalyzer(country), to_pcm(x))
    found = tones(events)
    assert [t.tone for t in found] == ["dial"]
    assert abs(found[0].sample - start) <= START_TOL
    assert abs(found[0].end_sample - end) <= CUT_TOL
    assert digits_of(events) == "5550123"


def test_dial_tone_report_does_not_depend_on_the_frame_length() -> None:
    x, _, _ = dial_then_digits("DE", 1.05, "0891234", np.random.default_rng(3))
    pcm = to_pcm(x)
    reference = sorted(tones(analyse(LineAnalyzer("DE"), pcm)), key=lambda t: t.sample)
    assert [t.tone for t in reference] == ["dial"]
    for frame in (1, 999, 4096):
        found = tones(analyse(LineAnalyzer("DE"), pcm, frame=frame, start=123_457))
        shifted = [Tone(t.sample - 123_457, t.end_sample - 123_457, t.tone) for t in found]
        assert shifted == reference


def test_a_lone_burst_without_digits_stays_ambiguous() -> None:
    """1 s of 425 Hz then quiet on a DE line: a dial tone or one ringback burst (the far
    end answered); nothing cut it, so nothing is claimed."""
    rng = np.random.default_rng(4)
    x = np.concatenate([np.zeros(samples(0.5)), progress_tone(tone_plan("DE").dial, 1.0, rng),
                        np.zeros(samples(6.0))])
    assert tones(analyse(LineAnalyzer("DE"), to_pcm(x))) == []


# --- no false dial tone --------------------------------------------------------------------
def with_digits_after(parts: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Each part followed 30-90 ms later by a few keyed digits, then 1.5 s of quiet."""
    out = []
    for part in parts:
        keys, _ = keyed("1234#", rng)
        out += [part, np.zeros(samples(rng.uniform(0.03, 0.09))), keys,
                np.zeros(samples(1.5))]
    x = np.concatenate(out)
    return x + rng.normal(0.0, vectors.amplitude(-60.0) / np.sqrt(2), len(x))


@pytest.mark.parametrize("country", ["DE", "IT", "CZ", "US", "UK", "FR"])
def test_digits_after_speech_music_and_tones_make_no_dial_tone(country: str) -> None:
    """An IVR call: the dealer keys digits right after a phrase, during hold music, after
    a ringback that turned busy. The busy tone is reported; a dial tone is not."""
    rng = np.random.default_rng(12)
    plan = tone_plan(country)
    phrases = [synth.speech_like(rng.uniform(1.5, 3.0), voice, rng, -18.0)
               * vectors.FULL_SCALE for voice in ("customer", "dealer", "customer")]
    ring_busy = np.concatenate([
        progress_tone(plan.ringback, tone_duration_s(plan.ringback), rng),
        np.zeros(samples(0.3)), progress_tone(plan.busy, tone_duration_s(plan.busy), rng)])
    x = with_digits_after([*phrases, chords(6.0, rng), ring_busy], rng)
    events = analyse(LineAnalyzer(country), to_pcm(x))
    assert [t.tone for t in tones(events)] == ["ringback", "busy"]
    assert digits_of(events) == "1234#" * 5


# --- whole calls from the simulator --------------------------------------------------------
def test_simulated_outbound_call_dial_digits_ringback_answer_busy() -> None:
    """examples/scenarios/outbound.toml (DE): 0.8-2 s of dial tone cut by the first key."""
    scenario = load_scenario(EXAMPLES / "outbound.toml")
    pcm, _, truth = render(scenario)
    call = truth[0]
    events = analyse(LineAnalyzer(scenario.country), pcm)
    found = {t.tone: t for t in tones(events)}
    assert sorted(t.tone for t in tones(events)) == ["busy", "dial", "ringback"]
    assert abs(found["dial"].sample - call.start_sample) <= START_TOL  # HOOK_OFF
    assert abs(found["dial"].end_sample - call.digit_samples[0]) <= CUT_TOL
    assert call.answer_sample is not None and call.far_speech_sample is not None
    ring_start = call.answer_sample - samples(scenario.calls[0].ringback_s)
    assert abs(found["ringback"].sample - ring_start) <= START_TOL
    assert abs(found["ringback"].end_sample - call.answer_sample) <= CUT_TOL
    assert call.far_speech_sample < found["busy"].sample < call.end_sample
    assert digits_of(events) == call.dialed
    answers = [e for e in events if isinstance(e, Answer)]
    assert len(answers) == 1
    assert abs(answers[0].sample - call.far_speech_sample) <= ANSWER_TOL


TWO_CALLS = """country = "{country}"
seed = {seed}
noise_dbfs = -55.0
tail_s = 1.0
[[calls]]
gap_s = 1.0
direction = "outbound"
dialed = "0221987"
ringback_s = {ringback_s}
talk_s = 4.0
hangup = "near"
[[calls]]
gap_s = 2.0
direction = "outbound"
dialed = "0891234"
ringback_s = {ringback_s}
talk_s = 4.0
hangup = "near"
"""


@pytest.mark.parametrize(("country", "ringback_s"), [("DE", 11.0), ("US", 13.0),
                                                      ("UK", 7.0), ("IT", 6.0)])
def test_reset_between_calls(country: str, ringback_s: float) -> None:
    """The call engine resets the analyzer at HOOK_OFF and HOOK_ON: each call gets its
    own dial tone, digits, ringback and one Answer, nothing leaks into the next."""
    scenario = parse_scenario(TWO_CALLS.format(country=country, seed=len(country) + 3,
                                               ringback_s=ringback_s))
    pcm, _, truth = render(scenario)
    analyzer = LineAnalyzer(country)
    bounds = [0] + [s for c in truth for s in (c.start_sample, c.end_sample)] + [len(pcm)]
    per_call: list[list[DetectorEvent]] = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        if i:
            analyzer.reset()
        events = [e for f in range(a, b, 160) for e in analyzer.feed(f, pcm[f:min(f + 160, b)])]
        if i % 2:  # from HOOK_OFF to HOOK_ON: a call
            per_call.append(events)
        else:
            assert events == [], "nothing to report between calls"
    for call, events in zip(truth, per_call, strict=True):
        assert call.far_speech_sample is not None
        dial = [t for t in tones(events) if t.tone == "dial"]
        assert len(dial) == 1
        assert abs(dial[0].sample - call.start_sample) <= START_TOL
        end = dial_end(country, call.start_sample, call.digit_samples[0])
        assert abs(dial[0].end_sample - end) <= CUT_TOL
        assert [t.tone for t in tones(events)].count("ringback") == 1
        assert digits_of(events) == call.dialed
        answers = [e for e in events if isinstance(e, Answer)]
        assert len(answers) == 1
        assert abs(answers[0].sample - call.far_speech_sample) <= ANSWER_TOL


def test_hook_state_runs_only_what_can_occur() -> None:
    """On-hook: caller ID but no call progress; off-hook: call progress but no FSK."""
    repo = Path(__file__).resolve().parents[3]
    inbound, _, _ = render(load_scenario(repo / "examples" / "scenarios" / "inbound-us-bell202.toml"))
    outbound, _, _ = render(load_scenario(repo / "examples" / "scenarios" / "outbound.toml"))

    def run(pcm: np.ndarray, off_hook: bool, country: str) -> list:
        analyzer = LineAnalyzer(country)
        analyzer.hook(off_hook)
        found = []
        for s in range(0, len(pcm), 160):
            found += analyzer.feed(s, pcm[s:s + 160])
        return found

    assert any(isinstance(e, CallerId) for e in run(inbound, False, "US"))
    assert not any(isinstance(e, CallerId) for e in run(inbound, True, "US"))
    assert any(isinstance(e, Tone) for e in run(outbound, True, "DE"))
    on_hook = run(outbound, False, "DE")
    assert not any(isinstance(e, (Tone, Answer)) for e in on_hook)
    assert any(isinstance(e, DtmfDigit) for e in on_hook)  # DTMF caller ID needs digits


def _records(events: list[DetectorEvent]) -> list[str]:
    return sorted(repr(e) for e in events)


@functools.cache
def _live_records(scenario: str) -> tuple[np.ndarray, list[str]]:
    pcm, _, _ = render(load_scenario(EXAMPLES / scenario))
    return pcm, _records(analyse(LineAnalyzer("DE"), pcm, frame=160))


@pytest.mark.parametrize("batch_s", [10, 15, 30, FILE_BATCH_SAMPLES // 8000])
@pytest.mark.parametrize("scenario", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_file_batches_hear_exactly_what_the_live_line_hears(scenario: str, batch_s: int,
                                                            ) -> None:
    """`analyze` feeds batches of a minute; the call engine 20 ms frames. Same events, same
    times, whatever the batch: a digit reported more than 10 s after the batch's start
    still cuts its dial tone, the answer is judged on the tone state of its own moment
    (not on a later tone in the same batch), and a file shorter than a batch keeps its
    digits."""
    pcm, live = _live_records(scenario)
    batch = batch_s * 8000
    file_events = analyse(LineAnalyzer("DE", batch_samples=batch), pcm, frame=batch)
    assert live, "the scenario should produce events"
    assert _records(file_events) == live


@pytest.mark.parametrize("tail_s", [0.0, 4.0])
def test_digits_of_a_file_shorter_than_one_batch_are_reported(tail_s: float) -> None:
    """A recording of a few key presses shorter than one file batch (the last digit right
    at its end, or seconds before it) reports every digit at finish."""
    audio = np.concatenate([vectors.silence(0.3), vectors.dtmf_string("147#", 0.08, 0.08, trail_s=0.0),
                            vectors.silence(tail_s)])
    pcm = vectors.to_int16(audio)
    analyzer = LineAnalyzer("US", batch_samples=FILE_BATCH_SAMPLES)
    events = analyzer.feed(0, pcm) + analyzer.finish(len(pcm))
    assert digits_of(events) == "147#"


@pytest.mark.parametrize("tail_s", [0.0, 0.05, 3.0])
def test_a_caller_id_in_the_last_partial_batch_of_a_file_is_reported(tail_s: float) -> None:
    """A file that ends within 10 s after an FSK caller ID (less than one file batch, or
    right at the burst's end) still reports it at finish."""
    message = vectors.sdmf("11221830", "5551234567")
    audio = np.concatenate([vectors.silence(0.5), vectors.cid_burst(message),
                            vectors.silence(tail_s)])
    pcm = vectors.to_int16(audio)
    analyzer = LineAnalyzer("US", batch_samples=FILE_BATCH_SAMPLES)
    events = analyzer.feed(0, pcm) + analyzer.finish(len(pcm))
    found = [e for e in events if isinstance(e, CallerId)]
    assert [(e.number, e.standard) for e in found] == [("5551234567", "bell202")]
