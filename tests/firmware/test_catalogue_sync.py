"""The catalogue's interface to the sync agent: outbox items by reference, requeueing what
was sent, and central's audit receipts."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.clock import ManualClock
from firmware.catalogue import Catalogue, CatalogueError

DEVICE = "dealer-0042"
HEAD = "ab" * 32


def open_catalogue(tmp_path: Path) -> Catalogue:
    return Catalogue(tmp_path / "catalogue.db", clock=ManualClock(), device_id=DEVICE)


def test_outbox_item_by_kind_and_ref_in_any_state(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            rec = txn.enqueue("recording", "r-1")
            erase = txn.enqueue("erasure", "r-1")
            assert rec is not None and erase is not None
            txn.update_outbox(rec, state="stored")
        item = cat.outbox_item("recording", "r-1")
        assert item is not None
        assert (item["id"], item["state"], item["attempts"]) == (rec, "stored", 1)
        other = cat.outbox_item("erasure", "r-1")
        assert other is not None and (other["id"], other["state"]) == (erase, "pending")
        assert cat.outbox_item("recording", "r-2") is None
        assert cat.outbox_item("audit", "r-1") is None


def test_requeue_sent_moves_only_sent_items_back_to_pending(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            ids = {ref: txn.enqueue("recording", ref) for ref in ("a", "b", "c", "d")}
            txn.update_outbox(ids["a"] or 0, state="sent")
            txn.update_outbox(ids["b"] or 0, state="sent")
            txn.update_outbox(ids["c"] or 0, state="stored")
        with cat.transaction() as txn:
            assert txn.requeue_sent() == 2
        states = {ref: (cat.outbox_item("recording", ref) or {})["state"] for ref in ids}
        assert states == {"a": "pending", "b": "pending", "c": "stored", "d": "pending"}
        assert (cat.outbox_item("recording", "a") or {})["last_error"] == "resync requested"
        with cat.transaction() as txn:
            assert txn.requeue_sent() == 0


def test_requeue_rolls_back_with_its_transaction(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            sent = txn.enqueue("recording", "a")
            txn.update_outbox(sent or 0, state="sent")
        with pytest.raises(RuntimeError), cat.transaction() as txn:
            txn.requeue_sent()
            raise RuntimeError("crash before commit")
        assert (cat.outbox_item("recording", "a") or {})["state"] == "sent"


def test_receipts_count_and_latest(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        assert cat.receipt_count() == 0 and cat.latest_receipt() is None
        with cat.transaction() as txn:
            txn.insert_audit_receipt(5, HEAD, "00" * 8, "c2ln", "2026-01-01T00:00:00.000Z")
            txn.insert_audit_receipt(12, "cd" * 32, "11" * 8, "c2lnMg==",
                                     "2026-01-01T00:01:00.000Z")
        assert cat.receipt_count() == 12
        assert cat.latest_receipt() == {
            "count": 12, "head_hash": "cd" * 32, "central_key_id": "11" * 8,
            "signature": "c2lnMg==", "received_at": "2026-01-01T00:01:00.000Z"}
        assert cat.head().count == 0  # a receipt writes no audit entry


def test_receipts_are_append_only(tmp_path: Path) -> None:
    with open_catalogue(tmp_path) as cat:
        with cat.transaction() as txn:
            txn.insert_audit_receipt(5, HEAD, "00" * 8, "c2ln", "2026-01-01T00:00:00.000Z")
        with pytest.raises(CatalogueError, match="receipt 5"), cat.transaction() as txn:
            txn.insert_audit_receipt(5, "cd" * 32, "00" * 8, "eA==", "2026-01-02T00:00:00.000Z")
        assert (cat.latest_receipt() or {})["head_hash"] == HEAD
        with pytest.raises(CatalogueError, match="transaction already ended"):
            txn.insert_audit_receipt(6, HEAD, "00" * 8, "c2ln", "2026-01-01T00:00:00.000Z")


def test_a_committed_outbox_item_rings_the_bell_and_a_rollback_does_not(tmp_path: Path) -> None:
    import socket

    from drivers.clock import ManualClock
    from firmware.catalogue import Catalogue, outbox_bell_path

    cat = Catalogue(tmp_path / "c.db", clock=ManualClock(), device_id="d1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bell:
        bell.bind(str(outbox_bell_path(tmp_path / "c.db")))
        bell.settimeout(5)
        try:
            with cat.transaction() as tx:
                tx.enqueue("recording", "r-rolled-back")
                raise RuntimeError("power cut")
        except RuntimeError:
            pass
        with cat.transaction() as tx:
            tx.enqueue("recording", "r1")
        assert bell.recv(64) == b"outbox"
        bell.settimeout(0.2)
        try:
            extra = bell.recv(64)
        except TimeoutError:
            extra = None
        assert extra is None  # exactly one ring: the rolled-back item rang nothing
