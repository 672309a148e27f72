"""The ``sim`` line backend: a phone line simulated from a scenario file.

A scenario (docs/SIMULATOR.md) is turned into a light plan per call: signalling events
plus a sequence of audio parts (silence, cadenced tones, DTMF, caller-ID bursts,
speech). Audio is synthesized only when a frame needs it, so an hour-long call costs a
few hundred kilobytes. :class:`LineStream` yields the items in timeline order;
:class:`SimLine` paces them against the injected clock and mixes in what is played;
:func:`render` runs the same stream into one array for short scenarios.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np

from drivers.clock import Clock
from drivers.line import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioFrame,
    LineBackend,
    LineClosed,
    LineConfigError,
    LineItem,
    Signal,
    SignalEvent,
)
from drivers.sim import callerid, synth
from drivers.sim.scenario import Call, Scenario, load_scenario, with_country
from drivers.toneplan import TonePlan, ToneSpec, tone_plan

log = logging.getLogger(__name__)

# Levels on the tap (dBFS, full-scale sine reference).
NEAR_SPEECH_DBFS = -14.0  # the dealer's handset, near the tap
FAR_SPEECH_DBFS = -22.0  # the customer, through the network
TONE_DBFS = synth.dbm0(-13.0)  # per frequency; NANP precise dial tone is -13 dBm0 each
BLOCK_SAMPLES = SAMPLE_RATE // 10  # lazy synthesis chunk (100 ms); a tone block needs ~56 B/sample
NOISE_STREAM = 0x4E4F  # seed-sequence word of the noise-floor generator

# Caller-ID timing.
CID_AFTER_RING_S = 0.5  # GR-30-CORE: data starts >= 500 ms after the first ring ends
CID_BEFORE_RING_S = 0.2  # GR-30-CORE: data ends >= 200 ms before the second ring
DTAS_AFTER_REVERSAL_S = 0.25  # BT SIN227: DT-AS >= 100 ms after the line reversal
DATA_AFTER_DTAS_S = 0.06  # BT SIN227: data >= 45 ms after the end of DT-AS
RING_AFTER_DATA_S = 0.4  # BT SIN227: ringing >= 200 ms after the end of the data
DTMF_CID_ON_S = 0.07  # DTMF caller ID: 70 ms tones, 70 ms pauses (Q.24 needs >= 40 ms)
RING_AFTER_DTMF_CID_S = 0.6  # DTMF caller ID ends before the first ring
POLARITY_RESTORE_S = 0.1  # normal polarity returns this long after the dealer hangs up

# Human behaviour (ranges drawn per call; choices, not standards).
PICKUP_S = (0.3, 1.5)  # ring end -> dealer lifts the handset
DIAL_TONE_S = (0.8, 2.0)  # dial tone heard before the first key
KEY_ON_S = (0.07, 0.10)  # key press: 60-100 ms tone from a phone
KEY_GAP_S = (0.12, 0.40)  # between keys (>= 60 ms)
POST_DIAL_S = (1.5, 3.0)  # last digit -> ringback or busy
FIRST_WORD_S = (0.3, 0.7)  # answer -> first word
TURN_S = (2.0, 9.0)  # one turn of the generated conversation
TURN_GAP_S = (0.2, 0.8)
HANGUP_AFTER_S = (0.3, 1.0)  # last word -> dealer puts the phone down
FAR_CLEAR_S = (0.1, 0.3)  # last word -> customer puts the phone down
BUSY_AFTER_CLEAR_S = (0.4, 1.0)  # far clear -> busy tone
ABANDON_S = (1.0, 3.0)  # dealer stops dialing -> hangs up


# --- audio parts -------------------------------------------------------------------
class Part(Protocol):
    """A stretch of foreground audio, synthesized block by block when needed."""

    @property
    def n_samples(self) -> int: ...

    def blocks(self) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class Silence:
    n_samples: int

    def blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n_samples, BLOCK_SAMPLES):
            yield np.zeros(min(BLOCK_SAMPLES, self.n_samples - start))


@dataclass(frozen=True, slots=True)
class Samples:
    pcm: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.pcm.size)

    def blocks(self) -> Iterator[np.ndarray]:
        yield self.pcm


@dataclass(frozen=True, slots=True)
class KeyPress:
    """One DTMF key pressed on the dealer's phone, synthesized when it is heard."""

    digit: str
    on_s: float

    def __post_init__(self) -> None:
        synth.dtmf_freqs(self.digit)  # a bad key fails while the call is planned

    @property
    def n_samples(self) -> int:
        return synth.n_samples(self.on_s)

    def blocks(self) -> Iterator[np.ndarray]:
        yield synth.dtmf(self.digit, self.on_s, twist_db=synth.DTMF_TWIST_DB)


