"""Retention: due recordings go only once the central store confirmed them, on a synced clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from drivers.clock import ManualClock
from firmware.catalogue import MIGRATIONS, Catalogue
from firmware.recorder import iso_utc
from firmware.retention import apply_retention

DAY_S = 86_400.0


def add_recording(cat: Catalogue, tmp: Path, name: str, retention_days: float,
                  synced: bool, clock: ManualClock) -> tuple[str, Path]:
    path = tmp / f"{name}.rec"
    path.write_bytes(b"ciphertext")
    with cat.transaction() as tx:
        call_id = tx.insert_call(line_id="L1", direction="inbound", state="ended",
                                 started_at=iso_utc(clock.wall()), started_wall=clock.wall(),
                                 wall_synced=1)
        rec_id = tx.insert_recording(
            call_id=call_id, line_id="L1", path=str(path), codec="alaw", sample_rate=8000,
            state="complete", sha256="ab" * 32, created_at=iso_utc(clock.wall()),
            retention_until=iso_utc(clock.wall() + retention_days * DAY_S),
            synced_at=iso_utc(clock.wall()) if synced else None)
    return rec_id, path


def test_only_confirmed_recordings_past_their_date_are_deleted(tmp_path: Path) -> None:
    clock = ManualClock()
    cat = Catalogue(tmp_path / "c.db", clock=clock, device_id="d1")
    due_synced = add_recording(cat, tmp_path, "a", 30, True, clock)
    due_unsynced = add_recording(cat, tmp_path, "b", 30, False, clock)
    not_due = add_recording(cat, tmp_path, "c", 90, True, clock)
    clock.advance(31 * DAY_S)
    report = apply_retention(cat, clock)
    assert report.deleted == [due_synced[0]]
    assert report.waiting_for_sync == [due_unsynced[0]]
    assert not due_synced[1].exists() and due_unsynced[1].exists() and not_due[1].exists()
    row = cat.get_recording(due_synced[0])
    assert row is not None and row["deleted_at"] and row["erase_reason"] == "retention"
    (entry,) = [e for e in cat.audit_entries() if e.kind == "recording.deleted"]
    assert entry.subject == due_synced[0]
    assert apply_retention(cat, clock).deleted == []  # idempotent


def test_nothing_is_deleted_on_an_unsynchronised_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    cat = Catalogue(tmp_path / "c.db", clock=clock, device_id="d1")
    _, path = add_recording(cat, tmp_path, "a", 1, True, clock)
    clock.advance(400 * DAY_S)
    clock.synced = False
    report = apply_retention(cat, clock)
    assert report.deleted == [] and report.skipped_reason
    assert path.exists()


def test_migration_2_keeps_the_outbox_and_allows_erasure_requests(tmp_path: Path) -> None:
    db_path = tmp_path / "c.db"
    Catalogue(db_path, clock=ManualClock(), device_id="d1", migrations=MIGRATIONS[:1]).close()
    db = sqlite_utils.Database(db_path)
    db["outbox"].insert({"kind": "recording", "ref": "r1", "created_at": "2026-01-01",
                         "state": "pending", "attempts": 2})
    db.close()
    cat = Catalogue(db_path, clock=ManualClock(), device_id="d1")
    (item,) = cat.outbox_pending()
    assert (item["kind"], item["ref"], item["attempts"]) == ("recording", "r1", 2)
    with cat.transaction() as tx:
        assert tx.enqueue("erasure", "r1") is not None
    conn = sqlite3.connect(db_path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(recordings)")}
    finally:
        conn.close()
    assert "erase_reason" in columns
