"""The call state machine over ordinary and odd signal sequences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from drivers.clock import ManualClock
from drivers.dsp.events import Answer, CallerId, DtmfDigit
from drivers.line import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Signal, SignalEvent
from firmware.engine import (
    TRANSITIONS,
    Action,
    Call,
    CallEngine,
    EngineLimits,
    Ev,
    State,
    Transition,
)


class Listener:
    def __init__(self) -> None:
        self.transitions: list[tuple[str, Transition]] = []
        self.frames: dict[str, int] = {}
        self.digits: list[str] = []
        self.calls: dict[str, Call] = {}

    def on_transition(self, call: Call, tr: Transition) -> None:
        self.transitions.append((call.id, tr))
        self.calls[call.id] = call

    def on_audio(self, call: Call, frame: AudioFrame) -> None:
        self.frames[call.id] = self.frames.get(call.id, 0) + 1

    def on_digit(self, call: Call, digit: DtmfDigit) -> None:
        self.digits.append(digit.digit)

    def ended(self) -> list[Call]:
        return [self.calls[cid] for cid, tr in self.transitions if tr.next is State.ENDED]


def make(limits: EngineLimits = EngineLimits()) -> tuple[CallEngine, Listener]:
    listener = Listener()
    counter = itertools.count(1)
    engine = CallEngine("l1", listener, clock=ManualClock(), new_id=lambda: f"c{next(counter)}",
                        limits=limits)
    return engine, listener


def s(t: float) -> int:
    return int(t * SAMPLE_RATE)


def sig(engine: CallEngine, t: float, signal: Signal, **kw: object) -> None:
    engine.feed(SignalEvent(s(t), signal, **kw))  # type: ignore[arg-type]


def audio(engine: CallEngine, t0: float, t1: float) -> None:
    """Feed silent frames covering [t0, t1)."""
    pcm = np.zeros(FRAME_SAMPLES, dtype=np.int16)
    for start in range(s(t0), s(t1), FRAME_SAMPLES):
        engine.feed(AudioFrame(start, pcm))


def test_inbound_answered() -> None:
    eng, lis = make()
    audio(eng, 0, 1)
    sig(eng, 1, Signal.RING_ON)
    audio(eng, 1, 3)
    sig(eng, 3, Signal.RING_OFF)
    eng.feed_detector_event(CallerId(s(3.5), "5551234", "SMITH", "bell202"))
    audio(eng, 3, 7)
    sig(eng, 7, Signal.RING_ON)
    audio(eng, 7, 7.5)
    sig(eng, 7.5, Signal.RING_OFF)
    sig(eng, 7.5, Signal.HOOK_OFF)
    audio(eng, 7.5, 20)
    sig(eng, 20, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert call.direction == "inbound"
    assert call.caller_number == "5551234" and call.caller_name == "SMITH"
    assert call.rings == 2
    assert call.offset_s(call.answer_sample) == pytest.approx(6.5)
    assert call.offset_s(call.end_sample) == pytest.approx(19.0)
    assert call.end_reason == "hangup"
    states = [tr.next for _, tr in lis.transitions]
    assert states[0] is State.RINGING and State.CONNECTED in states and states[-1] is State.ENDED
    assert eng.state is State.IDLE and eng.call is None
    # audio from the first ring to hang-up, pre-answer included
    assert lis.frames[call.id] == pytest.approx((20 - 1) * 50, abs=2)


def test_outbound_dial_answer_hangup() -> None:
    eng, lis = make()
    sig(eng, 0.5, Signal.HOOK_OFF)
    audio(eng, 0.5, 2)
    for i, d in enumerate("0221"):
        eng.feed_detector_event(DtmfDigit(s(2 + i * 0.2), d))
    audio(eng, 2, 6)
    eng.feed_detector_event(Answer(s(6)))
    eng.feed_detector_event(DtmfDigit(s(7), "5"))  # in-call digit: not part of the number
    audio(eng, 6, 9)
    sig(eng, 9, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert (call.direction, call.dialed, call.end_reason) == ("outbound", "0221", "hangup")
    assert call.offset_s(call.answer_sample) == pytest.approx(5.5)
    assert lis.digits == ["5"]
    path = [(tr.prev, tr.next) for _, tr in lis.transitions if tr.prev is not tr.next]
    assert path == [(State.IDLE, State.OFF_HOOK), (State.OFF_HOOK, State.DIALING),
                    (State.DIALING, State.CONNECTED), (State.CONNECTED, State.ENDED)]


def test_ring_no_answer_times_out() -> None:
    eng, lis = make(EngineLimits(ring_timeout_s=8))
    for k in range(3):
        sig(eng, k * 6.0, Signal.RING_ON)
        sig(eng, k * 6.0 + 2, Signal.RING_OFF)
    audio(eng, 0, 30)
    (call,) = lis.ended()
    assert call.end_reason == "no_answer" and call.answer_sample is None
    assert call.rings == 3
    # ended 8 s after the last ring edge (t=14), give or take a frame
    assert call.end_sample / SAMPLE_RATE == pytest.approx(22.0, abs=0.05)


def test_hangup_while_dialing_and_before_dialing() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.HOOK_OFF)
    eng.feed_detector_event(DtmfDigit(s(1), "1"))
    sig(eng, 2, Signal.HOOK_ON)
    sig(eng, 3, Signal.HOOK_OFF)
    sig(eng, 4, Signal.HOOK_ON)
    first, second = lis.ended()
    assert (first.end_reason, first.dialed) == ("hangup_while_dialing", "1")
    assert (second.end_reason, second.dialed) == ("hangup_before_dialing", "")
    assert first.id != second.id


def test_glare_ring_right_after_off_hook_is_inbound() -> None:
    eng, lis = make(EngineLimits(glare_window_s=1.0))
    sig(eng, 10.0, Signal.HOOK_OFF)
    sig(eng, 10.3, Signal.RING_ON)
    sig(eng, 10.35, Signal.RING_OFF)
    sig(eng, 30, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert call.direction == "inbound" and "glare" in call.notes
    assert call.answer_sample == s(10.0)
    assert any(tr.action is Action.GLARE for _, tr in lis.transitions)


def test_ring_long_after_off_hook_is_not_glare() -> None:
    eng, lis = make(EngineLimits(glare_window_s=1.0))
    sig(eng, 0, Signal.HOOK_OFF)
    sig(eng, 5, Signal.RING_ON)
    sig(eng, 9, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert call.direction == "outbound"


def test_back_to_back_calls_get_new_ids() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.RING_ON)
    sig(eng, 1, Signal.HOOK_OFF)
    sig(eng, 5, Signal.HOOK_ON)
    sig(eng, 5.2, Signal.HOOK_OFF)  # picks up again at once to call back
    eng.feed_detector_event(DtmfDigit(s(6), "9"))
    eng.feed_detector_event(Answer(s(8)))
    sig(eng, 12, Signal.HOOK_ON)
    sig(eng, 12.1, Signal.RING_ON)  # and the phone rings straight after
    sig(eng, 13, Signal.HOOK_OFF)
    sig(eng, 20, Signal.HOOK_ON)
    calls = lis.ended()
    assert [c.direction for c in calls] == ["inbound", "outbound", "inbound"]
    assert len({c.id for c in calls}) == 3


def test_off_hook_for_hours_rolls_segments() -> None:
    eng, lis = make(EngineLimits(max_segment_s=3600))
    sig(eng, 0, Signal.HOOK_OFF)
    audio(eng, 0, 3 * 3600 + 100)
    sig(eng, 3 * 3600 + 100, Signal.HOOK_ON)
    segs = [tr for _, tr in lis.transitions if tr.action is Action.NEW_SEGMENT]
    assert [tr.detail["segment"] for tr in segs] == [1, 2, 3]
    assert [tr.sample for tr in segs] == [s(3600), s(7200), s(10800)]
    (call,) = lis.ended()
    assert call.segment == 3


def test_early_caller_id_before_first_ring_attaches_to_call() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.POLARITY_REVERSAL)
    eng.feed_detector_event(CallerId(s(0.3), "0301234", None, "v23"))
    sig(eng, 1.0, Signal.RING_ON)
    sig(eng, 2.0, Signal.HOOK_OFF)
    sig(eng, 3.0, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert (call.caller_number, call.caller_id_standard) == ("0301234", "v23")


def test_stale_early_caller_id_is_dropped() -> None:
    eng, lis = make()
    eng.feed_detector_event(CallerId(s(0.3), "0301234", None, "v23"))
    sig(eng, 60.0, Signal.RING_ON)
    sig(eng, 61.0, Signal.HOOK_OFF)
    sig(eng, 62.0, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert call.caller_number is None


def test_polarity_reversal_answers_outbound() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.HOOK_OFF)
    eng.feed_detector_event(DtmfDigit(s(1), "7"))
    sig(eng, 5, Signal.POLARITY_REVERSAL)
    sig(eng, 9, Signal.HOOK_ON)
    (call,) = lis.ended()
    assert call.answer_sample == s(5) and call.end_reason == "hangup"


def test_digital_line_setup_connect_release() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.CALL_SETUP, calling="0891234", called="0301111", outgoing=False)
    sig(eng, 3, Signal.CALL_CONNECT)
    sig(eng, 9, Signal.CALL_RELEASE)
    sig(eng, 10, Signal.CALL_SETUP, calling="0301111", called="0897777", outgoing=True)
    sig(eng, 14, Signal.CALL_CONNECT)
    sig(eng, 20, Signal.CALL_RELEASE)
    inbound, outbound = lis.ended()
    assert (inbound.direction, inbound.caller_number, inbound.end_reason) == (
        "inbound", "0891234", "hangup")
    assert (outbound.direction, outbound.dialed) == ("outbound", "0897777")
    assert outbound.offset_s(outbound.answer_sample) == pytest.approx(4)


def test_shutdown_ends_active_call() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.HOOK_OFF)
    audio(eng, 0, 2)
    eng.shutdown("shutdown")
    (call,) = lis.ended()
    assert call.end_reason == "shutdown"
    eng.shutdown()  # idle: nothing more
    assert len(lis.ended()) == 1


def test_stray_signals_in_idle_start_nothing() -> None:
    eng, lis = make()
    sig(eng, 0, Signal.HOOK_ON)
    sig(eng, 1, Signal.RING_OFF)
    eng.feed_detector_event(Answer(s(2)))
    eng.feed_detector_event(DtmfDigit(s(3), "1"))
    audio(eng, 0, 5)
    assert lis.transitions == [] and eng.state is State.IDLE


def test_every_transition_targets_a_state_and_handler_exists() -> None:
    eng, _ = make()
    for (state, ev), (nxt, action, _reason) in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(ev, Ev) and isinstance(nxt, State)
        assert hasattr(eng, f"_do_{action.value}"), action
    # every active state can end
    for state in (State.RINGING, State.OFF_HOOK, State.DIALING, State.CONNECTED):
        assert any(k[0] is state and v[0] is State.ENDED for k, v in TRANSITIONS.items())


class HookRecorder:
    """A detector that only records what the engine tells it."""

    def __init__(self) -> None:
        self.hooks: list[bool] = []
        self.resets = 0

    def feed(self, sample: int, pcm: np.ndarray) -> list:
        return []

    def reset(self) -> None:
        self.resets += 1

    def hook(self, off_hook: bool) -> None:
        self.hooks.append(off_hook)


def test_detectors_learn_the_hook_state_and_reset_per_call() -> None:
    listener = Listener()
    detector = HookRecorder()
    eng = CallEngine("l1", listener, clock=ManualClock(), new_id=lambda: "c",
                     detectors=[detector])
    sig(eng, 0, Signal.RING_ON)
    sig(eng, 1, Signal.HOOK_OFF)
    sig(eng, 5, Signal.HOOK_ON)
    sig(eng, 6, Signal.HOOK_OFF)
    sig(eng, 9, Signal.HOOK_ON)
    assert detector.hooks == [True, False, True, False]
    assert detector.resets >= 2  # at least once per call start
