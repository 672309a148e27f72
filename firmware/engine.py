"""The per-line call engine: an explicit state machine (states enum + transition table).

Pure: it consumes :data:`drivers.line.LineItem` (signals and audio frames) and detector
events, keeps time on the line's sample timeline, and reports every transition and every
audio frame of an active call to a :class:`CallListener`. Persistence, encryption and the
audit trail live in the listener (firmware.recorder).

Inbound:  IDLE -ring-> RINGING -hook off-> CONNECTED -hook on-> ENDED
Outbound: IDLE -hook off-> OFF_HOOK -digit-> DIALING -answer-> CONNECTED -hook on-> ENDED
ENDED is reported, then the line is IDLE again in the same step.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivers.clock import Clock
from drivers.dsp.events import Answer, CallerId, Detector, DetectorEvent, DtmfDigit, HookAware
from drivers.line import SAMPLE_RATE, AudioFrame, LineItem, Signal, SignalEvent

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    IDLE = "idle"
    RINGING = "ringing"
    OFF_HOOK = "off_hook"
    DIALING = "dialing"
    CONNECTED = "connected"
    ENDED = "ended"


class Ev(enum.StrEnum):
    RING_ON = "ring_on"
    RING_OFF = "ring_off"
    RING_TIMEOUT = "ring_timeout"
    GLARE_RING = "glare_ring"  # ring within the glare window after going off-hook
    HOOK_OFF = "hook_off"
    HOOK_ON = "hook_on"
    POLARITY = "polarity_reversal"
    DIGIT = "digit"
    CALLER_ID = "caller_id"
    ANSWER = "answer"
    SEGMENT_CAP = "segment_cap"
    SETUP_IN = "call_setup_in"  # digital line: incoming SETUP
    SETUP_OUT = "call_setup_out"  # digital line: outgoing SETUP
    CONNECT = "call_connect"
    RELEASE = "call_release"


class Action(enum.StrEnum):
    IGNORE = "ignore"
    NOTE = "note"
    START_INBOUND = "start_inbound"
    START_OUTBOUND = "start_outbound"
    RING = "ring"
    SET_CALLER = "set_caller"
    KEEP_CALLER = "keep_caller"  # caller ID heard before the first ring
    ANSWER_INBOUND = "answer_inbound"
    GLARE = "glare"
    ADD_DIGIT = "add_digit"
    IN_CALL_DIGIT = "in_call_digit"
    ANSWER_OUTBOUND = "answer_outbound"
    NEW_SEGMENT = "new_segment"
    END = "end"


S, E, A = State, Ev, Action
_ACTIVE = (S.RINGING, S.OFF_HOOK, S.DIALING, S.CONNECTED)

# (state, event) -> (next state, action, end reason). Anything absent is ignored.
TRANSITIONS: dict[tuple[State, Ev], tuple[State, Action, str | None]] = {
    (S.IDLE, E.RING_ON): (S.RINGING, A.START_INBOUND, None),
    (S.IDLE, E.SETUP_IN): (S.RINGING, A.START_INBOUND, None),
    (S.IDLE, E.HOOK_OFF): (S.OFF_HOOK, A.START_OUTBOUND, None),
    (S.IDLE, E.SETUP_OUT): (S.DIALING, A.START_OUTBOUND, None),
    (S.IDLE, E.CALLER_ID): (S.IDLE, A.KEEP_CALLER, None),
    (S.IDLE, E.POLARITY): (S.IDLE, A.NOTE, None),
    (S.RINGING, E.RING_ON): (S.RINGING, A.RING, None),
    (S.RINGING, E.RING_OFF): (S.RINGING, A.RING, None),
    (S.RINGING, E.CALLER_ID): (S.RINGING, A.SET_CALLER, None),
    (S.RINGING, E.POLARITY): (S.RINGING, A.NOTE, None),
    (S.RINGING, E.HOOK_OFF): (S.CONNECTED, A.ANSWER_INBOUND, None),
    (S.RINGING, E.CONNECT): (S.CONNECTED, A.ANSWER_INBOUND, None),
    (S.RINGING, E.RING_TIMEOUT): (S.ENDED, A.END, "no_answer"),
    (S.RINGING, E.RELEASE): (S.ENDED, A.END, "no_answer"),
    (S.OFF_HOOK, E.DIGIT): (S.DIALING, A.ADD_DIGIT, None),
    (S.OFF_HOOK, E.GLARE_RING): (S.CONNECTED, A.GLARE, None),
    (S.OFF_HOOK, E.ANSWER): (S.CONNECTED, A.ANSWER_OUTBOUND, None),
    (S.OFF_HOOK, E.HOOK_ON): (S.ENDED, A.END, "hangup_before_dialing"),
    (S.OFF_HOOK, E.RELEASE): (S.ENDED, A.END, "hangup_before_dialing"),
    (S.DIALING, E.DIGIT): (S.DIALING, A.ADD_DIGIT, None),
    (S.DIALING, E.ANSWER): (S.CONNECTED, A.ANSWER_OUTBOUND, None),
    (S.DIALING, E.POLARITY): (S.CONNECTED, A.ANSWER_OUTBOUND, None),
    (S.DIALING, E.CONNECT): (S.CONNECTED, A.ANSWER_OUTBOUND, None),
    (S.DIALING, E.HOOK_ON): (S.ENDED, A.END, "hangup_while_dialing"),
    (S.DIALING, E.RELEASE): (S.ENDED, A.END, "hangup_while_dialing"),
    (S.CONNECTED, E.DIGIT): (S.CONNECTED, A.IN_CALL_DIGIT, None),
    (S.CONNECTED, E.POLARITY): (S.CONNECTED, A.NOTE, None),
    (S.CONNECTED, E.HOOK_ON): (S.ENDED, A.END, "hangup"),
    (S.CONNECTED, E.RELEASE): (S.ENDED, A.END, "hangup"),
    **{(st, E.SEGMENT_CAP): (st, A.NEW_SEGMENT, None) for st in _ACTIVE},
}

_SIGNAL_EVENTS = {
    Signal.RING_ON: Ev.RING_ON, Signal.RING_OFF: Ev.RING_OFF, Signal.HOOK_OFF: Ev.HOOK_OFF,
    Signal.HOOK_ON: Ev.HOOK_ON, Signal.POLARITY_REVERSAL: Ev.POLARITY,
    Signal.CALL_CONNECT: Ev.CONNECT, Signal.CALL_RELEASE: Ev.RELEASE,
}


@dataclass
class Call:
    """One call on one line; times are samples on the line timeline."""

    id: str
    line_id: str
    direction: str
    start_sample: int
    started_wall: float
    wall_synced: bool
    caller_number: str | None = None
    caller_name: str | None = None
    caller_id_standard: str | None = None
    caller_absence: str | None = None
    dialed: str = ""
    answer_sample: int | None = None
    end_sample: int | None = None
    end_reason: str | None = None
    rings: int = 0
    segment: int = 0
    segment_start_sample: int = 0
    state: State = State.IDLE
    notes: list[str] = field(default_factory=list)

    def offset_s(self, sample: int) -> float:
        return (sample - self.start_sample) / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Transition:
    sample: int
    prev: State
    event: Ev
    next: State
    action: Action
    detail: dict[str, Any]


class CallListener(Protocol):
    def on_transition(self, call: Call, tr: Transition) -> None:
        """A call changed state or facts (every one is audited)."""
        ...

    def on_audio(self, call: Call, frame: AudioFrame) -> None:
        """A frame of an active call's audio."""
        ...

    def on_digit(self, call: Call, digit: DtmfDigit) -> None:
        """A DTMF digit during a connected call (never audited in clear)."""
        ...


