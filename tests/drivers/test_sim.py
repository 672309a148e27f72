"""The sim line backend: scenario files, the synthesized line, pacing, playback, memory."""

from __future__ import annotations

import itertools
import subprocess
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from drivers.clock import ManualClock
from drivers.line import (
    FRAME_SAMPLES,
    AudioFrame,
    LineClosed,
    LineConfigError,
    LineItem,
    Signal,
    SignalEvent,
)
from drivers.registry import open_line
from drivers.sim.backend import CallTruth, LineStream, SimLine, SimOptions, render
from drivers.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from tests.drivers.test_synth import (
    decode_fsk,
    detect_dtmf,
    goertzel_power,
    multimon,
    tool,
    write_wav,
)

FS = 8000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCENARIOS = EXAMPLES / "scenarios"


def scenario_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def sim_line(path: Path, clock: ManualClock | None = None, **options: object) -> SimLine:
    line = open_line("sim", "L1", {"scenario": str(path), **options},
                     clock=clock or ManualClock())
    assert isinstance(line, SimLine)
    return line


def read_all(line: SimLine, limit: int = 10**7) -> list[LineItem]:
    items: list[LineItem] = []
    with line:
        for _ in range(limit):
            try:
                item = line.read()
            except LineClosed:
                break
            assert item is not None
            items.append(item)
    return items


def rendered(name: str) -> tuple[np.ndarray, list[SignalEvent], list[CallTruth], Scenario]:
    scenario = load_scenario(SCENARIOS / name)
    pcm, events, truth = render(scenario)
    return pcm, events, truth, scenario


def samples_of(events: list[SignalEvent], signal: Signal) -> list[int]:
    return [e.sample for e in events if e.signal == signal]


def band_runs(x: np.ndarray, freq_hz: float) -> list[tuple[bool, float]]:
    """(on?, seconds) runs of one frequency: Goertzel over 10 ms blocks, cut at a
    quarter of its peak power."""
    blocks = x[: x.size // 80 * 80].reshape(-1, 80)
    power = np.array([goertzel_power(b, freq_hz) for b in blocks])
    on = power > 0.25 * power.max()
    edges = [0, *(np.flatnonzero(np.diff(on.astype(int))) + 1).tolist(), on.size]
    return [(bool(on[a]), (b - a) * 80 / FS) for a, b in itertools.pairwise(edges)]


# --- scenario files ------------------------------------------------------------------
VALID_CALLS = """
[[calls]]
direction = "inbound"
caller = "0221"
[[calls]]
direction = "outbound"
dialed = "0221"
"""


@pytest.mark.parametrize(("text", "message"), [
    (VALID_CALLS + '[[calls]]\ndirection = "in"\n',
     "calls[2].direction: expected 'inbound' or 'outbound', got 'in'"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "1"\ncolour = "red"\n',
     "calls[0].colour: unknown key"),
    ("[[calls]]\ngap_s = 1.0\n", "calls[0].direction: required key missing"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "1"\ngap_s = "five"\n',
     "calls[0].gap_s: expected a number, got 'five'"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "1"\ngap_s = -1\n',
     "calls[0].gap_s: expected a number >= 0.0, got -1"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "1"\nrings = 0\n',
     "calls[0].rings: expected an integer >= 1, got 0"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "1"\ncid = "fsk"\n',
     "calls[0].cid: expected 'bell202', 'bell202_sdmf', 'v23', 'v23_dtas', 'dtmf' or "
     "'none', got 'fsk'"),
    ('[[calls]]\ndirection = "outbound"\n', "calls[0].dialed: required for outbound calls"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "1"\ndialed = "2"\n',
     "calls[0].dialed: only for outbound calls (this call is inbound)"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "12"\nrings = 2\n',
     "calls[0].rings: only for inbound calls (this call is outbound)"),
    ('[[calls]]\ndirection = "inbound"\n',
     "calls[0].caller: required unless withheld is set or cid = 'none'"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "+49 221"\n',
     "calls[0].caller: expected 1-20 digits 0-9, got '+49 221'"),
    ('[[calls]]\ndirection = "inbound"\ncaller = "1"\nwithheld = "P"\n',
     "calls[0].withheld: a withheld call presents no number; remove caller or withheld"),
    ('country = "NL"\n[[calls]]\ndirection = "inbound"\ncaller = "1"\ncaller_name = "X"\n',
     "calls[0].caller_name: caller-ID standard 'dtmf' cannot carry a name"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "12"\ndigits_keyed = 3\n',
     "calls[0].digits_keyed: 3 is more than the 2 digits of dialed"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "12"\ntalk = [{who = "boss", s = 1}]\n',
     "calls[0].talk[0].who: expected 'dealer' or 'customer', got 'boss'"),
    ('[[calls]]\ndirection = "outbound"\ndialed = "1"\ntalk_s = 3\ntalk = []\n',
     "calls[0].talk: give either talk or talk_s, not both"),
    ('country = "XX"\n', "country: unknown country 'XX'; known: AT, AU, BE"),
    ("speed = 60\n", "speed: unknown key"),
])
def test_scenario_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str,
                                                          message: str) -> None:
    path = scenario_file(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LineConfigError)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"nope\.toml: cannot read: No such file"):
        load_scenario(tmp_path / "nope.toml")
    bad = scenario_file(tmp_path, "country = \n")
    with pytest.raises(ScenarioError, match=r"x\.toml: .*line 1"):
        load_scenario(bad)


