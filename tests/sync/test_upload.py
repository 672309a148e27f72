"""The upload path end to end over a real mosquitto with mutual TLS: the sync agent, the
minimal central store, and what the catalogue says at each step."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync import protocol as p
from sync.broker import Broker, start_local
from sync.pki import Pki
from tests.sync.conftest import Clients
from tests.sync.uploadkit import DEVICE, Central, Device, sha256_file, wait_until

MB = 1_000_000


@pytest.fixture
def device(tmp_path: Path, pki: Pki, broker: Broker) -> Iterator[Device]:
    made = Device(tmp_path / "device", pki, broker)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def central(tmp_path: Path, pki: Pki, broker: Broker, device: Device) -> Iterator[Central]:
    made = Central(tmp_path / "central", pki, broker, device.public_key)
    try:
        yield made
    finally:
        made.stop()


def wait_stored(device: Device, rid: str, timeout_s: float = 30.0) -> None:
    wait_until(lambda: device.outbox_state(rid) == "stored", timeout_s, f"{rid} stored")


def assert_synced(device: Device, central: Central, rid: str, digest: str) -> None:
    assert sha256_file(central.stored_file(rid)) == digest
    row = device.recording(rid)
    assert row["synced_at"] and not row["deleted_at"]
    assert Path(str(row["path"])).is_file(), "the agent deleted the local file"
    kinds = [(e.kind, e.subject, e.data) for e in device.catalogue.audit_entries()]
    assert ("sync.stored", rid, {"sha256": digest, "size": row["size"]}) in kinds


@pytest.mark.parametrize("size", [1 * MB, 10 * MB, 50 * MB])
def test_uploads_arrive_with_matching_sha256(device: Device, central: Central,
                                             size: int) -> None:
    central.start()
    rid, digest = device.add_recording(size)
    device.start_agent()
    wait_stored(device, rid, 60.0)
    assert_synced(device, central, rid, digest)
    assert central.store.stats.chunk_bytes == size  # nothing sent twice on a quiet line


def test_empty_and_several_recordings_in_order(device: Device, central: Central) -> None:
    central.start()
    made = [device.add_recording(size) for size in (0, 1, 300_000)]
    device.start_agent()
    for rid, digest in made:
        wait_stored(device, rid)
        assert_synced(device, central, rid, digest)


def test_central_down_device_holds_everything(device: Device, central: Central) -> None:
    """Nobody subscribed: the broker PUBACKs (0x10) and drops; nothing is marked."""
    rid, digest = device.add_recording(2 * MB)
    agent = device.start_agent()
    wait_until(lambda: agent.link.connected, what="agent connected")
    wait_until(lambda: agent.upload is not None and agent.upload.timeouts >= 1,
               what="an unanswered init")
    assert device.outbox_state(rid) == "pending"
    assert device.recording(rid)["synced_at"] is None
    central.start()
    wait_stored(device, rid)
    assert_synced(device, central, rid, digest)


def test_central_away_with_a_queued_session(device: Device, central: Central) -> None:
    """Central subscribed once, then left: its session queues; nothing is marked until it
    comes back and answers."""
    central.start()
    central.stop()
    rid, digest = device.add_recording(1 * MB)
    agent = device.start_agent()
    wait_until(lambda: agent.upload is not None and agent.upload.timeouts >= 1,
               what="an unanswered init")
    assert device.outbox_state(rid) == "pending"
    assert device.recording(rid)["synced_at"] is None
    central.start()
    wait_stored(device, rid)
    assert_synced(device, central, rid, digest)


def test_sigkill_mid_upload_resumes_with_only_the_missing_bytes(
        tmp_path: Path, device: Device, central: Central) -> None:
    central.start()
    size = 10 * MB
    rid, digest = device.add_recording(size)
    log_path = tmp_path / "agent.log"
    agent = device.start_process(log_path)
    wait_until(lambda: central.store.stats.chunk_bytes >= 3 * MB, what="3 MB received")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    assert device.outbox_state(rid) == "pending"
    assert device.recording(rid)["synced_at"] is None
    restarted = device.start_process(log_path)
    wait_stored(device, rid)
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(10) == 0, log_path.read_text()
    assert_synced(device, central, rid, digest)
    chunk = 120 * 1024
    assert central.store.stats.chunk_bytes <= size + device.config.sync.window * chunk


def test_broker_killed_and_restarted_mid_transfer(device: Device, central: Central,
                                                  broker: Broker) -> None:
    central.start()
    rid, digest = device.add_recording(20 * MB)
    device.start_agent()
    wait_until(lambda: central.store.stats.chunk_bytes >= 4 * MB, what="4 MB received")
    broker.kill()
    assert device.outbox_state(rid) == "pending"
    broker.start()
    wait_stored(device, rid, 60.0)
    assert_synced(device, central, rid, digest)


def test_chunks_clamp_to_a_small_broker_limit_without_reconnecting(
        tmp_path: Path, pki: Pki) -> None:
    small = start_local(pki, tmp_path / "small-broker", max_packet_size=16 * 1024)
    made = Device(tmp_path / "device", pki, small)
    center = Central(tmp_path / "central", pki, small, made.public_key)
    try:
        center.start()
        rid, digest = made.add_recording(1 * MB)
        agent = made.start_agent()
        wait_stored(made, rid)
        assert_synced(made, center, rid, digest)
        assert agent.chunk_bytes <= 16 * 1024 - p.CHUNK_HEADER.size
        assert agent.link.connections == 1
        assert small.log_text().count(f"as {DEVICE} ") == 1, small.log_text()
    finally:
        made.close()
        center.stop()
        small.stop()


def test_duplicate_chunks_are_absorbed(device: Device, central: Central,
                                       mqtt_clients: Clients) -> None:
    """A chunk sent again (by a device resuming, or by the broker redelivering) changes
    nothing; central answers with what it holds."""
    central.start()
    rid, digest = device.add_recording(1 * MB)
    device.start_agent()
    wait_stored(device, rid)
    data = Path(str(device.recording(rid)["path"])).read_bytes()[:1000]
    replay = mqtt_clients.connect(DEVICE)
    replay.publish(p.rec_topic(DEVICE, "up", rid, "chunk"), p.encode_chunk(rid, 0, data))
    wait_until(lambda: central.store.stats.chunks >= 2)
    assert sha256_file(central.stored_file(rid)) == digest


def test_corrupted_chunk_is_refused_and_sent_again(device: Device, central: Central) -> None:
    """A chunk whose data changed on the way fails its CRC; central keeps nothing of it
    and the agent sends that range again."""
    central.start()
    original = central.store._chunk
    damaged: list[int] = []

    def damage_first(device_id: str, rid: str, payload: bytes) -> p.Ack:
        if not damaged:
            damaged.append(p.chunk_offset(payload) or 0)
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        return original(device_id, rid, payload)

    central.store._chunk = damage_first  # type: ignore[method-assign]
    rid, digest = device.add_recording(1 * MB)
    device.start_agent()
    wait_stored(device, rid)
    assert damaged and central.store.stats.refused >= 1
    assert_synced(device, central, rid, digest)


def test_nothing_marked_before_the_stored_answer(device: Device, central: Central) -> None:
    """Every chunk delivered, fin withheld: the device marks nothing and deletes nothing."""
    central.start()
    original = central.store._fin
    released: list[bool] = []

    def hold_fin(device_id: str, rid: str, payload: bytes) -> p.Ack:
        if not released:
            return p.Ack(rid, p.PARTIAL, [(0, 500_000)])  # pretend the end got lost
        return original(device_id, rid, payload)

    central.store._fin = hold_fin  # type: ignore[method-assign]
    rid, digest = device.add_recording(500_000)
    agent = device.start_agent()
    wait_until(lambda: agent.upload is not None and agent.upload.phase == "fin")
    assert device.outbox_state(rid) == "pending"
    row = device.recording(rid)
    assert row["synced_at"] is None and Path(str(row["path"])).is_file()
    released.append(True)
    wait_stored(device, rid)
    assert_synced(device, central, rid, digest)


def test_bad_messages_to_central_are_refused_and_it_keeps_working(
        device: Device, central: Central, mqtt_clients: Clients) -> None:
    central.start()
    sender = mqtt_clients.connect(DEVICE)
    rid = "01890a5d-ac96-774b-bcce-b302099a8057"
    for leaf, payload in [("init", b"{not json"), ("init", b'{"v": 1, "size": "x"}'),
                          ("init", b"[]"), ("fin", b'{"v":1}'), ("chunk", b"short"),
                          ("chunk", b"ERCK" + bytes(60)), ("init", b"x" * 70_000)]:
        sender.publish(p.rec_topic(DEVICE, "up", rid, leaf), payload)
    sender.publish(f"er/v1/{DEVICE}/up/audit/batch", b'{"v":1,"entries":"no"}')
    sender.publish(f"er/v1/{DEVICE}/up/erasure", b"\xff\xfe")
    wait_until(lambda: central.store.stats.refused >= 9, what="nine refusals")
    rid_ok, digest = device.add_recording(300_000)
    device.start_agent()
    wait_stored(device, rid_ok)
    assert_synced(device, central, rid_ok, digest)


def test_bad_messages_to_the_agent_are_refused_and_it_keeps_working(
        device: Device, central: Central, mqtt_clients: Clients) -> None:
    agent = device.start_agent()
    wait_until(lambda: agent.link.connected, what="agent connected")
    forger = mqtt_clients.connect("central", client_id="forger")  # central's certificate
    rid = "01890a5d-ac96-774b-bcce-b302099a8057"
    for topic, payload in [(p.rec_topic(DEVICE, "down", rid, "ack"), b"{oops"),
                           (p.rec_topic(DEVICE, "down", rid, "ack"), b'{"v":1,"state":7}'),
                           (f"er/v1/{DEVICE}/down/audit/receipt", b"[1,2]"),
                           (f"er/v1/{DEVICE}/down/erasure/ack", b"x" * 100_000)]:
        forger.publish(topic, payload)
    forger.close()
    central.start()
    rid_ok, digest = device.add_recording(300_000)
    wait_stored(device, rid_ok)
    assert_synced(device, central, rid_ok, digest)


def test_bad_signature_is_rejected_and_nothing_marked(device: Device, central: Central,
                                                      tmp_path: Path) -> None:
    """Central knows another key for this device: every init is refused."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.keys import public_key_pem

    other = public_key_pem(Ed25519PrivateKey.generate().public_key())
    (central.store.devices_dir / f"{DEVICE}.pub").write_bytes(other)
    central.start()
    rid, _ = device.add_recording(100_000)
    agent = device.start_agent()
    wait_until(lambda: rid in agent._skip_until, what="upload given up")
    assert device.outbox_state(rid) == "pending"
    assert device.recording(rid)["synced_at"] is None
    assert not central.stored_file(rid).exists()
    refused = [e for e in device.catalogue.audit_entries() if e.kind == "sync.refused"]
    assert refused and "bad_signature" in refused[0].data["error"]


