"""Search the central catalogue by number, time and device.

Devices send the numbers of a call in the signed manifest (``numbers``, see
docs/CENTRAL.md "Search"): in clear where the policy's ``audit_numbers`` is "clear",
otherwise as the audit trail's HMAC commitments with the call's salt. A clear number
matches by substring; a committed one only when the number asked for is exactly the one
the device learnt (``HMAC(salt, number)`` equal). The catalogue narrows by device and
time first; commitments are then tested row by row.
"""

from __future__ import annotations

import hmac
from typing import Any

from firmware.recorder import commitment
from sync.central.catalogue import Catalogue, StoredRecording

NUMBER_ROLES = ("caller", "dialed")


def search(catalogue: Catalogue, *, number: str | None = None, device_id: str | None = None,
           start: str | None = None, end: str | None = None) -> list[StoredRecording]:
    """Recordings started in ``[start, end)`` (ISO UTC), of ``device_id``, with ``number``."""
    rows = catalogue.search(device_id=device_id, start=start, end=end)
    if not number:
        return rows
    return [row for row in rows if matches_number(row.manifest, number)]


def matches_number(manifest: dict[str, Any], number: str) -> bool:
    """Whether the manifest's call involved ``number`` (clear or committed)."""
    legacy = [manifest.get(k) for k in ("remote_number", "local_number", "number")]
    if any(isinstance(v, str) and number in v for v in legacy):
        return True
    numbers = manifest.get("numbers")
    if not isinstance(numbers, dict):
        return False
    if numbers.get("audit_numbers") == "clear":
        return any(isinstance(numbers.get(r), str) and number in numbers[r]
                   for r in NUMBER_ROLES)
    return _committed(numbers, number)


def _committed(numbers: dict[str, Any], number: str) -> bool:
    salt = numbers.get("salt")
    if not isinstance(salt, str):
        return False
    try:
        digest = commitment(salt, number)
    except ValueError:
        return False
    if digest is None:
        return False
    return any(isinstance(numbers.get(r), str) and hmac.compare_digest(numbers[r], digest)
               for r in NUMBER_ROLES)


def row_summary(row: StoredRecording) -> dict[str, Any]:
    """One search hit for output (numbers only where the device sent them in clear)."""
    numbers = row.manifest.get("numbers") if isinstance(row.manifest.get("numbers"), dict) \
        else {}
    clear = numbers.get("audit_numbers") == "clear"
    return {"recording_id": row.recording_id, "device_id": row.device_id,
            "line_id": row.manifest.get("line_id"), "direction": row.manifest.get("direction"),
            "started_at": row.started_at, "audio_s": row.manifest.get("audio_s"),
            "caller": numbers.get("caller") if clear else None,
            "dialed": numbers.get("dialed") if clear else None,
            "size": row.size, "retention_until": row.retention_until}