def test_examples_load_and_the_dealer_day_has_the_promised_shape() -> None:
    for path in sorted(SCENARIOS.glob("*.toml")):
        assert load_scenario(path).calls, path
    day = load_scenario(EXAMPLES / "dealer-day.toml")
    calls = day.calls
    assert len(calls) >= 12
    assert {c.direction for c in calls} == {"inbound", "outbound"}
    assert any(c.direction == "inbound" and not c.answered for c in calls)
    assert any(c.direction == "outbound" and not c.answered and not c.far_busy
               and c.digits_keyed is None for c in calls)
    assert any(c.digits_keyed is not None for c in calls)  # hang-up while dialing
    assert {c.hangup for c in calls if c.answered} == {"near", "far"}
    assert any(c.withheld for c in calls)
    assert any(c.gap_s <= 0.5 for c in calls[1:])
    plan = LineStream(day)  # plans the timeline without synthesizing audio
    assert any(t.end_s - t.answer_s >= 150 for t in plan.truth if t.answer_s is not None)
    assert 13 * 60 <= plan.end_sample / FS <= 17 * 60


# --- what the line carries -------------------------------------------------------------
def test_inbound_v23_caller_id_between_first_and_second_ring() -> None:
    pcm, events, truth, scenario = rendered("inbound.toml")
    (call,) = truth
    on, off = samples_of(events, Signal.RING_ON), samples_of(events, Signal.RING_OFF)
    assert len(on) == len(off) == 2
    assert [(b - a) / FS for a, b in zip(on, off, strict=True)] == pytest.approx([1.0, 1.0])
    assert (on[1] - on[0]) / FS == pytest.approx(5.0)  # DE ring cadence 1 s on, 4 s off
    assert call.cid_sample is not None and isinstance(call.cid_data, bytes)
    burst_end = call.cid_sample + int(np.ceil((380 + 10 * len(call.cid_data)) * FS / 1200))
    assert call.cid_sample - off[0] >= 0.5 * FS
    assert on[1] - burst_end >= 0.2 * FS
    decoded = decode_fsk(pcm[call.cid_sample - 400:burst_end + 400] / 32768.0, 1300, 2100)
    message = decoded[decoded.index(b"\x80"):]
    assert message == call.cid_data
    when = (scenario.start + timedelta(seconds=on[0] / FS)).strftime("%m%d%H%M").encode()
    assert when in message and b"022112345" in message and b"MUELLER" in message
    assert samples_of(events, Signal.HOOK_OFF) == [call.answer_sample]
    assert off[1] < call.answer_sample < off[1] + 4 * FS
    assert samples_of(events, Signal.HOOK_ON) == [call.end_sample]