def test_audit_trail_is_countersigned(device: Device, central: Central) -> None:
    central.start()
    rid, _ = device.add_recording(10_000)
    device.start_agent()
    wait_stored(device, rid)
    head = device.catalogue.head()

    wait_until(lambda: device.catalogue.receipt_count() >= head.count,
               what="receipt for the head")
    receipt = device.catalogue.latest_receipt()
    assert receipt is not None
    count, head_hash = receipt["count"], receipt["head_hash"]
    entries = device.catalogue.audit_entries(count - 1, 1)
    assert entries[0].hash == head_hash
    held = central.store.catalogue.audit_entries(DEVICE, 1, count)
    assert [e.seq for e in held] == list(range(1, count + 1))
    anchored = central.store.catalogue.audit_head(DEVICE)
    assert anchored is not None and anchored.count >= count


def test_erasure_request_is_confirmed(device: Device, central: Central) -> None:
    central.start()
    rid, _ = device.add_recording(50_000)
    device.start_agent()
    wait_stored(device, rid)
    assert central.stored_file(rid).exists()
    with device.catalogue.transaction() as tx:
        tx.update_recording(rid, deleted_at="2030-01-01T00:00:00.000Z",
                            erase_reason="objection")
        tx.enqueue("erasure", rid)
    wait_until(lambda: not central.stored_file(rid).exists(), what="central erased")
    wait_until(lambda: device.outbox_state(rid, "erasure") == "stored",
               what="erasure marked")
    assert any(e.kind == "sync.erased" and e.subject == rid
               for e in device.catalogue.audit_entries())


