"""Retention and erasure at the centre: the object goes, an audited tombstone stays.

A tombstone (catalogue ``tombstones``) keeps the recording id, device, sha256, size, the
cause (``retention`` or ``erasure``), the reason and when: enough to answer "what was
erased, why, when" without the audio. An upload of a tombstoned id is answered
``stored`` and not taken again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sync.central.ingest import CentralStore

log = logging.getLogger(__name__)


def erase(store: CentralStore, device: str, rid: str, *, cause: str, reason: str,
          requested_at: str | None) -> None:
    """Delete ``rid``'s object and row, leave its tombstone (idempotent)."""
    row = store.catalogue.get_recording(rid)
    store.objects.delete(device, rid)
    now = store._now()
    if row is not None and row.device_id == device:
        store.catalogue.erase(row, cause=cause, reason=reason, requested_at=requested_at,
                              erased_at=now)
    else:
        store.catalogue.add_tombstone(device, rid, cause=cause, reason=reason,
                                      requested_at=requested_at, erased_at=now)
    log.info("%s: recording %s erased (%s: %s)", device, rid, cause, reason)


def apply_retention(store: CentralStore) -> list[str]:
    """Erase every recording whose retention date has passed; their ids."""
    done = []
    for row in store.catalogue.expired(store._now()):
        erase(store, row.device_id, row.recording_id, cause="retention",
              reason=f"retention until {row.retention_until}", requested_at=None)
        done.append(row.recording_id)
    return done
