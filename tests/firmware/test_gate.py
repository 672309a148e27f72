"""The compliance gate's transition table and the in-call code matcher."""

from __future__ import annotations

import itertools

import pytest

from firmware.config import ConfigError, parse_config
from firmware.gate import (
    GATE_TRANSITIONS,
    MODE_EVENTS,
    CodeMatcher,
    Codes,
    Gate,
    GateAction,
    GateEv,
    step,
)
from tests.firmware.test_config import GOOD

RATE = 8000


def test_only_recording_states_can_lead_to_stored_audio() -> None:
    """Audio is stored only in RECORDING; entering it needs a decision, consent or a code."""
    into_recording = {(s, e) for (s, e), (n, _) in GATE_TRANSITIONS.items()
                      if n is Gate.RECORDING and s is not Gate.RECORDING}
    assert into_recording == {(Gate.HOLDING, GateEv.KEEP), (Gate.AWAIT_CONSENT, GateEv.CONSENT),
                              (Gate.AWAIT_START, GateEv.START), (Gate.PAUSED, GateEv.RESUME)}
    assert all(step(Gate.OFF, e) is None for e in GateEv)  # off is final


@pytest.mark.parametrize(("mode", "expected"), [
    ("log_basis", Gate.RECORDING), ("notice", Gate.RECORDING), ("notice_beep", Gate.RECORDING),
    ("consent_gate", Gate.AWAIT_CONSENT), ("manual", Gate.AWAIT_START), ("none", Gate.OFF)])
def test_every_mode_has_its_first_step(mode: str, expected: Gate) -> None:
    rule = step(Gate.HOLDING, MODE_EVENTS[mode])
    assert rule is not None and rule[0] is expected


def test_codes_cannot_start_a_recording_that_was_declined_or_refused() -> None:
    for state in (Gate.OFF,):
        for event in (GateEv.START, GateEv.RESUME, GateEv.CONSENT, GateEv.KEEP):
            assert step(state, event) is None
    assert step(Gate.AWAIT_CONSENT, GateEv.START) is None  # a start code is not consent
    assert step(Gate.RECORDING, GateEv.OBJECTION) == (Gate.OFF, GateAction.ERASE)


def feed(matcher: CodeMatcher, keys: str, gap_s: float = 0.3, start: int = 0
         ) -> list[GateEv | None]:
    return [matcher.push(k, start + round(i * gap_s * RATE)) for i, k in enumerate(keys)]


def test_codes_are_recognised_within_the_gap() -> None:
    matcher = CodeMatcher(Codes())
    assert feed(matcher, "*2")[-1] is GateEv.PAUSE
    assert feed(matcher, "5*3", start=RATE * 100)[-1] is GateEv.RESUME
    assert feed(matcher, "*9", start=RATE * 200)[-1] is GateEv.OBJECTION
    assert feed(matcher, "*2", gap_s=3.5, start=RATE * 300) == [None, None]  # too slow


def test_consent_digit_alone_but_not_as_part_of_a_code() -> None:
    matcher = CodeMatcher(Codes(), consent_digits="1")
    assert feed(matcher, "1") == [GateEv.CONSENT]
    assert feed(matcher, "*1", start=RATE * 50) == [None, GateEv.START]
    assert feed(matcher, "2", start=RATE * 90) == [None]


@pytest.mark.parametrize(("codes", "message"), [
    ('start = "*1"\npause = "*12"', "codes.start: '*1' clashes with codes.pause '*12'"),
    ('pause = "12"', "codes.pause"),
    ('max_gap_s = 60', "codes.max_gap_s"),
])
def test_config_codes_are_checked(codes: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        parse_config(GOOD + f"\n[codes]\n{codes}\n", "c.toml")


def test_every_pair_of_default_codes_is_prefix_free() -> None:
    values = [Codes().start, Codes().pause, Codes().resume, Codes().objection]
    for a, b in itertools.permutations(values, 2):
        assert not b.startswith(a)

