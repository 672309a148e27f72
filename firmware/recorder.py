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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from drivers.clock import Clock
from drivers.line import SAMPLE_RATE, AudioFrame
from firmware.agecrypt import Recipient
from firmware.catalogue import Catalogue, Txn
from firmware.engine import Action, Call, State, Transition
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


class CallRecorder:
    """The :class:`firmware.engine.CallListener` of one line."""

    def __init__(self, catalogue: Catalogue, policy: PolicyHook, settings: RecorderSettings,
                 *, clock: Clock, new_id: Callable[[], str]) -> None:
        self.catalogue = catalogue
        self.clock = clock
        self.new_id = new_id
        self.policy = policy
        self.settings = settings
        self._writer: RecordingWriter | None = None
        self._recording_id: str | None = None
        self._salt: dict[str, str] = {}
        self._decision: dict[str, Decision] = {}
        self.audio_frames = 0

    # --- CallListener ------------------------------------------------------------------
    def on_transition(self, call: Call, tr: Transition) -> None:
        if tr.action in (Action.START_INBOUND, Action.START_OUTBOUND):
            self._start(call, tr)
        elif tr.action is Action.NEW_SEGMENT:
            self._close_recording(call, tr, "segment_cap")
            self._open_recording(call, tr.sample)
        elif tr.next is State.ENDED:
            self._end(call, tr)
        elif tr.action not in _QUIET or tr.prev is not tr.next:
            with self.catalogue.transaction() as tx:
                tx.update_call(call.id, **self._call_fields(call))
                self._audit_transition(tx, call, tr)

    def on_audio(self, call: Call, frame: AudioFrame) -> None:
        if self._writer is not None:
            self._writer.write_audio(frame.sample, frame.pcm)
            self.audio_frames += 1

    def on_digit(self, call: Call, digit: object) -> None:
        """In-call digits are for the compliance engine; nothing is stored."""

    # --- steps ---------------------------------------------------------------------------
    def _start(self, call: Call, tr: Transition) -> None:
        salt = os.urandom(16).hex()
        self._salt[call.id] = salt
        decision = self.policy.decide(CallFacts(
            line_id=call.line_id, jurisdiction=self.settings.jurisdiction,
            direction=call.direction, caller_number=call.caller_number,
            dialed_number=call.dialed or None))
        self._decision[call.id] = decision
        with self.catalogue.transaction() as tx:
            tx.insert_call(id=call.id, line_id=call.line_id,
                           state="active", started_at=iso_utc(call.started_wall),
                           started_wall=call.started_wall, wall_synced=int(call.wall_synced),
                           salt=salt, decision=_json(decision.as_dict()),
                           policy_hash=decision.policy_hash, **self._call_fields(call))
            self._audit_transition(tx, call, tr)
            tx.audit("decision", call.id, **decision.as_dict())
        if decision.record:
            self._open_recording(call, tr.sample)

    def _open_recording(self, call: Call, sample: int) -> None:
        decision = self._decision[call.id]
        rec_id = self.new_id()
        path = self.settings.recordings_dir / f"{rec_id}.rec"
        retention = None
        if decision.retention_days is not None:
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
                     offset_s=call.offset_s(sample), codec="alaw")
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

    def _close_recording(self, call: Call, tr: Transition, reason: str) -> None:
        writer, rec_id = self._writer, self._recording_id
        self._writer = self._recording_id = None
        if writer is None or rec_id is None:
            return
        summary = writer.close(reason)
        with self.catalogue.transaction() as tx:
            tx.update_recording(rec_id, state="complete", size=summary.size_bytes,
                                sha256=summary.sha256, audio_s=summary.samples / SAMPLE_RATE,
                                ended_offset_s=call.offset_s(tr.sample))
            tx.enqueue("recording", rec_id)
            tx.audit("recording.closed", rec_id, call_id=call.id, reason=reason,
                     size=summary.size_bytes, sha256=summary.sha256,
                     audio_s=summary.samples / SAMPLE_RATE)

    def _end(self, call: Call, tr: Transition) -> None:
        self._close_recording(call, tr, call.end_reason or "ended")
        with self.catalogue.transaction() as tx:
            tx.update_call(call.id, state="ended", **self._call_fields(call))
            self._audit_transition(tx, call, tr)
        self._salt.pop(call.id, None)
        self._decision.pop(call.id, None)

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