@dataclass(frozen=True, slots=True)
class CadencedTone:
    spec: ToneSpec
    n_samples: int
    level_dbfs: float = TONE_DBFS

    def blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n_samples, BLOCK_SAMPLES):
            length = min(BLOCK_SAMPLES, self.n_samples - start)
            yield synth.cadenced(self.spec, None, length / SAMPLE_RATE, self.level_dbfs,
                                 start_sample=start)[:length]


@dataclass(frozen=True, slots=True)
class Speech:
    n_samples: int
    voice: str
    level_dbfs: float
    seed: int

    def blocks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        yield from synth.speech_blocks(self.n_samples, self.voice, rng, self.level_dbfs)


# --- ground truth ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CallTruth:
    """What happened in one call, in absolute line samples (for tests and demos).

    ``caller``/``caller_name`` are what the caller-ID signal presents (None when
    withheld, not sent, or the standard carries no name). ``answer_sample`` is the
    dealer's HOOK_OFF for inbound calls and the far end's pick-up (ringback stops) for
    outbound calls; ``far_speech_sample`` is the customer's first word.
    """

    index: int
    direction: str
    caller: str | None
    caller_name: str | None
    withheld: str | None
    dialed: str | None
    cid: str
    answered: bool
    hangup: str
    start_sample: int
    answer_sample: int | None
    end_sample: int
    rings: int = 0
    cid_sample: int | None = None
    cid_data: bytes | str | None = None
    digit_samples: tuple[int, ...] = ()
    far_speech_sample: int | None = None
    # keys pressed during the call: (first sample, digits)
    key_presses: tuple[tuple[int, str], ...] = ()

    @property
    def start_s(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def answer_s(self) -> float | None:
        return None if self.answer_sample is None else self.answer_sample / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end_sample / SAMPLE_RATE


# --- building one pass of the scenario ---------------------------------------------
@dataclass
class _Builder:
    """Appends parts and events at a moving cursor (absolute samples)."""

    cursor: int
    start_time: datetime
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    parts: list[Part] = field(default_factory=list)
    events: list[SignalEvent] = field(default_factory=list)
    reversed_polarity: bool = False

    def add(self, part: Part) -> int:
        at = self.cursor
        if part.n_samples > 0:
            self.parts.append(part)
            self.cursor += part.n_samples
        return at

    def pause(self, seconds: float) -> int:
        return self.add(Silence(synth.n_samples(seconds)))

    def pause_between(self, bounds: tuple[float, float]) -> int:
        return self.pause(self.uniform(bounds))

    def uniform(self, bounds: tuple[float, float]) -> float:
        return float(self.rng.uniform(*bounds))

    def signal(self, signal: Signal) -> int:
        self.events.append(SignalEvent(self.cursor, signal))
        return self.cursor

    def reverse(self) -> None:
        self.signal(Signal.POLARITY_REVERSAL)
        self.reversed_polarity = not self.reversed_polarity

    def tone(self, spec: ToneSpec, seconds: float) -> int:
        return self.add(CadencedTone(spec, synth.n_samples(seconds)))

    def now(self) -> datetime:
        return self.start_time + timedelta(seconds=self.cursor / SAMPLE_RATE)


@dataclass
class _Outcome:
    """Facts collected while a call is built."""

    answer: int | None = None
    cid_sample: int | None = None
    cid_data: bytes | str | None = None
    digits: list[int] = field(default_factory=list)
    far_speech: int | None = None
    hangup: str = "near"
    keys: list[tuple[int, str]] = field(default_factory=list)


def _cid_burst(call: Call, cid: str, when: datetime) -> tuple[np.ndarray, bytes | str]:
    """The caller-ID signal of an inbound call and the data it carries."""
    number, absence = call.caller, call.withheld
    if cid == "dtmf":
        digits = callerid.dtmf_cid(number, call.dtmf_cid_format, absence)
        return synth.dtmf_string(digits, DTMF_CID_ON_S, DTMF_CID_ON_S), digits
    if cid == "bell202_sdmf":
        message = callerid.sdmf(number, when, absence)
        return synth.bell202(message), message
    name = call.caller_name if number is not None else None
    encode = callerid.mdmf if cid == "bell202" else callerid.etsi_call_setup
    message = encode(number=number, name=name, when=when, number_absence=absence,
                     name_absence=absence if name is None and absence else None)
    burst = synth.bell202(message) if cid == "bell202" else synth.v23(message)
    return burst, message


def _presented_name(call: Call, cid: str) -> str | None:
    if call.caller is None or cid not in ("bell202", "v23", "v23_dtas"):
        return None
    return call.caller_name


def _ring_and_cid(b: _Builder, call: Call, plan: TonePlan, cid: str, out: _Outcome) -> None:
    """Ringing bursts with the caller ID where the standard puts it."""
    burst: np.ndarray | None = None
    if cid != "none":
        burst, out.cid_data = _cid_burst(call, cid, b.now())
    if cid == "v23_dtas" and burst is not None:
        b.reverse()
        b.pause(DTAS_AFTER_REVERSAL_S)
        b.add(Samples(synth.dt_as()))
        b.pause(DATA_AFTER_DTAS_S)
        out.cid_sample = b.add(Samples(burst))
        b.pause(RING_AFTER_DATA_S)
    elif cid == "dtmf" and burst is not None:
        out.cid_sample = b.add(Samples(burst))
        b.pause(RING_AFTER_DTMF_CID_S - DTMF_CID_ON_S)
    after_ring = burst if cid in ("bell202", "bell202_sdmf", "v23") else None
    for ring in range(call.rings):
        last = ring == call.rings - 1
        for j, (on_s, off_s) in enumerate(plan.ring_cadence):
            b.signal(Signal.RING_ON)
            b.pause(on_s)
            b.signal(Signal.RING_OFF)
            if j < len(plan.ring_cadence) - 1:
                b.pause(off_s)
            elif ring == 0 and after_ring is not None:
                _cid_after_ring(b, after_ring, off_s, last and call.answered, out)
            elif last and call.answered:
                b.pause(b.uniform((PICKUP_S[0], max(PICKUP_S[0], min(PICKUP_S[1], off_s - 0.1)))))
            elif not last:
                b.pause(off_s)


def _cid_after_ring(b: _Builder, burst: np.ndarray, off_s: float, pickup: bool,
                    out: _Outcome) -> None:
    b.pause(CID_AFTER_RING_S)
    out.cid_sample = b.add(Samples(burst))
    if pickup:
        b.pause_between(PICKUP_S)
        return
    used_s = CID_AFTER_RING_S + burst.size / SAMPLE_RATE
    b.pause(max(off_s - used_s, CID_BEFORE_RING_S))  # stretch the pause if the data is long


def _build_inbound(b: _Builder, call: Call, plan: TonePlan, out: _Outcome) -> str:
    cid = call.cid or plan.cid
    _ring_and_cid(b, call, plan, cid, out)
    if not call.answered:
        out.hangup = "far"  # the caller gives up
        _restore_polarity(b)
        return cid
    out.answer = b.signal(Signal.HOOK_OFF)
    b.pause_between(FIRST_WORD_S)
    _talk(b, call, "dealer", out)
    _hang_up(b, call, plan, out)
    return cid


def _build_outbound(b: _Builder, call: Call, plan: TonePlan, out: _Outcome) -> str:
    dialed = call.dialed or ""
    keyed = dialed if call.digits_keyed is None else dialed[:call.digits_keyed]
    b.signal(Signal.HOOK_OFF)
    b.tone(plan.dial, b.uniform(DIAL_TONE_S))
    for i, digit in enumerate(keyed):
        if i:
            b.pause_between(KEY_GAP_S)
        out.digits.append(b.add(KeyPress(digit, b.uniform(KEY_ON_S))))
    if len(keyed) < len(dialed) or call.far_busy or not call.answered:
        _unanswered_outbound(b, call, plan, keyed != dialed)
        return "none"
    b.pause_between(POST_DIAL_S)
    b.tone(plan.ringback, call.ringback_s)
    out.answer = b.cursor
    if call.answer_signal == "polarity":
        b.reverse()
    b.pause_between(FIRST_WORD_S)
    _talk(b, call, "customer", out)
    _hang_up(b, call, plan, out)
    return "none"


def _unanswered_outbound(b: _Builder, call: Call, plan: TonePlan, abandoned: bool) -> None:
    if abandoned:
        b.pause_between(ABANDON_S)
    else:
        b.pause_between(POST_DIAL_S)
        if call.far_busy:
            b.tone(plan.busy, call.busy_s)
        else:
            b.tone(plan.ringback, call.ringback_s)
    b.signal(Signal.HOOK_ON)


# In-call keys (a consent key, a dealer's code): tone and pause per key.
IN_CALL_KEY_ON_S = 0.10
IN_CALL_KEY_OFF_S = 0.15


def _turns(call: Call, first: str, rng: np.random.Generator
           ) -> list[tuple[str | None, float, str | None]]:
    """Turns as (who, seconds, keys); who None = a pause between turns; keys = DTMF
    digits pressed instead of speaking."""
    if call.talk:
        turns: list[tuple[str | None, float, str | None]] = []
        for i, turn in enumerate(call.talk):
            if i:
                turns.append((None, float(rng.uniform(*TURN_GAP_S)), None))
            turns.append((None if turn.silent else turn.who, turn.s, turn.keys))
        return turns
    turns, remaining, who = [], call.talk_s, first
    while remaining > 0:
        speak_s = min(float(rng.uniform(*TURN_S)), remaining)
        turns.append((who, speak_s, None))
        remaining -= speak_s
        if remaining > 0:
            gap_s = min(float(rng.uniform(*TURN_GAP_S)), remaining)
            turns.append((None, gap_s, None))
            remaining -= gap_s
        who = "customer" if who == "dealer" else "dealer"
    return turns


def _talk(b: _Builder, call: Call, first: str, out: _Outcome) -> None:
    for who, seconds, keys in _turns(call, first, b.rng):
        if who is None:
            b.pause(seconds)
            continue
        if keys:
            keyed = synth.dtmf_string(keys, IN_CALL_KEY_ON_S, IN_CALL_KEY_OFF_S)
            at = b.add(Samples(keyed[: synth.n_samples(seconds)]))
            out.keys.append((at, keys))
            if len(keyed) < synth.n_samples(seconds):
                b.pause(seconds - len(keyed) / SAMPLE_RATE)
            continue
        level = NEAR_SPEECH_DBFS if who == "dealer" else FAR_SPEECH_DBFS
        seed = int(b.rng.integers(0, 2**63 - 1))
        at = b.add(Speech(synth.n_samples(seconds), who, level, seed))
        if who == "customer" and out.far_speech is None:
            out.far_speech = at


def _hang_up(b: _Builder, call: Call, plan: TonePlan, out: _Outcome) -> None:
    out.hangup = call.hangup
    if call.hangup == "near":
        b.pause_between(HANGUP_AFTER_S)
        b.signal(Signal.HOOK_ON)
        _restore_polarity(b)
        return
    b.pause_between(FAR_CLEAR_S)
    if b.reversed_polarity:
        b.reverse()  # the exchange signals the far-end clear by restoring polarity
    b.pause_between(BUSY_AFTER_CLEAR_S)
    b.tone(plan.busy, call.busy_s)
    b.signal(Signal.HOOK_ON)


def _restore_polarity(b: _Builder) -> None:
    if b.reversed_polarity:
        b.pause(POLARITY_RESTORE_S)
        b.reverse()


def _call_end(events: list[SignalEvent], start: int) -> int:
    """The dealer's HOOK_ON, or the last ring of an unanswered call."""
    for signal in (Signal.HOOK_ON, Signal.RING_OFF):
        samples = [e.sample for e in events if e.signal == signal]
        if samples:
            return samples[-1]
    return start


def _build_call(b: _Builder, index: int, call: Call, plan: TonePlan) -> CallTruth:
    b.pause(call.gap_s)
    start, first_event = b.cursor, len(b.events)
    out = _Outcome()
    if call.direction == "inbound":
        cid = _build_inbound(b, call, plan, out)
    else:
        cid = _build_outbound(b, call, plan, out)
    end = _call_end(b.events[first_event:], start)
    inbound = call.direction == "inbound"
    return CallTruth(
        index=index, direction=call.direction,
        caller=call.caller if inbound and cid != "none" else None,
        caller_name=_presented_name(call, cid) if inbound else None,
        withheld=call.withheld if inbound else None,
        dialed="".join((call.dialed or "")[:len(out.digits)]) if not inbound else None,
        cid=cid, answered=out.answer is not None, hangup=out.hangup,
        start_sample=start, answer_sample=out.answer, end_sample=end,
        rings=call.rings if inbound else 0, cid_sample=out.cid_sample,
        cid_data=out.cid_data, digit_samples=tuple(out.digits),
        far_speech_sample=out.far_speech, key_presses=tuple(out.keys))


@dataclass(frozen=True, slots=True)
class _Pass:
    parts: list[Part]
    events: list[SignalEvent]
    truth: list[CallTruth]
    end_sample: int


def _build_pass(scenario: Scenario, plan: TonePlan, seed: int, pass_index: int,
                start_sample: int) -> _Pass:
    """Plan every call of one run through the scenario (no audio synthesized yet)."""
    b = _Builder(cursor=start_sample, start_time=scenario.start)
    truth = []
    for index, call in enumerate(scenario.calls):
        b.rng = np.random.default_rng([seed, pass_index, index])
        truth.append(_build_call(b, index, call, plan))
    b.pause(scenario.tail_s)
    b.add(Silence(-b.cursor % FRAME_SAMPLES))  # end on a frame boundary
    return _Pass(b.parts, b.events, truth, b.cursor)


# --- the stream ----------------------------------------------------------------------
class LineStream:
    """Signal events and 20 ms frames of a scenario, in timeline order, made lazily.

    A signal comes before the frame that starts at the same sample. ``next_item``
    returns None after the last call plus the tail (unless ``repeat``).
    """

    # Streams synthesize one block at a time per process: a speech phrase needs up to
    # 0.9 MB of arrays while it is made, and the line threads of a daemon would otherwise
    # make theirs at the same moment (bench/run.py, 4 lines: 0.8 MB lower peak RSS).
    # The audio and its order within each stream do not change.
    _synthesis = threading.Lock()

    def __init__(self, scenario: Scenario, *, country: str = "US", seed: int | None = None,
                 repeat: bool = False) -> None:
        self.scenario = with_country(scenario, country)
        self.plan = tone_plan(self.scenario.country or country)
        self.seed = scenario.seed if seed is None else seed
        self.repeat = repeat
        self.truth: list[CallTruth] = []
        self.sample = 0  # first sample of the next frame
        self.end_sample = 0  # end of the planned timeline
        self._noise_rng = np.random.default_rng([self.seed, NOISE_STREAM])
        self._noise_rms = synth.rms_amplitude(scenario.noise_dbfs)
        self._events: deque[SignalEvent] = deque()
        self._parts: deque[Part] = deque()
        self._blocks: Iterator[np.ndarray] = iter(())
        self._block = np.zeros(0)
        self._pos = 0
        self._passes = 0
        self._plan_pass()

    def _plan_pass(self) -> bool:
        planned = _build_pass(self.scenario, self.plan, self.seed, self._passes,
                              self.end_sample)
        if planned.end_sample == self.end_sample:
            return False  # an empty scenario: nothing to repeat
        self._passes += 1
        self._parts.extend(planned.parts)
        self._events.extend(planned.events)
        self.truth.extend(planned.truth)
        self.end_sample = planned.end_sample
        log.debug("sim: planned pass %d, %d calls, ends at %.1f s", self._passes,
                  len(planned.truth), self.end_sample / SAMPLE_RATE)
        return True

    def next_item(self) -> LineItem | None:
        if self._events and self._events[0].sample <= self.sample:
            return self._events.popleft()
        if self.sample >= self.end_sample and not (self.repeat and self._plan_pass()):
            return None
        return self._frame()

    def _frame(self) -> AudioFrame:
        audio = self._take(FRAME_SAMPLES)
        audio += self._noise_rng.standard_normal(FRAME_SAMPLES) * self._noise_rms
        frame = AudioFrame(self.sample, synth.to_pcm16(audio))
        self.sample += FRAME_SAMPLES
        return frame

    def _take(self, n: int) -> np.ndarray:
        out = np.zeros(n)
        filled = 0
        while filled < n:
            if self._pos >= self._block.size:
                if not self._next_block():
                    break
                continue
            k = min(n - filled, self._block.size - self._pos)
            out[filled:filled + k] = self._block[self._pos:self._pos + k]
            filled += k
            self._pos += k
        return out

    def _next_block(self) -> bool:
        self._block, self._pos = np.zeros(0), 0  # let the used block go before the next is made
        while True:
            with LineStream._synthesis:
                block = next(self._blocks, None)
            if block is not None:
                self._block, self._pos = block, 0
                return True
            if not self._parts:
                return False
            self._blocks = iter(self._parts.popleft().blocks())


def render(scenario: Scenario, seed: int | None = None, *,
           country: str = "US") -> tuple[np.ndarray, list[SignalEvent], list[CallTruth]]:
    """The whole line of a (short) scenario: int16 PCM, signal events, ground truth.

    Uses the same stream as :class:`SimLine`; ``country`` applies when the scenario
    names none.
    """
    stream = LineStream(scenario, country=country, seed=seed)
    pcm = np.zeros(stream.end_sample, dtype=np.int16)
    events: list[SignalEvent] = []
    while (item := stream.next_item()) is not None:
        if isinstance(item, AudioFrame):
            pcm[item.sample:item.sample + FRAME_SAMPLES] = item.pcm
        else:
            events.append(item)
    return pcm, events, list(stream.truth)


# --- the backend ---------------------------------------------------------------------
class SimOptions(msgspec.Struct, forbid_unknown_fields=True):
    """``[lines.options]`` of a sim line."""

    scenario: str
    speed: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0  # 0 = unpaced; 60 = 60x real time
    repeat: bool = False
    start_offset_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0


class SimLine(LineBackend):
    """A simulated analog line driven by a scenario file (a production backend)."""

    name = "sim"
    Options = SimOptions

    def __init__(self, line_id: str, options: msgspec.Struct, *, clock: Clock,
                 country: str = "US") -> None:
        super().__init__(line_id, options, clock=clock, country=country)
        if not isinstance(options, SimOptions):
            raise LineConfigError(f"line {line_id}: sim backend needs SimOptions, "
                                  f"got {type(options).__name__}")
        self._opts = options
        self._stream: LineStream | None = None
        self._pending: LineItem | None = None
        self._t0 = 0.0
        self._origin = 0
        self._play_lock = threading.Lock()
        self._played: deque[np.ndarray] = deque()
        self._state = {"hook": "on", "ringing": False, "polarity": "normal"}
        self._truth: list[CallTruth] = []

    def _open(self) -> None:
        scenario = with_country(load_scenario(self._opts.scenario), self.country,
                                self._opts.scenario)
        self._stream = LineStream(scenario, country=self.country, repeat=self._opts.repeat)
        self._skip(synth.n_samples(self._opts.start_offset_s))
        self._t0 = self.clock.monotonic()
        log.info("line %s: sim scenario %s, %d calls, %.1f s of line time, speed %g",
                 self.line_id, self._opts.scenario, len(scenario.calls),
                 self._stream.end_sample / SAMPLE_RATE, self._opts.speed)

    def _skip(self, offset: int) -> None:
        """Fast-forward (unpaced) to the first item at or after ``offset``."""
        while (item := self._peek()) is not None and item.sample < offset:
            self._pending = None
            if isinstance(item, SignalEvent):
                self._track(item)
        self._origin = offset

    def _peek(self) -> LineItem | None:
        if self._pending is None and self._stream is not None:
            self._pending = self._stream.next_item()
        return self._pending

    def _read_internal(self, timeout_s: float | None) -> LineItem | None:
        item = self._peek()
        if item is None:
            end_s = self._stream.end_sample / SAMPLE_RATE if self._stream else 0.0
            raise LineClosed(f"line {self.line_id}: scenario {self._opts.scenario} "
                             f"ended at {end_s:.1f} s")
        if not self._wait_until_due(item.sample, timeout_s):
            return None
        self._pending = None
        if isinstance(item, SignalEvent):
            self._track(item)
            return item
        return self._mix(item)

    def _wait_until_due(self, sample: int, timeout_s: float | None) -> bool:
        """Pace: the item at ``sample`` is due at t0 + (sample - origin) / 8000 / speed."""
        if self._opts.speed <= 0:
            return True
        due = self._t0 + (sample - self._origin) / SAMPLE_RATE / self._opts.speed
        wait_s = due - self.clock.monotonic()
        if wait_s <= 0:
            return True
        if timeout_s is not None and wait_s > timeout_s:
            self.clock.sleep(timeout_s)
            return False
        self.clock.sleep(wait_s)
        return True

    def _track(self, event: SignalEvent) -> None:
        if event.signal in (Signal.HOOK_OFF, Signal.HOOK_ON):
            self._state["hook"] = "off" if event.signal == Signal.HOOK_OFF else "on"
        elif event.signal in (Signal.RING_ON, Signal.RING_OFF):
            self._state["ringing"] = event.signal == Signal.RING_ON
        elif event.signal == Signal.POLARITY_REVERSAL:
            normal = self._state["polarity"] == "normal"
            self._state["polarity"] = "reversed" if normal else "normal"

    def _play(self, pcm: np.ndarray) -> None:
        with self._play_lock:
            self._played.append(pcm.copy())

    def _take_played(self, n: int) -> np.ndarray | None:
        with self._play_lock:
            if not self._played:
                return None
            out = np.zeros(n, dtype=np.int32)
            filled = 0
            while filled < n and self._played:
                head = self._played[0]
                k = min(n - filled, head.size)
                out[filled:filled + k] = head[:k]
                filled += k
                if k == head.size:
                    self._played.popleft()
                else:
                    self._played[0] = head[k:]
            return out

    def _mix(self, frame: AudioFrame) -> AudioFrame:
        """A tap hears what the line plays: add it in, saturating."""
        played = self._take_played(frame.pcm.size)
        if played is None:
            return frame
        mixed = np.clip(frame.pcm.astype(np.int32) + played, -32768, 32767)
        return AudioFrame(frame.sample, mixed.astype(np.int16))

    def _status(self) -> dict[str, Any]:
        sample = self._stream.sample if self._stream else 0
        with self._play_lock:
            queued = sum(p.size for p in self._played)
        return {**self._state, "t_s": sample / SAMPLE_RATE, "scenario": self._opts.scenario,
                "speed": self._opts.speed, "play_queued_samples": queued}

    def _close(self) -> None:
        if self._stream is not None:
            self._truth = list(self._stream.truth)
        self._stream = None
        self._pending = None
        with self._play_lock:
            self._played.clear()

    def truth(self) -> list[CallTruth]:
        """Ground truth of every call planned so far (empty before open; kept after close)."""
        return list(self._stream.truth) if self._stream else list(self._truth)
