"""Retention: delete recordings whose retention date has passed, once the central store
holds them.

A recording carries its ``retention_until`` from the policy decision. The device deletes
it only when that date has passed on a synchronised clock *and* the central store has
confirmed it durably stored (``synced_at``, set by the sync agent on the store's "stored"
answer, never on a broker acknowledgement). Anything else waits. Each deletion is audited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from drivers.clock import Clock
from firmware.catalogue import Catalogue
from firmware.recorder import iso_utc

log = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    deleted: list[str] = field(default_factory=list)
    waiting_for_sync: list[str] = field(default_factory=list)
    skipped_reason: str | None = None


def apply_retention(catalogue: Catalogue, clock: Clock) -> RetentionReport:
    """Delete what is due; report what is due but not yet confirmed by the central store."""
    report = RetentionReport()
    if not clock.wall_synced():
        report.skipped_reason = "wall clock not synchronised"
        return report
    now = iso_utc(clock.wall())
    for row in catalogue.expired_recordings(now):
        if not row["synced_at"]:
            report.waiting_for_sync.append(row["id"])
            continue
        path = Path(row["path"])
        path.unlink(missing_ok=True)
        with catalogue.transaction() as tx:
            tx.update_recording(row["id"], deleted_at=now, erase_reason="retention")
            tx.audit("recording.deleted", row["id"], call_id=row["call_id"], reason="retention",
                     retention_until=row["retention_until"], synced_at=row["synced_at"],
                     sha256=row["sha256"])
        report.deleted.append(row["id"])
        log.info("recording %s: deleted (retention until %s)", row["id"],
                 row["retention_until"])
    if report.waiting_for_sync:
        log.warning("%d recording(s) past retention kept: not yet confirmed by the central "
                    "store", len(report.waiting_for_sync))
    return report
