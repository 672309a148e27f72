"""What is kept of a call's audio: the compliance gate, an explicit state machine.

Pure: the call recorder feeds it the policy decision and the in-call codes and carries out
the :class:`GateAction` each transition names (open the recording with the held audio,
drop it, mark a pause, erase). Every transition is audited by the recorder.

Before the decision (the far end has not answered yet, or the dealer has not picked up)
the call's audio is *held* in memory only. At the decision:

==============  =====================================================================
mode            what happens
==============  =====================================================================
log_basis       recording starts with the held audio (the whole call is kept)
notice          the same, and the notice prompt is played into the line
notice_beep     the same, and a warning tone every ``period_s``
consent_gate    the held audio is dropped; the consent prompt is played; recording
                starts at the consent key, or never ("declined") after the timeout
manual          the held audio is dropped; recording starts at the dealer's start code
none            the held audio is dropped; nothing is recorded
==============  =====================================================================

During the recording the dealer's pause code stops storing audio (nothing of the paused
audio is kept, not even encrypted; the recording marks the gap) until the resume code; the
objection code stops the recording and erases what was kept of the call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from drivers.line import SAMPLE_RATE


class Gate(enum.StrEnum):
    HOLDING = "holding"  # before the decision: audio held in memory
    RECORDING = "recording"
    AWAIT_CONSENT = "await_consent"  # consent prompt played; nothing kept
    AWAIT_START = "await_start"  # manual mode; nothing kept until the start code
    PAUSED = "paused"  # nothing kept until the resume code
    OFF = "off"  # nothing kept for the rest of the call


class GateEv(enum.StrEnum):
    KEEP = "decided_keep"  # log_basis, notice, notice_beep
    ASK_CONSENT = "decided_consent_gate"
    WAIT_START = "decided_manual"
    DONT_RECORD = "decided_none"
    CONSENT = "consent_key"
    CONSENT_TIMEOUT = "consent_timeout"
    START = "start_code"
    PAUSE = "pause_code"
    RESUME = "resume_code"
    OBJECTION = "objection_code"


class GateAction(enum.StrEnum):
    KEEP_HELD = "keep_held"  # open the recording, write the held audio first
    DROP_HELD = "drop_held"
    START = "start"  # open the recording at the current sample
    DECLINE = "decline"  # no consent: nothing was kept
    PAUSE = "pause"
    RESUME = "resume"
    ERASE = "erase"  # close and erase what was kept of the call
    NOTE = "note"  # audited, nothing else changes


G, V, GA = Gate, GateEv, GateAction
GATE_TRANSITIONS: dict[tuple[Gate, GateEv], tuple[Gate, GateAction]] = {
    (G.HOLDING, V.KEEP): (G.RECORDING, GA.KEEP_HELD),
    (G.HOLDING, V.ASK_CONSENT): (G.AWAIT_CONSENT, GA.DROP_HELD),
    (G.HOLDING, V.WAIT_START): (G.AWAIT_START, GA.DROP_HELD),
    (G.HOLDING, V.DONT_RECORD): (G.OFF, GA.DROP_HELD),
    (G.AWAIT_CONSENT, V.CONSENT): (G.RECORDING, GA.START),
    (G.AWAIT_CONSENT, V.CONSENT_TIMEOUT): (G.OFF, GA.DECLINE),
    (G.AWAIT_CONSENT, V.OBJECTION): (G.OFF, GA.DECLINE),
    (G.AWAIT_START, V.START): (G.RECORDING, GA.START),
    (G.AWAIT_START, V.OBJECTION): (G.OFF, GA.NOTE),
    (G.RECORDING, V.PAUSE): (G.PAUSED, GA.PAUSE),
    (G.PAUSED, V.RESUME): (G.RECORDING, GA.RESUME),
    (G.RECORDING, V.OBJECTION): (G.OFF, GA.ERASE),
    (G.PAUSED, V.OBJECTION): (G.OFF, GA.ERASE),
}

MODE_EVENTS = {"log_basis": V.KEEP, "notice": V.KEEP, "notice_beep": V.KEEP,
               "consent_gate": V.ASK_CONSENT, "manual": V.WAIT_START, "none": V.DONT_RECORD}


def step(state: Gate, event: GateEv) -> tuple[Gate, GateAction] | None:
    """The transition for ``event`` in ``state``, or None (the event is ignored there)."""
    return GATE_TRANSITIONS.get((state, event))


@dataclass(frozen=True, slots=True)
class Codes:
    """DTMF codes the dealer keys during a call (site configuration)."""

    start: str = "*1"
    pause: str = "*2"
    resume: str = "*3"
    objection: str = "*9"
    max_gap_s: float = 3.0  # longest pause between the keys of one code

    def events(self) -> dict[str, GateEv]:
        return {self.start: V.START, self.pause: V.PAUSE, self.resume: V.RESUME,
                self.objection: V.OBJECTION}


class CodeMatcher:
    """Recognises the in-call codes and the consent key in a call's DTMF digits."""

    def __init__(self, codes: Codes, consent_digits: str = "") -> None:
        self._codes = codes.events()
        self._consent = consent_digits
        self._max_gap = round(codes.max_gap_s * SAMPLE_RATE)
        self._recent: list[tuple[str, int]] = []

    def push(self, digit: str, sample: int) -> GateEv | None:
        """The event the digit at ``sample`` completes, if any."""
        if self._recent and sample - self._recent[-1][1] > self._max_gap:
            self._recent = []
        self._recent.append((digit, sample))
        keys = "".join(d for d, _ in self._recent)
        for code, event in self._codes.items():
            if keys.endswith(code):
                self._recent = []
                return event
        if digit in self._consent and not keys[:-1].endswith("*"):
            self._recent = []
            return V.CONSENT
        return None