def test_inbound_bell202_caller_id_decoded_by_minimodem(tmp_path: Path) -> None:
    pcm, events, truth, _ = rendered("inbound-us-bell202.toml")
    (call,) = truth
    on, off = samples_of(events, Signal.RING_ON), samples_of(events, Signal.RING_OFF)
    assert (off[0] - on[0]) / FS == pytest.approx(2.0)  # US: 2 s on, 4 s off
    assert off[0] + 0.5 * FS <= call.cid_sample < on[1] - 0.2 * FS
    segment = pcm[off[0]:on[1]] / 32768.0
    wav = write_wav(tmp_path / "line.wav", segment)
    done = subprocess.run([tool("minimodem"), "--rx", "-q", "-f", str(wav), "callerid"],
                          check=True, capture_output=True, text=True, timeout=30)
    assert "Phone: 212-555-1234" in done.stdout
    assert "Name:  DOE JOHN" in done.stdout


def test_inbound_uk_polarity_dtas_then_data_then_ringing() -> None:
    pcm, events, truth, _ = rendered("inbound-uk-dtas.toml")
    (call,) = truth
    assert events[0].signal == Signal.POLARITY_REVERSAL
    reversal, first_ring = events[0].sample, samples_of(events, Signal.RING_ON)[0]
    assert call.cid_sample is not None and isinstance(call.cid_data, bytes)
    dtas = [s for s in range(reversal, call.cid_sample - 40, 40)
            if goertzel_power(pcm[s:s + 40] / 32768.0, 2130) > 0.02
            and goertzel_power(pcm[s:s + 40] / 32768.0, 2750) > 0.02]
    assert dtas, "no DT-AS between the reversal and the first ring"
    dtas_start, dtas_end = dtas[0], dtas[-1] + 40
    assert dtas_start - reversal >= 0.1 * FS
    assert 0.08 * FS <= dtas_end - dtas_start <= 0.12 * FS
    assert call.cid_sample - dtas_end >= 0.045 * FS - 40
    burst_end = call.cid_sample + int(np.ceil((380 + 10 * len(call.cid_data)) * FS / 1200))
    assert first_ring - burst_end >= 0.2 * FS
    decoded = decode_fsk(pcm[call.cid_sample - 200:burst_end + 200] / 32768.0, 1300, 2100)
    assert call.cid_data in decoded and b"02079460000" in call.cid_data
    bursts = [(b - a) / FS for a, b in zip(samples_of(events, Signal.RING_ON),
                                           samples_of(events, Signal.RING_OFF), strict=True)]
    assert bursts == pytest.approx([0.4, 0.4, 0.4, 0.4])  # two UK double rings


def test_inbound_dtmf_caller_id_before_the_first_ring() -> None:
    pcm, events, truth, _ = rendered("inbound-nl-dtmf.toml")
    rings = samples_of(events, Signal.RING_ON)
    for call, expected in zip(truth, ["A0201234567C", "B10C"], strict=True):
        first_ring = min(r for r in rings if r >= call.start_sample)
        digits = detect_dtmf(pcm[call.start_sample:first_ring] / 32768.0)
        assert "".join(d for _, d in digits) == expected == call.cid_data
    assert truth[1].caller is None and truth[1].withheld == "P" and not truth[1].answered


