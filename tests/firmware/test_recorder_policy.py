"""The recorder under every jurisdiction's real rules: emergency calls are never prompted,
beeped or gated, and nothing is recorded without a basis and a retention date."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drivers.clock import ManualClock
from drivers.line import AudioFrame
from firmware.agecrypt import Identity
from firmware.catalogue import Catalogue
from firmware.compliance import CompliancePolicy, SitePolicy
from firmware.engine import Action, Call, Ev, State, Transition
from firmware.ids import Uuid7Factory
from firmware.policyfile import parse_policy
from firmware.policystore import BUILTIN_PATH
from firmware.prompts import tone_prompt
from firmware.recorder import CallRecorder, RecorderSettings

POLICY = parse_policy(BUILTIN_PATH.read_bytes(), str(BUILTIN_PATH))
CASES = [(j, d) for j in POLICY.jurisdictions() for d in ("inbound", "outbound")]


class Prompts:
    def get(self, name: str, language: str) -> object:
        return tone_prompt(name)


def emergency_numbers(jurisdiction: str, direction: str) -> list[str]:
    return [p.replace("x", "0") for p in POLICY.rule(jurisdiction, direction).emergency]


def run_call(tmp: Path, jurisdiction: str, direction: str, number: str | None
             ) -> tuple[Catalogue, list[np.ndarray]]:
    clock = ManualClock()
    ids = Uuid7Factory(clock)
    catalogue = Catalogue(tmp / f"{jurisdiction}-{direction}.db", clock=clock, device_id="d1")
    played: list[np.ndarray] = []
    settings = RecorderSettings(device_id="d1", jurisdiction=jurisdiction,
                                recordings_dir=tmp / "rec",
                                recipients=[Identity.generate().recipient])
    recorder = CallRecorder(catalogue, CompliancePolicy(POLICY, jurisdiction, SitePolicy()),
                            settings, clock=clock, new_id=ids.new, player=played.append,
                            prompts=Prompts(), tone=lambda f, d: np.zeros(8, np.int16))
    call = Call(id=ids.new(), line_id="L1", direction=direction, start_sample=0,
                started_wall=clock.wall(), wall_synced=True)
    if direction == "inbound":
        call.caller_number = number
        start, answer = (Ev.RING_ON, Action.START_INBOUND), (Ev.HOOK_OFF, Action.ANSWER_INBOUND)
        first = State.RINGING
    else:
        call.dialed = number or ""
        start, answer = (Ev.HOOK_OFF, Action.START_OUTBOUND), (Ev.ANSWER, Action.ANSWER_OUTBOUND)
        first = State.DIALING
    recorder.on_transition(call, Transition(0, State.IDLE, start[0], first, start[1], {}))
    recorder.on_audio(call, AudioFrame(0, np.zeros(160, np.int16)))
    recorder.on_transition(call, Transition(8000, first, answer[0], State.CONNECTED,
                                            answer[1], {}))
    for k in range(1, 40 * 50):  # 40 s of line audio: beeps and consent timeouts fall due
        recorder.on_audio(call, AudioFrame(8000 + 160 * k, np.zeros(160, np.int16)))
    call.end_reason = "hangup"
    recorder.on_transition(call, Transition(8000 + 160 * 2000, State.CONNECTED, Ev.HOOK_ON,
                                            State.ENDED, Action.END, {"reason": "hangup"}))
    return catalogue, played


@pytest.mark.parametrize(("jurisdiction", "direction"), CASES)
def test_emergency_calls_are_never_prompted_or_recorded(tmp_path: Path, jurisdiction: str,
                                                        direction: str) -> None:
    numbers = emergency_numbers(jurisdiction, direction)
    assert numbers, f"{jurisdiction} has no emergency numbers"
    for number in numbers:
        catalogue, played = run_call(tmp_path / number, jurisdiction, direction, number)
        assert played == [], f"{jurisdiction} {direction} {number}: something was played"
        (decision,) = [e for e in catalogue.audit_entries() if e.kind == "decision"]
        assert decision.data["emergency"] is True
        assert catalogue.recordings() == []  # emergency_record is false in the shipped policy


@pytest.mark.parametrize(("jurisdiction", "direction"), CASES)
def test_an_ordinary_call_follows_the_rule_with_a_basis(tmp_path: Path, jurisdiction: str,
                                                         direction: str) -> None:
    rule = POLICY.rule(jurisdiction, direction)
    catalogue, played = run_call(tmp_path, jurisdiction, direction, "5551234567")
    rows = catalogue.recordings()
    if rule.mode in ("notice", "notice_beep", "consent_gate"):
        assert played, "the rule's prompt was not played"
    else:
        assert played == []
    if rule.mode in ("log_basis", "notice", "notice_beep"):
        (row,) = rows
        assert row["retention_until"] and rule.basis.strip()
    else:  # consent never given, manual start never keyed, or none
        assert rows == []


def test_held_audio_is_capped_and_the_drop_is_audited(tmp_path: Path) -> None:
    """Before the decision at most hold_max_s of audio is held; the oldest goes first."""
    from firmware.policy import PlaceholderPolicy
    from firmware.recfile import decrypt_recording

    clock = ManualClock()
    ids = Uuid7Factory(clock)
    central = Identity.generate()
    catalogue = Catalogue(tmp_path / "c.db", clock=clock, device_id="d1")
    settings = RecorderSettings(device_id="d1", jurisdiction="DE", recordings_dir=tmp_path,
                                recipients=[central.recipient], hold_max_s=1.0)
    recorder = CallRecorder(catalogue, PlaceholderPolicy(), settings, clock=clock, new_id=ids.new)
    call = Call(id=ids.new(), line_id="L1", direction="inbound", start_sample=0,
                started_wall=clock.wall(), wall_synced=True)
    recorder.on_transition(call, Transition(0, State.IDLE, Ev.RING_ON, State.RINGING,
                                            Action.START_INBOUND, {}))
    ramp = (np.arange(3 * 8000) % 1000).astype(np.int16)  # 3 s, each frame recognisable
    for at in range(0, len(ramp), 160):
        recorder.on_audio(call, AudioFrame(at, ramp[at:at + 160]))
    recorder.on_transition(call, Transition(len(ramp), State.RINGING, Ev.HOOK_OFF,
                                            State.CONNECTED, Action.ANSWER_INBOUND, {}))
    call.end_reason = "hangup"
    recorder.on_transition(call, Transition(len(ramp), State.CONNECTED, Ev.HOOK_ON,
                                            State.ENDED, Action.END, {}))
    (row,) = catalogue.recordings()
    rec = decrypt_recording(Path(row["path"]), [central])
    assert rec.start_sample == 2 * 8000 and len(rec.pcm) == 8000  # the newest second
    (keep,) = [e.data for e in catalogue.audit_entries() if e.kind == "gate"]
    assert keep["held_s"] == 1.0 and keep["held_dropped_s"] == 2.0
