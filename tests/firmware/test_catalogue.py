from __future__ import annotations

import sqlite3
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import sqlite_utils

from drivers.clock import ManualClock
from firmware.audit import GENESIS_HEAD, verify_entries
from firmware.catalogue import (
    MIGRATIONS,
    Catalogue,
    CatalogueError,
    NotFound,
    ReadOnlyError,
    SchemaError,
    iso_utc_ms,
)
from firmware.keys import load_or_create_signing_key

DEVICE = "dealer-0042"


def open_catalogue(tmp_path: Path, clock: ManualClock | None = None, **kwargs: object
                   ) -> Catalogue:
    return Catalogue(tmp_path / "catalogue.db", clock=clock or ManualClock(),
                     device_id=DEVICE, **kwargs)  # type: ignore[arg-type]


def add_call(cat: Catalogue, line: str = "L1", **fields: object) -> str:
    with cat.transaction() as txn:
        call_id = txn.insert_call(line_id=line, direction="inbound", **fields)
        txn.audit("call.started", call_id, line=line)
    return call_id


def test_new_database_is_migrated_with_wal_and_full_sync(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        settings = cat.settings()
    assert settings["journal_mode"] == "wal"
    assert settings["synchronous"] == 2  # FULL
    assert settings["foreign_keys"] == 1
    assert settings["busy_timeout"] > 0
    assert settings["user_version"] == len(MIGRATIONS)
    out = subprocess.run(["sqlite3", str(tmp_path / "catalogue.db"), "PRAGMA journal_mode;",
                          "PRAGMA integrity_check;"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["wal", "ok"]


def test_reopen_keeps_rows_and_does_not_migrate_again(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        call_id = add_call(cat)
    with open_catalogue(tmp_path) as cat:
        assert cat.get_call(call_id)["line_id"] == "L1"  # type: ignore[index]
        assert cat.head().count == 1
        assert cat.settings()["user_version"] == len(MIGRATIONS)


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    open_catalogue(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "catalogue.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(SchemaError, match=r"catalogue\.db: schema version 99 is newer"):
        open_catalogue(tmp_path)


def test_a_later_migration_upgrades_an_existing_database(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        call_id = add_call(cat)

    def add_note_column(db: sqlite_utils.Database) -> None:
        db.execute("ALTER TABLE calls ADD COLUMN note TEXT")

    later = len(MIGRATIONS) + 1
    with open_catalogue(tmp_path, migrations=(*MIGRATIONS, (later, add_note_column))) as cat:
        assert cat.settings()["user_version"] == later
        with cat.transaction() as txn:
            txn.update_call(call_id, note="hello")
        assert cat.get_call(call_id)["note"] == "hello"  # type: ignore[index]


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    open_catalogue(tmp_path).close()

    def broken(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE half_done (x)")
        db.execute("THIS IS NOT SQL")

    later = len(MIGRATIONS) + 1
    with pytest.raises(SchemaError, match=f"migration to schema version {later} failed"):
        open_catalogue(tmp_path, migrations=(*MIGRATIONS, (later, broken)))
    with open_catalogue(tmp_path) as cat:
        assert cat.settings()["user_version"] == len(MIGRATIONS)
    tables = sqlite_utils.Database(tmp_path / "catalogue.db").table_names()
    assert "half_done" not in tables


def test_misnumbered_migrations_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"numbered 1\.\.n"):
        open_catalogue(tmp_path, migrations=((2, MIGRATIONS[0][1]),))


def test_database_of_another_device_is_refused(tmp_path: Path) -> None:
    open_catalogue(tmp_path).close()
    with pytest.raises(CatalogueError, match="belongs to device 'dealer-0042'"):
        Catalogue(tmp_path / "catalogue.db", clock=ManualClock(), device_id="other")


def test_a_transaction_that_raises_leaves_neither_change_nor_audit(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with pytest.raises(RuntimeError), cat.transaction() as txn:
            call_id = txn.insert_call(line_id="L1")
            txn.audit("call.started", call_id)
            raise RuntimeError("power cut simulation")
        assert cat.get_call(call_id) is None
        assert cat.head() == GENESIS_HEAD
        assert cat.audit_entries() == []
        # the next entry still gets seq 1
        add_call(cat)
        assert [e.seq for e in cat.audit_entries()] == [1]


def test_unknown_column_is_named_and_rolls_back(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with pytest.raises(CatalogueError, match=r"calls has no column.*colour"), \
                cat.transaction() as txn:
            txn.audit("call.started", "x")
            txn.insert_call(line_id="L1", colour="red")
        assert cat.head().count == 0


def test_constraint_violation_is_a_catalogue_error(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with pytest.raises(CatalogueError, match="recordings"), cat.transaction() as txn:
            txn.insert_recording(call_id="no-such-call", line_id="L1", path="x", codec="alaw")
        with pytest.raises(CatalogueError, match="CHECK"), cat.transaction() as txn:
            txn.insert_call(line_id="L1", direction="sideways")


def test_calls_and_recordings_round_trip(tmp_path: Path) -> None:
    clock = ManualClock(wall_start=1_790_000_000.0)
    with open_catalogue(tmp_path, clock) as cat:
        call_id = add_call(cat, caller_number="+4930123", caller_name="Autohaus",
                           decision='{"record":true}')
        assert uuid.UUID(call_id).version == 7
        with cat.transaction() as txn:
            rec_id = txn.insert_recording(call_id=call_id, path="/r/a.rec", codec="alaw")
            txn.update_call(call_id, answered_offset_s=3.5)
        with cat.transaction() as txn:
            txn.update_recording(rec_id, state="complete", size=1234, sha256="ab" * 32)
        call = cat.get_call(call_id)
        rec = cat.get_recording(rec_id)
    assert call is not None and rec is not None
    assert call["started_at"] == "2026-09-21T14:13:20.000Z"
    assert call["started_wall"] == 1_790_000_000.0
    assert call["wall_synced"] == 1
    assert call["state"] == "active"
    assert call["answered_offset_s"] == 3.5
    assert call["decision"] == '{"record":true}'
    assert rec["line_id"] == "L1"  # taken from the call
    assert (rec["state"], rec["size"], rec["sample_rate"]) == ("complete", 1234, 8000)


def test_update_of_a_missing_row_raises_not_found(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat, pytest.raises(NotFound, match="no row nope"), \
            cat.transaction() as txn:
        txn.update_call("nope", state="ended")


def test_recordings_newest_first_with_call_fields_and_filters(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_catalogue(tmp_path, clock) as cat:
        ids = []
        for n in range(3):
            call_id = add_call(cat, line=f"L{n}", caller_number=f"10{n}")
            with cat.transaction() as txn:
                ids.append(txn.insert_recording(call_id=call_id, path=f"{n}.rec", codec="alaw"))
            clock.advance(1.0)
        with cat.transaction() as txn:
            txn.update_recording(ids[1], state="complete")
        rows = cat.recordings()
        assert [r["id"] for r in rows] == ids[::-1]
        assert [r["caller_number"] for r in rows] == ["102", "101", "100"]
        assert rows[0]["direction"] == "inbound"
        assert rows[0]["call_state"] == "active"
        assert [r["id"] for r in cat.recordings(state="complete")] == [ids[1]]
        assert [r["id"] for r in cat.recordings(limit=1)] == [ids[2]]
        assert {r["id"] for r in cat.open_recordings()} == {ids[0], ids[2]}
        assert len(cat.active_calls()) == 3


def test_outbox_enqueue_is_unique_and_tracks_attempts(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            first = txn.enqueue("recording", "rec-1")
            again = txn.enqueue("recording", "rec-1")
            other = txn.enqueue("audit", "1-40")
        assert first is not None and other is not None and again is None
        with cat.transaction() as txn:
            txn.update_outbox(first, state="pending", error="broker unreachable")
            txn.update_outbox(other, state="stored")
        pending = cat.outbox_pending()
        assert [(p["ref"], p["attempts"], p["last_error"]) for p in pending] == [
            ("rec-1", 1, "broker unreachable")]
        with pytest.raises(CatalogueError, match="outbox kind 'email'"), \
                cat.transaction() as txn:
            txn.enqueue("email", "x")


def test_txn_is_unusable_after_its_block(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            pass
        with pytest.raises(CatalogueError, match="transaction already ended"):
            txn.audit("call.started", "x")
        assert cat.head().count == 0


def test_checkpoint_kind_is_reserved(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat, \
            pytest.raises(CatalogueError, match=r"only by Catalogue\.checkpoint"), \
            cat.transaction() as txn:
        txn.audit("checkpoint", DEVICE)


def test_audit_data_must_be_plain_json(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with pytest.raises(CatalogueError, match=r"call\.started x: data is not plain JSON"), \
                cat.transaction() as txn:
            txn.audit("call.started", "x", when=object())
        with pytest.raises(CatalogueError, match="kind 'Call Started'"), \
                cat.transaction() as txn:
            txn.audit("Call Started", "x")


def test_nested_transaction_is_a_savepoint(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as outer:
            kept = outer.insert_call(line_id="L1")
            outer.audit("call.started", kept)
            with pytest.raises(ValueError), cat.transaction() as inner:
                dropped = inner.insert_call(line_id="L2")
                inner.audit("call.started", dropped)
                raise ValueError("inner fails")
            outer.audit("call.answered", kept)
        assert cat.get_call(kept) is not None
        assert cat.get_call(dropped) is None
        assert [e.kind for e in cat.audit_entries()] == ["call.started", "call.answered"]


def test_four_threads_write_a_contiguous_verifiable_chain(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.pem")
    per_thread = 25
    errors: list[BaseException] = []
    with open_catalogue(tmp_path) as cat:
        def worker(line: str) -> None:
            try:
                for _ in range(per_thread):
                    call_id = add_call(cat, line=line)
                    with cat.transaction() as txn:
                        txn.update_call(call_id, state="ended", end_reason="hangup")
                        txn.audit("call.ended", call_id, line=line)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(f"L{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        checkpoints = [cat.checkpoint(key)]
        for thread in threads:
            thread.join()
        checkpoints.append(cat.checkpoint(key))
        entries = cat.audit_entries()
        stored = cat.checkpoints()
        calls = cat.active_calls()
    assert errors == []
    assert calls == []
    audited = [e for e in entries if e.kind != "checkpoint"]
    assert len(audited) == 4 * per_thread * 2
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    report = verify_entries(entries, stored, key.public_key(), device_id=DEVICE)
    assert report.ok, report.message
    assert report.signed_count == stored[-1].count
    assert len(stored) == len([c for c in checkpoints if c is not None])


def test_read_only_catalogue_lists_and_refuses_writes(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        call_id = add_call(cat)
        with cat.transaction() as txn:
            txn.insert_recording(call_id=call_id, path="a.rec", codec="alaw")
    before = (tmp_path / "catalogue.db").read_bytes()
    reader = Catalogue.read_only(tmp_path / "catalogue.db")
    try:
        assert reader.device_id == DEVICE
        assert len(reader.recordings()) == 1
        with pytest.raises(ReadOnlyError, match="read-only"), reader.transaction():
            pass
    finally:
        reader.close()
    assert (tmp_path / "catalogue.db").read_bytes() == before


def test_read_only_of_a_missing_database_names_it(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"nothing\.db: no such database"):
        Catalogue.read_only(tmp_path / "nothing.db")


def test_closed_catalogue_refuses_use_and_close_is_idempotent(tmp_path: Path) -> None:
    cat = open_catalogue(tmp_path)
    cat.close()
    cat.close()
    with pytest.raises(ReadOnlyError, match="closed"):
        cat.head()


def test_iso_utc_ms() -> None:
    assert iso_utc_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc_ms(1_790_000_000.1234) == "2026-09-21T14:13:20.123Z"
