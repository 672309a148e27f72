"""The call recorder: turns engine transitions into recordings, catalogue rows and audit entries.

Each state change and its audit entry are written in one SQLite transaction. A recording
row is committed (state ``recording``) before its file is created, so after a crash every
file on disk has a row, and :func:`recover_interrupted` can close what was left open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from drivers.clock import Clock
from drivers.dsp.events import DtmfDigit
from drivers.line import SAMPLE_RATE, AudioFrame
from firmware.agecrypt import Recipient
from firmware.catalogue import Catalogue, Txn
from firmware.codec import alaw_encode
from firmware.engine import Action, Call, State, Transition
from firmware.gate import MODE_EVENTS, CodeMatcher, Codes, Gate, GateAction, GateEv, step
from firmware.policy import CallFacts, Decision, PolicyHook
from firmware.recfile import RecordingError, RecordingWriter, recover

log = logging.getLogger(__name__)

# Transitions that change nothing but a counter are not audited one by one (a ring, a
# further dialed digit); their totals are audited with the next state change.
_QUIET = {Action.RING, Action.ADD_DIGIT, Action.IN_CALL_DIGIT, Action.IGNORE}


def iso_utc(wall: float) -> str:
    """Unix seconds -> ISO 8601 UTC with milliseconds and 'Z'."""
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def commitment(salt: str, value: str | None) -> str | None:
    """A hiding commitment to a phone number for the append-only audit trail.

    HMAC-SHA256 keyed by the call's random salt (kept only in the erasable catalogue row):
    once the row is erased the audit entry no longer reveals the number, yet while the
    salt exists anyone holding it can check which number the entry committed to.
    """
    if not value:
        return None
    return hmac.new(bytes.fromhex(salt), value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class RecorderSettings:
    device_id: str
    jurisdiction: str
    recordings_dir: Path
    recipients: Sequence[Recipient]
    flush_interval_s: float = 2.0
    codes: Codes = field(default_factory=Codes)
    # Audio before the decision is held in memory, at most this much (the oldest goes).
    hold_max_s: float = 120.0
    # An outbound call whose answer was not heard is decided this long after it started.
    decide_after_s: float = 60.0


class PromptAudio(Protocol):
    name: str
    language: str
    pcm: np.ndarray
    sha256: str
    source: str


class PromptSource(Protocol):
    def get(self, name: str, language: str) -> PromptAudio:
        ...


# Plays int16 8 kHz audio into the line (drivers.line.LineBackend.play).
Player = Callable[[np.ndarray], None]
# Makes the recorder warning tone: (freq_hz, duration_s) -> int16 audio.
ToneMaker = Callable[[float, float], np.ndarray]
PROMPTED_MODES = {"notice": "notice", "notice_beep": "notice", "consent_gate": "consent"}


@dataclass
class _CallGate:
    """The compliance state of the call in progress."""

    gate: Gate = Gate.HOLDING
    decision: Decision | None = None
    # contiguous stretches of held audio: (first sample, A-law bytes)
    held: list[tuple[int, bytearray]] = field(default_factory=list)
    held_samples: int = 0
    held_dropped: int = 0
    matcher: CodeMatcher | None = None
    consent_deadline: int | None = None
    next_beep: int | None = None
    beeps: int = 0
    pause_start: int | None = None
    now: int = 0


class CallRecorder:
    """The :class:`firmware.engine.CallListener` of one line.

    Carries out the compliance decision through :mod:`firmware.gate`: the decision is
    taken when the call connects (the dealer picks up an inbound call; the far end answers
    an outbound one, or ``decide_after_s`` passes without an answer being heard), with the
    numbers known by then. Prompts and beeps go into the line through ``player``.
    """

    def __init__(self, catalogue: Catalogue, policy: PolicyHook, settings: RecorderSettings,
                 *, clock: Clock, new_id: Callable[[], str], player: Player | None = None,
                 prompts: PromptSource | None = None, tone: ToneMaker | None = None) -> None:
        self.catalogue = catalogue
        self.clock = clock
        self.new_id = new_id
        self.policy = policy
        self.settings = settings
        self.player = player
        self.prompts = prompts
        self.tone = tone
        self._writer: RecordingWriter | None = None
        self._recording_id: str | None = None
        self._salt: dict[str, str] = {}
        self._gates: dict[str, _CallGate] = {}
        self.audio_frames = 0

    # --- CallListener ------------------------------------------------------------------
    def on_transition(self, call: Call, tr: Transition) -> None:
        if tr.action in (Action.START_INBOUND, Action.START_OUTBOUND):
            self._start(call, tr)
            return
        if tr.action is Action.NEW_SEGMENT:
            self._new_segment(call, tr)
        elif tr.next is State.ENDED:
            self._end(call, tr)
            return
        elif tr.action not in _QUIET or tr.prev is not tr.next:
            with self.catalogue.transaction() as tx:
                tx.update_call(call.id, **self._call_fields(call))
                self._audit_transition(tx, call, tr)
        if tr.next is State.CONNECTED and tr.prev is not State.CONNECTED:
            self._decide(call, tr.sample, "connected")

    def on_audio(self, call: Call, frame: AudioFrame) -> None:
        st = self._gates.get(call.id)
        if st is None:
            return
        st.now = frame.sample + len(frame.pcm)
        if st.gate is Gate.HOLDING:
            self._hold(st, frame)
            if (call.direction == "outbound" and frame.sample - call.start_sample
                    >= self.settings.decide_after_s * SAMPLE_RATE):
                self._decide(call, frame.sample, "no answer heard")
        elif st.gate is Gate.RECORDING and self._writer is not None:
            self._writer.write_audio(frame.sample, frame.pcm)
            self.audio_frames += 1
        self._timers(call, st, frame.sample)

    def on_digit(self, call: Call, digit: DtmfDigit) -> None:
        """An in-call digit: the consent key or a dealer's code (never stored in clear)."""
        st = self._gates.get(call.id)
        if st is None or st.matcher is None:
            return
        event = st.matcher.push(digit.digit, digit.sample)
        if event is not None:
            # the code's own tones are kept (before a pause) or not (before a start)
            self._gate_event(call, st, event, max(digit.end_sample or digit.sample, st.now))

    # --- steps ---------------------------------------------------------------------------
    def _start(self, call: Call, tr: Transition) -> None:
        salt = os.urandom(16).hex()
        self._salt[call.id] = salt
        self._gates[call.id] = _CallGate(now=tr.sample)
        with self.catalogue.transaction() as tx:
            tx.insert_call(id=call.id, line_id=call.line_id,
                           state="active", started_at=iso_utc(call.started_wall),
                           started_wall=call.started_wall, wall_synced=int(call.wall_synced),
                           salt=salt, **self._call_fields(call))
            self._audit_transition(tx, call, tr)

    def _decide(self, call: Call, sample: int, when: str) -> None:
        st = self._gates.get(call.id)
        if st is None or st.decision is not None:
            return
        decision = self.policy.decide(CallFacts(
            line_id=call.line_id, jurisdiction=self.settings.jurisdiction,
            direction=call.direction, caller_number=call.caller_number,
            dialed_number=call.dialed or None))
        prompt_name = PROMPTED_MODES.get(decision.mode)
        if decision.record and prompt_name and (self.player is None or self.prompts is None):
            decision = replace(decision, record=False, mode="none",
                               reason=f"{decision.mode} needs a prompt; this line cannot play one")
        st.decision = decision
        st.matcher = CodeMatcher(self.settings.codes, decision.consent_digits
                                 if decision.mode == "consent_gate" else "")
        with self.catalogue.transaction() as tx:
            tx.update_call(call.id, decision=_json(decision.as_dict()),
                           policy_hash=decision.policy_hash, **self._call_fields(call))
            tx.audit("decision", call.id, when=when, offset_s=_offset(call, sample),
                     **decision.as_dict())
        if not decision.record:
            event = GateEv.DONT_RECORD
        else:
            event = MODE_EVENTS.get(decision.mode, GateEv.KEEP)
        self._gate_event(call, st, event, sample)
        if decision.record and prompt_name:
            played = self._play_prompt(call, prompt_name, decision.language, sample)
            after = sample + played
            if decision.mode == "consent_gate":
                st.consent_deadline = after + round(decision.consent_timeout_s * SAMPLE_RATE)
            if decision.mode == "notice_beep" and decision.beep is not None:
                st.next_beep = after + round(decision.beep[2] * SAMPLE_RATE)

    def _gate_event(self, call: Call, st: _CallGate, event: GateEv, sample: int) -> None:
        rule = step(st.gate, event)
        if rule is None:
            log.debug("call %s: %s ignored while %s", call.id, event, st.gate)
            return
        nxt, action = rule
        prev, st.gate = st.gate, nxt
        detail = self._gate_action(call, st, action, sample)
        with self.catalogue.transaction() as tx:
            tx.audit("gate", call.id, **{"from": prev.value, "event": event.value,
                                         "to": nxt.value, "action": action.value,
                                         "offset_s": _offset(call, sample), **detail})

    def _gate_action(self, call: Call, st: _CallGate, action: GateAction,
                     sample: int) -> dict[str, Any]:
        if action is GateAction.KEEP_HELD:
            held, st.held, st.held_samples = st.held, [], 0
            self._open_recording(call, held[0][0] if held else sample)
            for at, alaw in held:
                if self._writer is not None:
                    self._writer.write_alaw(at, bytes(alaw))
            return {"held_s": round(sum(len(a) for _, a in held) / SAMPLE_RATE, 3),
                    "held_dropped_s": round(st.held_dropped / SAMPLE_RATE, 3)}
        if action is GateAction.DROP_HELD:
            dropped = st.held_samples + st.held_dropped
            st.held, st.held_samples, st.held_dropped = [], 0, 0
            return {"dropped_s": round(dropped / SAMPLE_RATE, 3)}
        if action is GateAction.START:
            self._open_recording(call, sample)
        elif action is GateAction.PAUSE:
            st.pause_start = sample
            if self._writer is not None:
                self._writer.flush()
        elif action is GateAction.RESUME:
            return {"paused_s": self._write_pause_gap(st, sample)}
        elif action is GateAction.ERASE:
            self._write_pause_gap(st, sample)
            self._close_recording(call, sample, "objection")
            return {"erased": self._erase_call(call, "objection")}
        return {}

    def _write_pause_gap(self, st: _CallGate, sample: int) -> float:
        start, st.pause_start = st.pause_start, None
        if start is None or self._writer is None or sample <= start:
            return 0.0
        self._writer.write_gap(start, sample, "paused")
        return round((sample - start) / SAMPLE_RATE, 3)

    def _hold(self, st: _CallGate, frame: AudioFrame) -> None:
        """Keep the frame in memory, A-law encoded as it would be stored (half the size of
        the samples), appended to the current stretch (no per-frame objects)."""
        alaw = alaw_encode(frame.pcm)
        last = st.held[-1] if st.held else None
        if last is not None and last[0] + len(last[1]) == frame.sample:
            last[1].extend(alaw)
        else:
            st.held.append((frame.sample, bytearray(alaw)))
        st.held_samples += len(alaw)
        excess = st.held_samples - round(self.settings.hold_max_s * SAMPLE_RATE)
        while excess > 0:  # the oldest audio goes
            start, data = st.held[0]
            cut = min(excess, len(data))
            del data[:cut]
            st.held[0] = (start + cut, data)
            if not data:
                st.held.pop(0)
            st.held_samples -= cut
            st.held_dropped += cut
            excess -= cut

    def _timers(self, call: Call, st: _CallGate, sample: int) -> None:
        if (st.gate is Gate.AWAIT_CONSENT and st.consent_deadline is not None
                and sample >= st.consent_deadline):
            self._gate_event(call, st, GateEv.CONSENT_TIMEOUT, sample)
        if st.next_beep is not None and sample >= st.next_beep:
            decision = st.decision
            assert decision is not None and decision.beep is not None
            freq_hz, duration_s, period_s = decision.beep
            if st.gate in (Gate.RECORDING, Gate.PAUSED) and self.player and self.tone:
                self.player(self.tone(freq_hz, duration_s))
                st.beeps += 1
                if st.beeps == 1:
                    with self.catalogue.transaction() as tx:
                        tx.audit("beep.started", call.id, offset_s=_offset(call, sample),
                                 freq_hz=freq_hz, duration_s=duration_s, period_s=period_s)
            st.next_beep = sample + round(period_s * SAMPLE_RATE)

    def _play_prompt(self, call: Call, name: str, language: str, sample: int) -> int:
        """Play a prompt into the line; audit its hash; return its length in samples."""
        assert self.player is not None and self.prompts is not None
        prompt = self.prompts.get(name, language)
        try:
            self.player(prompt.pcm)
            outcome = "played"
        except Exception as exc:  # a line that fails to play: audited, the call goes on
            log.error("call %s: prompt %s/%s not played: %s", call.id, language, name, exc)
            outcome = f"failed: {exc}"
        with self.catalogue.transaction() as tx:
            tx.audit("prompt.played" if outcome == "played" else "prompt.failed", call.id,
                     name=prompt.name, language=prompt.language, sha256=prompt.sha256,
                     source=prompt.source, offset_s=_offset(call, sample),
                     duration_s=round(len(prompt.pcm) / SAMPLE_RATE, 3), outcome=outcome)
        return len(prompt.pcm)

    def _open_recording(self, call: Call, sample: int) -> None:
        st = self._gates.get(call.id)
        decision = st.decision if st is not None else None
        rec_id = self.new_id()
        path = self.settings.recordings_dir / f"{rec_id}.rec"
        retention = None
        if decision is not None and decision.retention_days is not None:
            until = datetime.fromtimestamp(call.started_wall, UTC) + timedelta(
                days=decision.retention_days)
            retention = iso_utc(until.timestamp())
        with self.catalogue.transaction() as tx:
            tx.insert_recording(id=rec_id, call_id=call.id, segment=call.segment,
                                line_id=call.line_id, path=str(path), codec="alaw",
                                sample_rate=SAMPLE_RATE, state="recording",
                                started_offset_s=call.offset_s(sample),
                                retention_until=retention,
                                created_at=iso_utc(self.clock.wall()))
            tx.audit("recording.opened", rec_id, call_id=call.id, segment=call.segment,
                     offset_s=call.offset_s(sample), codec="alaw",
                     retention_until=retention)
        header = {"recording_id": rec_id, "call_id": call.id, "segment": call.segment,
                  "line_id": call.line_id, "device_id": self.settings.device_id,
                  "codec": "alaw", "sample_rate": SAMPLE_RATE, "start_sample": sample,
                  "created_at": iso_utc(self.clock.wall())}
        try:
            self._writer = RecordingWriter(path, recipients=self.settings.recipients,
                                           header=header,
                                           flush_interval_s=self.settings.flush_interval_s)
        except (OSError, RecordingError) as exc:
            log.error("recording %s: cannot create %s: %s", rec_id, path, exc)
            with self.catalogue.transaction() as tx:
                tx.update_recording(rec_id, state="interrupted", size=0)
                tx.audit("recording.failed", rec_id, error=str(exc))
            return
        self._recording_id = rec_id

    def _close_recording(self, call: Call, sample: int, reason: str) -> None:
        writer, rec_id = self._writer, self._recording_id
        self._writer = self._recording_id = None
        if writer is None or rec_id is None:
            return
        summary = writer.close(reason)
        with self.catalogue.transaction() as tx:
            tx.update_recording(rec_id, state="complete", size=summary.size_bytes,
                                sha256=summary.sha256, audio_s=summary.samples / SAMPLE_RATE,
                                ended_offset_s=call.offset_s(sample))
            if reason != "objection":
                tx.enqueue("recording", rec_id)
            tx.audit("recording.closed", rec_id, call_id=call.id, reason=reason,
                     size=summary.size_bytes, sha256=summary.sha256,
                     audio_s=summary.samples / SAMPLE_RATE)

    def _erase_call(self, call: Call, reason: str) -> int:
        """Delete every recording file of the call; ask the central store to do the same."""
        erased = 0
        for row in self.catalogue.recordings_of_call(call.id):
            if row["deleted_at"]:
                continue
            Path(row["path"]).unlink(missing_ok=True)
            Path(row["path"] + ".part").unlink(missing_ok=True)
            with self.catalogue.transaction() as tx:
                tx.update_recording(row["id"], deleted_at=iso_utc(self.clock.wall()),
                                    erase_reason=reason)
                tx.enqueue("erasure", row["id"])
                tx.audit("recording.erased", row["id"], call_id=call.id, reason=reason,
                         was_synced=bool(row["synced_at"]))
            erased += 1
        return erased

    def _new_segment(self, call: Call, tr: Transition) -> None:
        st = self._gates.get(call.id)
        if self._writer is None or st is None:
            return
        paused = st.pause_start is not None
        self._write_pause_gap(st, tr.sample)
        self._close_recording(call, tr.sample, "segment_cap")
        self._open_recording(call, tr.sample)
        if paused:
            st.pause_start = tr.sample

    def _end(self, call: Call, tr: Transition) -> None:
        st = self._gates.pop(call.id, None)
        if st is not None:
            self._write_pause_gap(st, tr.sample)
        self._close_recording(call, tr.sample, call.end_reason or "ended")
        with self.catalogue.transaction() as tx:
            tx.update_call(call.id, state="ended", **self._call_fields(call))
            self._audit_transition(tx, call, tr)
            if st is not None and st.decision is None:
                tx.audit("decision", call.id, when="ended before connecting", record=False,
                         reason="the call never connected: nothing recorded",
                         dropped_s=round((st.held_samples + st.held_dropped) / SAMPLE_RATE, 3))
            if st is not None and st.beeps:
                tx.audit("beep.stopped", call.id, beeps=st.beeps)
        self._salt.pop(call.id, None)

    # --- helpers -----------------------------------------------------------------------
    def _call_fields(self, call: Call) -> dict[str, Any]:
        return {
            "direction": call.direction,
            "caller_number": call.caller_number, "caller_name": call.caller_name,
            "caller_id_standard": call.caller_id_standard,
            "dialed_number": call.dialed or None,
            "answered_offset_s": None if call.answer_sample is None
            else call.offset_s(call.answer_sample),
            "ended_offset_s": None if call.end_sample is None else call.offset_s(call.end_sample),
            "end_reason": call.end_reason,
        }

    def _audit_transition(self, tx: Txn, call: Call, tr: Transition) -> None:
        salt = self._salt.get(call.id, "00")
        data: dict[str, Any] = {
            "from": tr.prev.value, "event": tr.event.value, "to": tr.next.value,
            "action": tr.action.value, "offset_s": round(call.offset_s(tr.sample), 3),
            "direction": call.direction, **tr.detail,
        }
        if tr.next in (State.CONNECTED, State.ENDED) or tr.action in (
                Action.SET_CALLER, Action.START_INBOUND, Action.START_OUTBOUND):
            data["caller"] = commitment(salt, call.caller_number)
            data["dialed"] = commitment(salt, call.dialed)
            data["rings"] = call.rings
        kind = "call.started" if tr.prev is State.IDLE else (
            "call.ended" if tr.next is State.ENDED else "call.transition")
        tx.audit(kind, call.id, **data)