def test_outbound_dial_tone_digits_ringback_answer_and_busy(tmp_path: Path) -> None:
    pcm, events, truth, _ = rendered("outbound.toml")
    (call,) = truth
    x = pcm / 32768.0
    hook_off = samples_of(events, Signal.HOOK_OFF)[0]
    digits = detect_dtmf(x)
    assert "".join(d for _, d in digits) == "022198765" == call.dialed
    assert [s for s, _ in digits] == pytest.approx(list(call.digit_samples), abs=204)
    dial = x[hook_off:call.digit_samples[0]]
    assert dial.size >= 0.8 * FS
    dial_amplitude = 2 * np.sqrt(goertzel_power(dial[:4000], 425)) / 4000
    assert 20 * np.log10(dial_amplitude) == pytest.approx(-16.14, abs=0.5)  # -13 dBm0
    last_digit_end = call.digit_samples[-1] + int(0.1 * FS)
    assert call.answer_sample is not None
    ringback = band_runs(x[last_digit_end:call.answer_sample], 425)
    assert [on for on, _ in ringback[:3]] == [False, True, False]
    assert ringback[1][1] == pytest.approx(1.0, abs=0.02)  # DE ringback 1 s on
    assert ringback[2][1] == pytest.approx(4.0, abs=0.02)  # then 4 s off
    assert samples_of(events, Signal.POLARITY_REVERSAL)[0] == call.answer_sample
    assert call.far_speech_sample is not None
    assert 0.2 * FS < call.far_speech_sample - call.answer_sample < 0.8 * FS
    busy = band_runs(x[call.end_sample - int(2.0 * FS):call.end_sample], 425)
    assert [s for on, s in busy[1:-1]] == pytest.approx([0.48] * (len(busy) - 2), abs=0.02)
    lines = multimon(tmp_path, x[hook_off:call.answer_sample], "DTMF")
    assert "".join(line.split()[-1] for line in lines) == "022198765"


def test_hang_up_while_dialing_and_busy_far_end(tmp_path: Path) -> None:
    text = ('country = "DE"\n[[calls]]\ndirection = "outbound"\ndialed = "0221555"\n'
            'digits_keyed = 3\nanswered = false\n[[calls]]\ngap_s = 1\n'
            'direction = "outbound"\ndialed = "0228"\nfar_busy = true\nanswered = false\n'
            'busy_s = 2.0\n')
    pcm, events, truth = render(parse_scenario(text))
    assert [t.dialed for t in truth] == ["022", "0228"]
    assert not any(t.answered for t in truth)
    assert "".join(d for _, d in detect_dtmf(pcm / 32768.0)) == "0220228"
    busy = band_runs(pcm[truth[1].end_sample - 2 * FS:truth[1].end_sample] / 32768.0, 425)
    assert [on for on, _ in busy[:4]] == [True, False, True, False]
    assert [e.signal for e in events] == [Signal.HOOK_OFF, Signal.HOOK_ON] * 2


def test_back_to_back_calls_are_separate_and_ordered() -> None:
    _, events, truth, _ = rendered("back-to-back.toml")
    assert [t.direction for t in truth] == ["inbound", "outbound", "inbound"]
    for before, after in itertools.pairwise(truth):
        assert after.start_sample - before.end_sample == pytest.approx(0.5 * FS, abs=1)
    assert [e.signal for e in events if e.signal in (Signal.HOOK_OFF, Signal.HOOK_ON)] \
        == [Signal.HOOK_OFF, Signal.HOOK_ON] * 3


def test_render_is_deterministic_per_seed() -> None:
    scenario = load_scenario(SCENARIOS / "inbound.toml")
    a, events_a, _ = render(scenario)
    b, events_b, _ = render(scenario)
    c, _, _ = render(scenario, seed=99)
    np.testing.assert_array_equal(a, b)
    assert events_a == events_b
    assert not np.array_equal(a[: min(a.size, c.size)], c[: min(a.size, c.size)])


