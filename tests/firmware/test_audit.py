from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.clock import ManualClock
from firmware.audit import (
    GENESIS_HEAD,
    GENESIS_HEX,
    AuditEntry,
    AuditOpenError,
    ChainHead,
    Checkpoint,
    canonical_entry_bytes,
    checkpoint_body,
    make_entry,
    parse_checkpoint_body,
    verify_audit,
    verify_entries,
)
from firmware.catalogue import Catalogue
from firmware.keys import load_or_create_signing_key, public_key_path

DEVICE = "dealer-0042"


def build_trail(tmp_path: Path, calls: int = 10, checkpoint_every: int = 4
                ) -> tuple[Path, Ed25519PrivateKey]:
    """A catalogue with 2 entries per call (marker-<seq> in each entry's data) and checkpoints."""
    key = load_or_create_signing_key(tmp_path / "keys" / "device.pem")
    db_path = tmp_path / "catalogue.db"
    clock = ManualClock(wall_start=1_790_000_000.25)
    with Catalogue(db_path, clock=clock, device_id=DEVICE) as cat:
        for n in range(calls):
            with cat.transaction() as txn:
                call_id = txn.insert_call(line_id="L1", direction="inbound")
                seq = cat.head().count + 1
                txn.audit("call.started", call_id, marker=f"marker-{seq:04d}", n=n)
                txn.audit("call.ended", call_id, marker=f"marker-{seq + 1:04d}", reason="hangup")
            clock.advance(61.5)
            if n % checkpoint_every == checkpoint_every - 1:
                cat.checkpoint(key)
    return db_path, key