@dataclass(frozen=True, slots=True)
class EngineLimits:
    ring_timeout_s: float = 8.0
    glare_window_s: float = 1.0
    max_segment_s: float = 3600.0
    # Caller ID heard this long before the first ring still belongs to the call.
    early_cid_s: float = 10.0


class CallEngine:
    """State machine of one line."""

    def __init__(self, line_id: str, listener: CallListener, *, clock: Clock,
                 new_id: Callable[[], str], limits: EngineLimits = EngineLimits(),
                 detectors: Sequence[Detector] = ()) -> None:
        self.line_id = line_id
        self.listener = listener
        self.clock = clock
        self.new_id = new_id
        self.limits = limits
        self.detectors = list(detectors)
        self.state = State.IDLE
        self.call: Call | None = None
        self.now = 0  # newest sample seen
        self._last_ring = 0
        self._hook_off_sample = 0
        self._early_cid: CallerId | None = None

    # --- input -----------------------------------------------------------------------
    def feed(self, item: LineItem) -> None:
        if isinstance(item, AudioFrame):
            self._frame(item)
        else:
            self._signal(item)

    def feed_detector_event(self, event: DetectorEvent) -> None:
        if isinstance(event, DtmfDigit):
            self._fire(Ev.DIGIT, event.sample, {"digit": event.digit}, payload=event)
        elif isinstance(event, CallerId):
            self._fire(Ev.CALLER_ID, event.sample, {"standard": event.standard}, payload=event)
        elif isinstance(event, Answer):
            self._fire(Ev.ANSWER, event.sample, {"by": "audio"})

    def shutdown(self, reason: str = "shutdown") -> None:
        """End an active call (the daemon stops or the line closed)."""
        if self.call is not None:
            self._transition(Ev.HOOK_ON, self.now, State.ENDED, Action.END, reason,
                             {"forced": True})

    # --- internals -------------------------------------------------------------------
    def _signal(self, sig: SignalEvent) -> None:
        self.now = max(self.now, sig.sample)
        if sig.signal is Signal.CALL_SETUP:
            ev = Ev.SETUP_OUT if sig.outgoing else Ev.SETUP_IN
            self._fire(ev, sig.sample, {"calling": sig.calling, "called": sig.called}, sig)
            return
        ev = _SIGNAL_EVENTS[sig.signal]
        if ev in (Ev.RING_ON, Ev.RING_OFF):
            if (self.state is State.OFF_HOOK and ev is Ev.RING_ON
                    and sig.sample - self._hook_off_sample
                    <= self.limits.glare_window_s * SAMPLE_RATE):
                ev = Ev.GLARE_RING
            self._last_ring = sig.sample
        if ev is Ev.HOOK_OFF:
            self._hook_off_sample = sig.sample
        if ev in (Ev.HOOK_OFF, Ev.HOOK_ON):
            self._tell_detectors_hook(ev is Ev.HOOK_OFF)
        self._fire(ev, sig.sample, {}, sig)

    def _frame(self, frame: AudioFrame) -> None:
        self.now = max(self.now, frame.sample)
        self._check_timers(frame.sample)
        for detector in self.detectors:
            for event in detector.feed(frame.sample, frame.pcm):
                self.feed_detector_event(event)
        if self.call is not None:
            self.listener.on_audio(self.call, frame)

    def _check_timers(self, sample: int) -> None:
        if (self.state is State.RINGING
                and sample - self._last_ring > self.limits.ring_timeout_s * SAMPLE_RATE):
            self._fire(Ev.RING_TIMEOUT, sample, {})
        call = self.call
        if (call is not None
                and sample - call.segment_start_sample >= self.limits.max_segment_s * SAMPLE_RATE):
            self._fire(Ev.SEGMENT_CAP, sample, {"segment": call.segment + 1})

    def _fire(self, ev: Ev, sample: int, detail: dict[str, Any],
              payload: object = None) -> None:
        rule = TRANSITIONS.get((self.state, ev))
        if rule is None:
            log.debug("line %s: %s ignored in %s", self.line_id, ev, self.state)
            return
        nxt, action, reason = rule
        if action is Action.IGNORE:
            return
        self._transition(ev, sample, nxt, action, reason, detail, payload)

    def _transition(self, ev: Ev, sample: int, nxt: State, action: Action,
                    reason: str | None, detail: dict[str, Any], payload: object = None) -> None:
        prev = self.state
        handler = getattr(self, f"_do_{action.value}")
        detail = dict(detail)
        handler(sample, detail, payload)
        if reason is not None:
            detail["reason"] = reason
        self.state = nxt
        call = self.call
        if call is None:
            return
        call.state = nxt
        if nxt is State.ENDED:
            call.end_sample = sample
            call.end_reason = reason
        self.listener.on_transition(call, Transition(sample, prev, ev, nxt, action, detail))
        if nxt is State.ENDED:
            self.call = None
            self.state = State.IDLE
            self._reset_detectors()

    def _new_call(self, sample: int, direction: str) -> Call:
        self._reset_detectors()
        call = Call(id=self.new_id(), line_id=self.line_id, direction=direction,
                    start_sample=sample, started_wall=self.clock.wall(),
                    wall_synced=self.clock.wall_synced(), segment_start_sample=sample)
        self.call = call
        return call

    def _tell_detectors_hook(self, off_hook: bool) -> None:
        for detector in self.detectors:
            if isinstance(detector, HookAware):
                detector.hook(off_hook)

    def _reset_detectors(self) -> None:
        for detector in self.detectors:
            detector.reset()

    # --- actions (one per Action; detail gets what the audit should say) -------------
    def _do_note(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        detail["note"] = "signal observed"

    def _do_start_inbound(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        call = self._new_call(sample, "inbound")
        rang = isinstance(payload, SignalEvent) and payload.signal is Signal.RING_ON
        call.rings = int(rang)
        self._last_ring = sample
        if isinstance(payload, SignalEvent) and payload.calling:
            call.caller_number = payload.calling
            call.caller_id_standard = "isdn"
        early = self._early_cid
        if early is not None and sample - early.sample <= self.limits.early_cid_s * SAMPLE_RATE:
            self._apply_caller(call, early)
        self._early_cid = None

    def _do_start_outbound(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        call = self._new_call(sample, "outbound")
        if isinstance(payload, SignalEvent) and payload.called:
            call.dialed = payload.called
            call.caller_id_standard = "isdn"

    def _do_ring(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        if isinstance(payload, SignalEvent) and payload.signal is Signal.RING_ON:
            self.call.rings += 1
        detail["rings"] = self.call.rings

    def _do_keep_caller(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        if isinstance(payload, CallerId):
            self._early_cid = payload

    def _do_set_caller(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        if isinstance(payload, CallerId):
            self._apply_caller(self.call, payload)

    @staticmethod
    def _apply_caller(call: Call, cid: CallerId) -> None:
        call.caller_number = cid.number
        call.caller_name = cid.name
        call.caller_id_standard = cid.standard
        call.caller_absence = cid.absence

    def _do_answer_inbound(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        self.call.answer_sample = sample

    def _do_glare(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        self.call.direction = "inbound"
        self.call.answer_sample = self._hook_off_sample
        self.call.notes.append("glare")
        detail["note"] = "ring within the glare window after off-hook: inbound call answered"

    def _do_add_digit(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        if isinstance(payload, DtmfDigit):
            self.call.dialed += payload.digit
        detail.pop("digit", None)  # numbers reach the audit only as commitments
        detail["digits"] = len(self.call.dialed)

    def _do_in_call_digit(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        detail.pop("digit", None)
        if isinstance(payload, DtmfDigit):
            self.listener.on_digit(self.call, payload)

    def _do_answer_outbound(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        self.call.answer_sample = sample

    def _do_new_segment(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        assert self.call is not None
        self.call.segment += 1
        self.call.segment_start_sample = sample

    def _do_end(self, sample: int, detail: dict[str, Any], payload: object) -> None:
        pass