def _offset(call: Call, sample: int) -> float:
    return round(call.offset_s(sample), 3)


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def recover_interrupted(catalogue: Catalogue) -> list[str]:
    """Close what a crash or power loss left open; return the recovered recording ids."""
    recovered = []
    for row in catalogue.open_recordings():
        final = Path(row["path"])
        part = final.with_name(final.name + ".part")
        fields: dict[str, Any] = {"state": "interrupted"}
        audit: dict[str, Any] = {"call_id": row["call_id"]}
        if part.exists():
            summary = recover(part, final)
            fields.update(size=summary.size_bytes, sha256=summary.sha256)
            audit.update(size=summary.size_bytes, sha256=summary.sha256, records=summary.records,
                         truncated_bytes=summary.truncated_bytes)
        elif final.exists():
            # Crash after the file was closed and renamed, before the row was updated.
            digest = hashlib.sha256(final.read_bytes()).hexdigest()
            fields.update(state="complete", size=final.stat().st_size, sha256=digest)
            audit.update(size=fields["size"], sha256=digest, note="closed before the crash")
        else:
            fields.update(size=0)
            audit.update(note="no file was created")
        with catalogue.transaction() as tx:
            tx.update_recording(row["id"], **fields)
            if fields.get("size"):
                tx.enqueue("recording", row["id"])
            tx.audit("recording.recovered", row["id"], state=fields["state"], **audit)
        recovered.append(row["id"])
        log.warning("recording %s: recovered as %s", row["id"], fields["state"])
    for call in catalogue.active_calls():
        with catalogue.transaction() as tx:
            tx.update_call(call["id"], state="ended", end_reason="interrupted")
            tx.audit("call.ended", call["id"], reason="interrupted", note="found active at start")
    return recovered
