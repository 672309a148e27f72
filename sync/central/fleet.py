"""The fleet monitor: one row per device from the catalogue's fleet status, with alerts.

Ingest workers keep the newest status per device (birth, heartbeat, will; the session
rule applied) in ``fleet_status``; this reads it. :func:`rows` and :func:`device_alerts`
are pure (status, time and thresholds in, rows out). A device whose last status is older
than ``missed_heartbeats`` heartbeat periods is offline even if no will came (a broker
that died with it, a will lost).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sync.central.catalogue import Catalogue, StatusRow
from sync.central.config import Fleet

ROW_KEYS = ("device", "state", "since", "backlog_count", "oldest_unsynced_age_s",
            "disk_free_bytes", "last_call_at", "cert_expiry_days", "clock_synced",
            "stored_alerts", "alerts")
MB = 1_000_000


def device_alerts(row: StatusRow, now_s: float, limits: Fleet) -> list[str]:
    """The threshold alerts of one device, short names with the value."""
    status, found = row.status, []
    age_s = now_s - _unix(row.received_at)
    if row.state == "online" and age_s > limits.missed_heartbeats * limits.heartbeat_s:
        found.append(f"silent {age_s / 60:.0f} min")
    backlog = status.get("backlog_count")
    if isinstance(backlog, int) and backlog > limits.backlog_count:
        found.append(f"backlog {backlog}")
    oldest_s = status.get("oldest_unsynced_age_s")
    if isinstance(oldest_s, int | float) and oldest_s > limits.oldest_unsynced_hours * 3600:
        found.append(f"oldest unsynced {oldest_s / 3600:.1f} h")
    disk = status.get("disk_free_bytes")
    if isinstance(disk, int) and disk < limits.disk_free_mb * MB:
        found.append(f"disk free {disk / MB:.0f} MB")
    cert = status.get("cert_expiry_days")
    if isinstance(cert, int | float) and cert < limits.cert_expiry_days:
        found.append(f"certificate expires in {cert} d")
    if limits.clock_unsynced and status.get("clock_synced") is False:
        found.append("clock unsynced")
    return found


def state(row: StatusRow, now_s: float, limits: Fleet) -> tuple[str, str]:
    """(online/offline, since): silent past the limit counts as offline since the last
    status received."""
    age_s = now_s - _unix(row.received_at)
    if row.state == "online" and age_s > limits.missed_heartbeats * limits.heartbeat_s:
        return "offline", row.received_at
    return row.state, row.since


def rows(statuses: Sequence[StatusRow], alert_counts: dict[str, int], *,
         now_s: float | None = None, limits: Fleet | None = None) -> list[dict[str, Any]]:
    """The monitor's rows, sorted by device id."""
    now_s = time.time() if now_s is None else now_s
    limits = limits or Fleet()
    return [_row(row, alert_counts.get(row.device_id, 0), now_s, limits)
            for row in sorted(statuses, key=lambda r: r.device_id)]


def _row(row: StatusRow, stored_alerts: int, now_s: float, limits: Fleet) -> dict[str, Any]:
    status = row.status
    current, since = state(row, now_s, limits)
    out: dict[str, Any] = {"device": row.device_id, "state": current, "since": since}
    out |= {key: status.get(key) for key in ROW_KEYS[3:9]}
    out |= {"stored_alerts": stored_alerts, "alerts": device_alerts(row, now_s, limits)}
    return out


def snapshot(catalogue: Catalogue, *, now_s: float | None = None,
             limits: Fleet | None = None) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for alert in catalogue.alerts():
        counts[alert["device_id"]] = counts.get(alert["device_id"], 0) + 1
    return rows(catalogue.statuses(), counts, now_s=now_s, limits=limits)


def render_json(table: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(table), indent=2)


def render_table(table: Sequence[dict[str, Any]]) -> Any:
    """A rich Table of the rows; rows with alerts or offline are highlighted."""
    from rich.table import Table

    out = Table(title=f"edge-recorder fleet ({len(table)} devices, "
                f"{sum(1 for r in table if r['state'] != 'online')} offline, "
                f"{sum(1 for r in table if r['alerts'])} with alerts)")
    for key in ROW_KEYS:
        out.add_column(key.replace("_", " "))
    for row in table:
        style = "red" if row["alerts"] or row["state"] != "online" else None
        out.add_row(*(_cell(row[k]) for k in ROW_KEYS), style=style)
    return out


def watch(read: Callable[[], list[dict[str, Any]]], interval_s: float,
          stop: Callable[[float], bool]) -> None:
    """Refresh a rich Live table every ``interval_s`` until ``stop(interval_s)`` is true."""
    from rich.live import Live

    with Live(render_table(read()), auto_refresh=False) as live:
        while not stop(interval_s):
            live.update(render_table(read()), refresh=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def _unix(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