# --- the backend ---------------------------------------------------------------------
def test_stream_items_are_ordered_and_equal_to_render() -> None:
    items = read_all(sim_line(SCENARIOS / "outbound.toml", speed=0))
    frames = [i for i in items if isinstance(i, AudioFrame)]
    assert [f.sample for f in frames] == list(range(0, len(frames) * FRAME_SAMPLES,
                                                    FRAME_SAMPLES))
    assert all(f.pcm.dtype == np.int16 and f.pcm.size == FRAME_SAMPLES for f in frames)
    next_frame = 0
    for item in items:  # an event precedes the frame that starts at its sample
        if isinstance(item, AudioFrame):
            next_frame = item.sample + FRAME_SAMPLES
        else:
            assert next_frame - FRAME_SAMPLES < item.sample <= next_frame or item.sample == 0
    pcm, events, _ = render(load_scenario(SCENARIOS / "outbound.toml"))
    np.testing.assert_array_equal(np.concatenate([f.pcm for f in frames]), pcm)
    assert [i for i in items if isinstance(i, SignalEvent)] == events


def test_pacing_follows_the_injected_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    items = read_all(sim_line(SCENARIOS / "inbound-uk-dtas.toml", clock, speed=10.0))
    assert clock.monotonic() == pytest.approx(items[-1].sample / FS / 10.0, abs=1e-9)


def test_read_times_out_before_the_next_item_is_due() -> None:
    clock = ManualClock()
    line = sim_line(SCENARIOS / "inbound.toml", clock, speed=1.0)
    with line:
        first = line.read(timeout_s=0.0)
        assert isinstance(first, AudioFrame) and first.sample == 0
        assert line.read(timeout_s=0.005) is None
        assert clock.monotonic() == pytest.approx(0.005)
        second = line.read(timeout_s=1.0)
        assert isinstance(second, AudioFrame) and second.sample == FRAME_SAMPLES
        assert clock.monotonic() == pytest.approx(FRAME_SAMPLES / FS)


def test_played_audio_is_mixed_into_the_following_frames() -> None:
    pcm, _, _, _ = rendered("inbound.toml")
    tone = np.rint(0.25 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(800) / FS))
    line = sim_line(SCENARIOS / "inbound.toml", speed=0)
    heard = []
    with line:
        first = line.read()
        line.play(tone.astype(np.int16))
        assert line.status()["play_queued_samples"] == 800
        while len(heard) < 6:
            item = line.read()
            if isinstance(item, AudioFrame):
                heard.append(item)
    assert isinstance(first, AudioFrame)
    got = np.concatenate([f.pcm for f in heard]).astype(np.int32)
    start = heard[0].sample
    original = pcm[start:start + got.size].astype(np.int32)
    np.testing.assert_array_equal(got[:800] - original[:800], tone.astype(np.int32))
    np.testing.assert_array_equal(got[800:], original[800:])  # played once, then gone


def test_played_audio_saturates_instead_of_wrapping() -> None:
    line = sim_line(SCENARIOS / "inbound.toml", speed=0)
    with line:
        line.read()
        line.play(np.full(FRAME_SAMPLES, 32767, dtype=np.int16))
        frame = line.read()
    assert isinstance(frame, AudioFrame)
    assert frame.pcm.min() > 30000  # noise floor added to full scale: clipped, not wrapped


def test_line_closes_at_the_end_and_stays_closed() -> None:
    line = sim_line(SCENARIOS / "inbound-uk-dtas.toml", speed=0)
    items = read_all(line)
    assert items[-1].sample < line.truth()[-1].end_sample + 2 * FS
    with pytest.raises(LineClosed, match="L1"):
        line.read()


def test_repeat_continues_the_timeline() -> None:
    line = sim_line(SCENARIOS / "inbound-uk-dtas.toml", speed=0, repeat=True)
    single = LineStream(load_scenario(SCENARIOS / "inbound-uk-dtas.toml")).end_sample
    with line:
        item = line.read()
        while item is not None and item.sample < single + 5 * FS:
            item = line.read()
        truth = line.truth()
    assert len(truth) == 2 and truth[1].start_sample > single