def tamper(db_path: Path, *statements: str) -> None:
    """Edit the database as an attacker with file access would (triggers dropped first)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for trigger in ("audit_no_update", "audit_no_delete", "checkpoints_no_update",
                    "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for statement in statements:
        conn.execute(statement)
    conn.close()


def stored_hash(db_path: Path, seq: int) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0])
    finally:
        conn.close()


# --- encoding ---------------------------------------------------------------------

def test_canonical_bytes_are_sorted_compact_utf8_and_hash_chains_with_sha256() -> None:
    canonical = canonical_entry_bytes(1, 1790000000.123, True, "call.started", "c-1",
                                      {"z": 1, "name": "Zoë", "offset_s": 0.5})
    assert canonical == ('{"data":{"name":"Zoë","offset_s":0.5,"z":1},"kind":"call.started",'
                         '"seq":1,"subject":"c-1","synced":true,"wall":1790000000.123}'
                         ).encode()
    entry = make_entry(GENESIS_HEAD, 1790000000.1234, True, "call.started", "c-1",
                       {"z": 1, "name": "Zoë", "offset_s": 0.5})
    assert entry.wall == 1790000000.123
    assert entry.prev_hash == "00" * 32
    # an independent SHA-256: openssl over 32 zero bytes || canonical bytes
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=bytes(32) + canonical,
                            capture_output=True, check=True).stdout.split()[0].decode()
    assert entry.hash == digest
    second = make_entry(ChainHead(1, entry.hash), 1790000001.0, False, "call.ended", "c-1", {})
    assert second.seq == 2 and second.prev_hash == entry.hash
    assert second.hash == hashlib.sha256(bytes.fromhex(entry.hash)
                                         + second.canonical_bytes()).hexdigest()


def test_checkpoint_body_format_round_trips() -> None:
    head = "ab" * 32
    body = checkpoint_body(DEVICE, 40, head, 1790000000)
    assert body == (f"edge-recorder/audit/{DEVICE}\n40\n"
                    f"{base64.b64encode(bytes.fromhex(head)).decode()}\n1790000000\n")
    parsed = parse_checkpoint_body(body)
    assert (parsed.device_id, parsed.count, parsed.head_hash, parsed.time) == (
        DEVICE, 40, head, 1790000000)


# --- checkpoints ------------------------------------------------------------------

def test_checkpoint_is_skipped_when_nothing_new(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.pem")
    with Catalogue(tmp_path / "c.db", clock=ManualClock(), device_id=DEVICE) as cat:
        assert cat.checkpoint(key) is None  # empty trail
        with cat.transaction() as txn:
            txn.audit("device.started", DEVICE)
        first = cat.checkpoint(key)
        assert first is not None and first.count == 1
        assert cat.checkpoint(key) is None
        assert [e.kind for e in cat.audit_entries()] == ["device.started", "checkpoint"]
        with cat.transaction() as txn:
            txn.audit("device.stopped", DEVICE)
        second = cat.checkpoint(key)
        assert second is not None and second.count == 3
        assert cat.latest_checkpoint() == second
        assert [c.count for c in cat.checkpoints()] == [1, 3]


def test_openssl_verifies_a_checkpoint_signature_with_the_pub_file(tmp_path: Path) -> None:
    db_path, _ = build_trail(tmp_path, calls=4)
    with Catalogue(db_path, clock=ManualClock(), device_id=DEVICE) as cat:
        cp = cat.latest_checkpoint()
    assert cp is not None
    (tmp_path / "body").write_text(cp.body)
    (tmp_path / "sig").write_bytes(base64.b64decode(cp.signature))
    result = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey",
         str(public_key_path(tmp_path / "keys" / "device.pem")), "-rawin",
         "-in", str(tmp_path / "body"), "-sigfile", str(tmp_path / "sig")],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Signature Verified Successfully" in result.stdout


# --- verification of a database -----------------------------------------------------

def test_verify_accepts_an_untouched_trail_and_does_not_modify_it(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    before = db_path.read_bytes()
    report = verify_audit(db_path, key.public_key(), device_id=DEVICE)
    assert report.ok, report.message
    assert report.first_bad_seq is None
    assert report.entries == 20 + 2  # 10 calls x 2 entries + 2 checkpoint entries
    assert report.checkpoints == 2
    assert report.signed_count == 17  # second checkpoint after 8 calls and 1 checkpoint entry
    assert report.head.count == 22
    assert report.warnings == ()
    assert db_path.read_bytes() == before


def test_one_changed_byte_in_one_row_is_named(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "UPDATE audit SET data = replace(data, 'marker-0017', 'marker-0018') "
                    "WHERE seq = 17")
    report = verify_audit(db_path, key.public_key(), device_id=DEVICE)
    assert not report.ok
    assert report.first_bad_seq == 17
    assert report.message == "entry 17: hash mismatch (data changed?)"


def test_one_flipped_byte_in_the_file_is_named(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)  # closed: the WAL is folded into the file
    raw = bytearray(db_path.read_bytes())
    where = raw.find(b"marker-0011")
    assert where > 0 and raw.count(b"marker-0011") == 1
    raw[where + len("marker-001")] = ord("2")
    db_path.write_bytes(bytes(raw))
    report = verify_audit(db_path, key.public_key(), device_id=DEVICE)
    assert (report.ok, report.first_bad_seq) == (False, 11)
    assert report.message.startswith("entry 11: hash mismatch")


def test_changed_wall_time_or_kind_is_named(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "UPDATE audit SET wall = wall + 3600 WHERE seq = 5")
    assert verify_audit(db_path, key.public_key()).first_bad_seq == 5
    db_path, key = build_trail(tmp_path / "b")
    tamper(db_path, "UPDATE audit SET kind = 'call.answered' WHERE seq = 3")
    assert verify_audit(db_path, key.public_key()).first_bad_seq == 3


def test_non_canonical_data_is_named(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "UPDATE audit SET data = replace(data, ',', ', ') WHERE seq = 4")
    report = verify_audit(db_path, key.public_key())
    assert (report.first_bad_seq, report.message) == (
        4, "entry 4: data is not in canonical form (edited?)")


def test_deleted_middle_row_is_named(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "DELETE FROM audit WHERE seq = 12")
    report = verify_audit(db_path, key.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 12)
    assert report.message.startswith("entry 12: missing")


def test_deleted_tail_after_a_checkpoint_is_detected(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "DELETE FROM audit WHERE seq >= 15")
    report = verify_audit(db_path, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 15
    assert "checkpoint 17: covers 17 entries but the trail ends at entry 14" in report.message


def test_rewritten_chain_is_caught_by_the_checkpoint(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    conn = sqlite3.connect(db_path)
    rows = [AuditEntry(s, w, bool(y), k, j, d, p, h) for s, w, y, k, j, d, p, h in conn.execute(
        "SELECT seq, wall, wall_synced, kind, subject, data, prev_hash, hash FROM audit "
        "ORDER BY seq")]
    conn.close()
    # The attacker edits entry 12 and recomputes every hash after it (no key needed)...
    head = ChainHead(11, rows[10].hash)
    statements = ["DELETE FROM audit WHERE seq >= 12"]
    for row in rows[11:]:
        data = json.loads(row.data_json)
        if row.seq == 12:
            data["reason"] = "customer agreed"
        entry = make_entry(head, row.wall, row.synced, row.kind, row.subject, data)
        head = ChainHead(entry.seq, entry.hash)
        statements.append(
            f"INSERT INTO audit VALUES ({entry.seq}, {entry.wall!r}, {int(entry.synced)}, "
            f"'{entry.kind}', '{entry.subject}', '{entry.data_json}', '{entry.prev_hash}', "
            f"'{entry.hash}')")
    tamper(db_path, *statements)
    report = verify_audit(db_path, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 9  # after checkpoint 8, the last one that still matches
    assert report.message.startswith("checkpoint 17: head does not match entries 1..17")


def test_bad_checkpoint_signature_is_detected(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    forged = base64.b64encode(bytes(64)).decode()
    tamper(db_path, f"UPDATE checkpoints SET signature = '{forged}' WHERE count = 8")
    report = verify_audit(db_path, key.public_key())
    assert not report.ok
    assert report.message.startswith("checkpoint 8: bad signature")


def test_checkpoint_row_that_disagrees_with_its_body_is_detected(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "UPDATE checkpoints SET count = 30 WHERE count = 17")
    report = verify_audit(db_path, key.public_key())
    assert not report.ok
    assert "checkpoint 30: stored fields differ from its signed body" in report.problems


def test_wrong_public_key_is_detected_and_key_lists_work(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    stranger = Ed25519PrivateKey.generate().public_key()
    report = verify_audit(db_path, stranger)
    assert not report.ok
    assert "signed by unknown key" in report.message
    assert verify_audit(db_path, [stranger, key.public_key()]).ok


def test_wrong_device_id_is_detected(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    report = verify_audit(db_path, key.public_key(), device_id="dealer-9999")
    assert not report.ok
    assert "signed for device 'dealer-0042', not 'dealer-9999'" in report.message


def test_deleted_checkpoint_row_is_detected_by_its_entry(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    tamper(db_path, "DELETE FROM checkpoints WHERE count = 8")
    report = verify_audit(db_path, key.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 9)
    assert report.message == "entry 9: records checkpoint 8, which is not stored " \
                             "(checkpoint deleted?)"


def test_triggers_block_update_and_delete(tmp_path: Path) -> None:
    db_path, _ = build_trail(tmp_path, calls=4)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for statement in ("UPDATE audit SET data = '{}' WHERE seq = 1",
                          "DELETE FROM audit WHERE seq = 8",
                          "UPDATE checkpoints SET wall = 0",
                          "DELETE FROM checkpoints",
                          "INSERT INTO audit VALUES (99, 0, 0, 'x', 'y', '{}', "
                          f"'{GENESIS_HEX}', '{GENESIS_HEX}')"):
            with pytest.raises(sqlite3.IntegrityError, match=r"append-only|extend the chain"):
                conn.execute(statement)
    finally:
        conn.close()


def test_missing_triggers_are_reported_as_a_warning(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path, calls=4)
    tamper(db_path)
    report = verify_audit(db_path, key.public_key())
    assert report.ok
    assert report.warnings == ("append-only triggers missing: audit_no_delete, audit_no_update, "
                               "checkpoints_no_delete, checkpoints_no_update",)


def test_missing_database_is_an_open_error(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(AuditOpenError, match=r"none\.db: no such database"):
        verify_audit(tmp_path / "none.db", key)


# --- verification off the device (upload batches) ----------------------------------

def test_batches_verify_off_device_from_exported_dicts(tmp_path: Path) -> None:
    db_path, key = build_trail(tmp_path)
    with Catalogue(db_path, clock=ManualClock(), device_id=DEVICE) as cat:
        first = cat.audit_entries(limit=9)
        rest = cat.audit_entries(after_seq=9)
        checkpoints = cat.checkpoints()
    # what an upload would carry, through JSON
    wire = json.dumps({"entries": [e.to_dict() for e in rest],
                       "checkpoints": [c.to_dict() for c in checkpoints if c.count >= 9]})
    batch = json.loads(wire)
    entries = [AuditEntry.from_dict(raw) for raw in batch["entries"]]
    cps = [Checkpoint.from_dict(raw) for raw in batch["checkpoints"]]
    start = ChainHead(first[-1].seq, first[-1].hash)
    report = verify_entries(entries, cps, key.public_key(), device_id=DEVICE, start=start)
    assert report.ok, report.message
    assert (report.entries, report.signed_count) == (22, 17)
    # the same batch does not continue a different head
    wrong = verify_entries(entries, cps, key.public_key(), start=ChainHead(9, "11" * 32))
    assert (wrong.ok, wrong.first_bad_seq) == (False, 10)


# --- recording files ----------------------------------------------------------------

def test_check_files_compares_recordings_with_their_audited_sha256(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.pem")
    db_path = tmp_path / "catalogue.db"
    files = {name: tmp_path / f"{name}.rec" for name in ("a", "b", "c")}
    ids = {}
    with Catalogue(db_path, clock=ManualClock(), device_id=DEVICE) as cat:
        for name, path in files.items():
            path.write_bytes(f"ciphertext {name}".encode())
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            with cat.transaction() as txn:
                call_id = txn.insert_call(line_id="L1")
                ids[name] = txn.insert_recording(call_id=call_id, path=str(path), codec="alaw",
                                                 state="complete", sha256=digest)
                txn.audit("recording.closed", ids[name], sha256=digest)
        cat.checkpoint(key)
    good = verify_audit(db_path, key.public_key(), check_files=True)
    assert good.ok and good.files_checked == 3, good.message
    files["b"].write_bytes(b"ciphertext B")
    files["c"].unlink()
    report = verify_audit(db_path, key.public_key(), check_files=True)
    assert not report.ok
    assert report.message == (f"recording {ids['b']}: file {files['b']} does not match its "
                              f"audited sha256 (audited in entry 2)")
    assert f"recording {ids['c']}: file {files['c']} is missing (audited in entry 3)" \
        in report.problems
    assert verify_audit(db_path, key.public_key()).ok  # files are checked only on request