def test_a_file_damaged_on_the_device_is_not_sent_again_and_again(device: Device,
                                                                   central: Central) -> None:
    """The recording file changed after it was closed (a bad SD card): central's sha256
    check fails at fin; the agent finds the local damage, gives up on it (audited
    `sync.refused`, item left pending) instead of re-sending forever, and marks nothing."""
    central.start()
    rid, _digest = device.add_recording(1 * MB)
    path = Path(str(device.recording(rid)["path"]))
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    device.start_agent()
    wait_until(lambda: any(e.kind == "sync.refused" and e.subject == rid
                           for e in device.catalogue.audit_entries()), what="sync.refused")
    assert device.outbox_state(rid) == "pending"
    assert device.recording(rid)["synced_at"] is None
    assert central.store.stats.chunk_bytes <= 2 * MB  # sent once, not in a loop


def test_chunks_routed_to_a_worker_that_is_gone_go_back_to_init(
        device: Device, central: Central, mqtt_clients: Clients,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker answers the init, names itself, and is gone before the chunks: the
    broker answers the routed chunks "no matching subscribers" (PUBACK 0x10) and the
    device sends init again at once; the next worker stores the recording."""
    caplog.set_level(logging.INFO, logger="sync.agent")
    ghost = mqtt_clients.connect("central")  # the worker that answers once and leaves
    ghost.subscribe("er/v1/+/up/rec/+/init")
    rid, digest = device.add_recording(2 * MB)
    device.start_agent()
    message = ghost.messages.get(timeout=20)
    assert message.topic == p.rec_topic(DEVICE, "up", rid, "init")
    ack = p.Ack(rid, p.PARTIAL, [], worker="ingest-gone")
    assert ghost.publish(p.rec_topic(DEVICE, "down", rid, "ack"), ack.encode()) == 0
    ghost.close()
    wait_until(lambda: "worker ingest-gone is gone (PUBACK 0x10)" in caplog.text,
               what="the routed chunk refused")
    central.start()
    wait_stored(device, rid, 60.0)
    assert_synced(device, central, rid, digest)
