"""The fleet monitor: one row per device from the catalogue's fleet status.

Ingest workers keep the newest status per device (birth, heartbeat, will; the session
rule applied) in ``fleet_status``; this reads it. ``rows`` is pure (status in, row out).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sync.central.catalogue import Catalogue, StatusRow

ROW_KEYS = ("device", "state", "since", "backlog_count", "oldest_unsynced_age_s",
            "disk_free_bytes", "last_call_at", "cert_expiry_days", "clock_synced", "alerts")


def rows(statuses: Sequence[StatusRow], alert_counts: dict[str, int]) -> list[dict[str, Any]]:
    """The monitor's rows, sorted by device id."""
    out = []
    for row in sorted(statuses, key=lambda r: r.device_id):
        status = row.status
        out.append({"device": row.device_id, "state": row.state, "since": row.since,
                    "backlog_count": status.get("backlog_count"),
                    "oldest_unsynced_age_s": status.get("oldest_unsynced_age_s"),
                    "disk_free_bytes": status.get("disk_free_bytes"),
                    "last_call_at": status.get("last_call_at"),
                    "cert_expiry_days": status.get("cert_expiry_days"),
                    "clock_synced": status.get("clock_synced"),
                    "alerts": alert_counts.get(row.device_id, 0)})
    return out


def snapshot(catalogue: Catalogue) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for alert in catalogue.alerts():
        counts[alert["device_id"]] = counts.get(alert["device_id"], 0) + 1
    return rows(catalogue.statuses(), counts)


def render_json(table: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(table), indent=2)


def render_table(table: Sequence[dict[str, Any]]) -> Any:
    """A rich Table of the rows."""
    from rich.table import Table

    out = Table(title="edge-recorder fleet")
    for key in ROW_KEYS:
        out.add_column(key.replace("_", " "))
    for row in table:
        out.add_row(*("" if row[k] is None else str(row[k]) for k in ROW_KEYS))
    return out