def test_start_offset_skips_ahead_and_tracks_state() -> None:
    clock = ManualClock()
    line = sim_line(SCENARIOS / "inbound.toml", clock, speed=1.0, start_offset_s=9.0)
    with line:
        first = line.read()
        status = line.status()
    assert first is not None and first.sample >= 9 * FS
    assert status["hook"] == "off"  # the dealer answered at about 8.1 s
    assert clock.monotonic() == pytest.approx(0.0, abs=0.03)


def test_status_follows_signals() -> None:
    line = sim_line(SCENARIOS / "inbound.toml", speed=0)
    seen = set()
    with line:
        while True:
            try:
                item = line.read()
            except LineClosed:
                break
            if isinstance(item, SignalEvent):
                status = line.status()
                seen.add((item.signal, status["hook"], status["ringing"]))
    assert (Signal.RING_ON, "on", True) in seen
    assert (Signal.HOOK_OFF, "off", False) in seen
    assert (Signal.HOOK_ON, "on", False) in seen


def test_options_are_validated_by_the_registry(tmp_path: Path) -> None:
    with pytest.raises(LineConfigError, match="speed"):
        open_line("sim", "L1", {"scenario": "x.toml", "speed": -1}, clock=ManualClock())
    with pytest.raises(LineConfigError, match="pace"):
        open_line("sim", "L1", {"scenario": "x.toml", "pace": 2}, clock=ManualClock())
    line = open_line("sim", "L1", SimOptions(scenario=str(tmp_path / "missing.toml")),
                     clock=ManualClock())
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read"):
        line.open()


def test_an_hour_long_call_is_not_held_in_memory(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, 'country = "DE"\n[[calls]]\ndirection = "outbound"\n'
                                   'dialed = "0221"\nringback_s = 2\n'
                                   'talk = [{who = "dealer", s = 3600}]\n')  # one long turn
    line = sim_line(path, speed=0)
    tracemalloc.start()
    try:
        with line:
            while line.read().sample < 240 * FS:
                pass
            _, peak = tracemalloc.get_traced_memory()
            planned = line.truth()[0].end_sample
    finally:
        tracemalloc.stop()
    assert planned > 3600 * FS  # the whole hour is planned...
    assert peak < 8_000_000  # ...yet far less than its 57.6 MB of int16 is ever held


def test_dealer_day_plan_matches_its_events() -> None:
    stream = LineStream(load_scenario(EXAMPLES / "dealer-day.toml"))
    events = list(stream._events)  # planned signals, no audio needed
    for call in stream.truth:
        mine = [e for e in events if call.start_sample <= e.sample <= call.end_sample]
        hooks = [e.signal for e in mine if e.signal in (Signal.HOOK_OFF, Signal.HOOK_ON)]
        picked_up = call.direction == "outbound" or call.answered
        assert hooks == ([Signal.HOOK_OFF, Signal.HOOK_ON] if picked_up else [])
        if call.direction == "inbound":
            assert samples_of(mine, Signal.RING_ON).__len__() == call.rings
            if call.answered:
                assert samples_of(mine, Signal.HOOK_OFF) == [call.answer_sample]
        if call.withheld:
            assert call.caller is None


def test_a_scenario_without_country_takes_the_lines(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, '[[calls]]\ndirection = "inbound"\ncaller = "0201234"\n'
                                   'rings = 1\ntalk_s = 2\n')
    line = open_line("sim", "L1", {"scenario": str(path), "speed": 0}, clock=ManualClock(),
                     country="NL")
    assert isinstance(line, SimLine) and read_all(line)
    assert line.truth()[0].cid == "dtmf"  # the Dutch default
    named = scenario_file(tmp_path, '[[calls]]\ndirection = "inbound"\ncaller = "1"\n'
                                    'caller_name = "X"\n')
    line = open_line("sim", "L2", {"scenario": str(named)}, clock=ManualClock(), country="NL")
    with pytest.raises(ScenarioError, match=r"calls\[0\]\.caller_name: .*'dtmf'.*line country NL"):
        line.open()
