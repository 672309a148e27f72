"""Audit receipts and ``sync.central_public_key``: with the key configured, the agent stores
only receipts central's key signed; a receipt signed by any other key is rejected, logged
and audited. Real mosquitto, real central store."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.keys import key_id, load_or_create_signing_key
from firmware.policyfile import public_key_text
from sync import protocol as p
from sync.agent import receipt_problem
from sync.broker import Broker
from sync.pki import Pki
from tests.sync.uploadkit import DEVICE, Central, Device, wait_until


def central_key_path(tmp_path: Path) -> Path:
    return tmp_path / "central" / "central_ed25519.pem"  # where uploadkit.Central keeps it


def kit(tmp_path: Path, pki: Pki, broker: Broker, central_public_key: str
        ) -> tuple[Device, Central]:
    device = Device(tmp_path / "device", pki, broker, central_public_key=central_public_key)
    return device, Central(tmp_path / "central", pki, broker, device.public_key)


@pytest.fixture
def central_key(tmp_path: Path) -> Ed25519PrivateKey:
    path = central_key_path(tmp_path)
    path.parent.mkdir(parents=True)
    return load_or_create_signing_key(path)


@pytest.fixture
def verified(tmp_path: Path, pki: Pki, broker: Broker,
             central_key: Ed25519PrivateKey) -> Iterator[tuple[Device, Central]]:
    device, central = kit(tmp_path, pki, broker, public_key_text(central_key.public_key()))
    try:
        yield device, central
    finally:
        device.close()
        central.stop()


@pytest.fixture
def mistrusting(tmp_path: Path, pki: Pki, broker: Broker,
                central_key: Ed25519PrivateKey) -> Iterator[tuple[Device, Central]]:
    """The device pins a key that is not central's."""
    other = public_key_text(Ed25519PrivateKey.generate().public_key())
    device, central = kit(tmp_path, pki, broker, other)
    try:
        yield device, central
    finally:
        device.close()
        central.stop()


def rejections(device: Device) -> list[dict[str, object]]:
    return [e.data for e in device.catalogue.audit_entries()
            if e.kind == "sync.receipt_rejected"]


def test_receipt_signed_by_the_pinned_key_is_stored(
        verified: tuple[Device, Central], central_key: Ed25519PrivateKey) -> None:
    device, central = verified
    central.start()
    rid, _ = device.add_recording(20_000)
    device.start_agent()
    wait_until(lambda: device.outbox_state(rid) == "stored", what="recording stored")
    head = device.catalogue.head()
    wait_until(lambda: device.catalogue.receipt_count() >= head.count,
               what="receipt for the head")
    receipt = device.catalogue.latest_receipt()
    assert receipt is not None
    assert receipt["central_key_id"] == key_id(central_key.public_key())
    central_key.public_key().verify(
        base64.b64decode(str(receipt["signature"])),
        p.receipt_body(DEVICE, int(str(receipt["count"])), str(receipt["head_hash"])))
    assert rejections(device) == []


def test_receipt_signed_by_another_key_is_rejected_and_audited(
        mistrusting: tuple[Device, Central], central_key: Ed25519PrivateKey,
        caplog: pytest.LogCaptureFixture) -> None:
    device, central = mistrusting
    central.start()
    rid, _ = device.add_recording(20_000)
    device.start_agent()
    wait_until(lambda: device.outbox_state(rid) == "stored", what="recording stored")
    wait_until(lambda: bool(rejections(device)), what="a rejected receipt")
    assert device.catalogue.receipt_count() == 0
    assert device.catalogue.latest_receipt() is None
    data = rejections(device)[0]
    assert data["key_id"] == key_id(central_key.public_key())
    assert "not the configured central key" in str(data["reason"])
    logged = [r.getMessage() for r in caplog.records if "receipt" in r.getMessage()
              and "rejected" in r.getMessage()]
    assert logged and "\n" not in logged[0]


# --- the check itself, without a broker ------------------------------------------------

def signed_receipt(key: Ed25519PrivateKey, count: int = 3, head: str = "ab" * 32,
                   device: str = DEVICE) -> p.Receipt:
    signature = key.sign(p.receipt_body(device, count, head))
    return p.Receipt(count, head, key_id(key.public_key()),
                     base64.b64encode(signature).decode("ascii"))


def test_receipt_problem_accepts_only_a_matching_signature() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    good = signed_receipt(key)
    assert receipt_problem(good, DEVICE, public) is None
    assert "does not verify" in str(receipt_problem(good, "dev-b", public))  # another device
    moved = p.Receipt(4, good.head_hash, good.key_id, good.signature)
    assert "does not verify" in str(receipt_problem(moved, DEVICE, public))
    garbled = p.Receipt(3, good.head_hash, good.key_id, "not base64!")
    assert "does not verify" in str(receipt_problem(garbled, DEVICE, public))
    forged = signed_receipt(Ed25519PrivateKey.generate())
    assert "not the configured central key" in str(receipt_problem(forged, DEVICE, public))
    # the right key id on another key's signature does not get through either
    relabelled = p.Receipt(3, forged.head_hash, good.key_id, forged.signature)
    assert "does not verify" in str(receipt_problem(relabelled, DEVICE, public))
