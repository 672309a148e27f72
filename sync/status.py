"""Fleet status payloads: birth, will and heartbeat (pure builders from plain inputs).

All three go to ``er/v1/<id>/up/status`` as one UTF-8 JSON object; docs/PROTOCOL.md
("Fleet status") describes every field. The session counter increases on every
connection; a consumer keeps the highest session it has seen per device and ignores any
status with a lower one, so a will the broker publishes late for an old connection
cannot mark a device offline that has already said it is back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

SCHEMA = 1  # the "schema" field: bumped when a field changes meaning

StatusType = Literal["birth", "will", "heartbeat"]


def iso_utc(wall_s: float) -> str:
    """Unix seconds -> ``2026-09-21T12:00:00Z``."""
    return datetime.fromtimestamp(int(wall_s), UTC).isoformat().replace("+00:00", "Z")


def _encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Identity:
    """What every status message says about who sends it."""

    device_id: str
    session: int
    firmware_version: str


def _base(kind: StatusType, state: str, who: Identity) -> dict[str, Any]:
    return {"schema": SCHEMA, "type": kind, "state": state, "device": who.device_id,
            "session": who.session, "firmware_version": who.firmware_version}


def birth_payload(who: Identity, *, config_sha256: str, config_version: int,
                  policy_version: int, started_at_s: float, now_s: float,
                  clock_synced: bool) -> bytes:
    """Published retained (QoS 1) after every CONNACK."""
    fields = _base("birth", "online", who)
    fields |= {"config_sha256": config_sha256, "config_version": config_version,
               "policy_version": policy_version, "started_at": iso_utc(started_at_s),
               "sent_at": iso_utc(now_s), "clock_synced": clock_synced}
    return _encode(fields)


def will_payload(who: Identity) -> bytes:
    """Set as the Will (retained, QoS 1) before connecting: the broker publishes it when the
    connection ends without a DISCONNECT. It has no time of its own (it is written before
    the connection it reports on); the broker's delivery time is the consumer's."""
    return _encode(_base("will", "offline", who))


@dataclass(frozen=True)
class LineState:
    line_id: str
    active_calls: int


@dataclass(frozen=True)
class Health:
    """The heartbeat's measurements, gathered by the caller."""

    backlog_count: int  # outbox items not yet sent
    backlog_bytes: int  # their size (recording files)
    oldest_unsynced_age_s: int | None  # age of the oldest pending outbox item
    disk_free_bytes: int  # statvfs of data_dir, blocks available to unprivileged users
    cert_expiry_days: int | None  # client certificate notAfter - now, whole days
    clock_synced: bool
    lines: Sequence[LineState]
    last_call_at: str | None  # start of the newest call in the catalogue
    config_sha256: str
    config_version: int
    policy_version: int
    last_error: str | None


def heartbeat_payload(who: Identity, health: Health, *, now_s: float,
                      uptime_s: float) -> bytes:
    """Published retained (QoS 1) every heartbeat period and on a status command. The
    device's wall time goes in ``sent_at`` so the consumer can estimate its clock offset
    from the arrival time."""
    fields = _base("heartbeat", "online", who)
    values = asdict(health)
    values["lines"] = [{"id": line.line_id, "active_calls": line.active_calls}
                       for line in health.lines]
    fields |= values
    fields |= {"sent_at": iso_utc(now_s), "uptime_s": int(uptime_s)}
    return _encode(fields)


def newer_status(last_session: int | None, payload: bytes) -> bool:
    """Consumer rule: accept a status message only if its session is not lower than the
    highest one seen for the device (a stale will after a newer birth is ignored)."""
    session = json.loads(payload)["session"]
    return last_session is None or int(session) >= last_session
