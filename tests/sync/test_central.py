"""The central store: the catalogue contract on SQLite and PostgreSQL, and several ingest
workers sharing one subscription on a real mosquitto."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.keys import load_or_create_signing_key, public_key_pem
from sync import protocol as p
from sync.broker import Broker
from sync.central import CentralClient, CentralStore
from sync.central.catalogue import StoredRecording, open_catalogue
from sync.central.retention import apply_retention
from sync.pki import Pki, make_pki
from tests.sync.uploadkit import DEVICE, Device, sha256_file, wait_until
from tests.sync.uploadkit import shared_broker as start_shared_broker

PG_ADMIN = os.environ.get("ER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
WORKERS = ("ingest-1", "ingest-2", "ingest-3")
MB = 1_000_000


def _pg_url() -> str | None:
    try:
        import psycopg
    except ImportError:
        return None
    name = f"er_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.Error:
        return None
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def _drop(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'central.db'}"
        return
    url = _pg_url()
    if url is None:
        pytest.skip(f"no PostgreSQL server reachable at {PG_ADMIN} (or psycopg missing)")
    try:
        yield url
    finally:
        _drop(url)


def _row(rid: str, started: str, retention: str, number: str = "") -> StoredRecording:
    manifest = {"recording_id": rid, "device_id": DEVICE, "started_at": started,
                "remote_number": number}
    return StoredRecording(rid, DEVICE, "ab" * 32, 10, manifest, "c2ln", f"objects/{rid}.rec",
                           started, started, retention)


def test_catalogue_contract(catalogue_url: str) -> None:
    cat = open_catalogue(catalogue_url)
    try:
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        assert cat.add_recording(_row(a, "2024-01-01T10:00:00.000Z", "2024-02-01T00:00:00.000Z",
                                      "+4930123"))
        assert not cat.add_recording(_row(a, "2024-01-01T10:00:00.000Z", "x"))  # duplicate
        cat.add_recording(_row(b, "2024-03-01T10:00:00.000Z", "2099-01-01T00:00:00.000Z"))
        assert [r.recording_id for r in cat.search(number="30123")] == [a]
        assert [r.recording_id for r in cat.search(start="2024-02-01")] == [b]
        assert [r.recording_id for r in cat.expired("2025-01-01T00:00:00.000Z")] == [a]
        row = cat.get_recording(a)
        assert row is not None
        cat.erase(row, cause="retention", reason="r", requested_at=None, erased_at="now")
        assert cat.get_recording(a) is None
        assert (cat.tombstone(a) or {})["cause"] == "retention"
        cat.add_alert(DEVICE, "audit.break", "3", "detail", "2024")
        assert cat.alerts(DEVICE)[0]["kind"] == "audit.break"
    finally:
        cat.close()


# --- several workers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [DEVICE, "dev-b", *WORKERS])


@pytest.fixture
def shared_broker(worker_pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    """The repository's ACL plus one ``user`` block per worker (docs/CENTRAL.md)."""
    broker = start_shared_broker(worker_pki, tmp_path, WORKERS)
    try:
        yield broker
    finally:
        broker.stop()


class Workers:
    def __init__(self, root: Path, pki: Pki, broker: Broker, url: str, devices: Path) -> None:
        self.root, self.pki, self.broker, self.url, self.devices = root, pki, broker, url, devices
        self.key = load_or_create_signing_key(root / "central_ed25519.pem")
        self.running: dict[str, CentralClient] = {}

    def start(self, name: str) -> CentralClient:
        store = CentralStore(self.root / "store", self.devices, self.key,
                             catalogue=open_catalogue(self.url), worker_id=name)
        cred = self.pki.clients[name]
        client = CentralClient(store, self.broker.host, self.broker.port, self.pki.ca_cert,
                               cred.cert, cred.key, client_id=name, share_group="ingest")
        client.start()
        wait_until(client.connected.is_set, what=f"{name} connected")
        self.running[name] = client
        return client

    def stored(self) -> int:
        return sum(c.store.stats.stored for c in self.running.values())

    def close(self) -> None:
        for client in self.running.values():
            client.stop()
            client.store.close()


@pytest.fixture
def workers(tmp_path: Path, worker_pki: Pki, shared_broker: Broker,
            catalogue_url: str) -> Iterator[Workers]:
    devices = tmp_path / "devices"
    devices.mkdir()
    made = Workers(tmp_path / "central", worker_pki, shared_broker, catalogue_url, devices)
    try:
        yield made
    finally:
        made.close()


def _device(tmp_path: Path, pki: Pki, broker: Broker, workers: Workers) -> Device:
    device = Device(tmp_path / "device", pki, broker)
    shutil.copy(device.public_key, workers.devices / f"{DEVICE}.pub")
    return device


def test_shared_workers_store_each_recording_once_each_upload_on_one_worker(tmp_path: Path, worker_pki: Pki,
                                                  shared_broker: Broker,
                                                  workers: Workers) -> None:
    for name in WORKERS:
        workers.start(name)
    device = _device(tmp_path, worker_pki, shared_broker, workers)
    try:
        device.start_agent()
        made = []
        for size in (1 * MB, 600_000, 0, 2 * MB):
            before = {name: c.store.stats.chunk_bytes for name, c in workers.running.items()}
            rid, digest = device.add_recording(size)
            wait_until(lambda r=rid: device.outbox_state(r) == "stored", 60.0, f"{rid}")
            took = {name: c.store.stats.chunk_bytes - before[name]
                    for name, c in workers.running.items()}
            # the init went to one worker through the shared subscription; its ack named
            # it, and every chunk was routed to it: no other worker saw a byte
            assert sorted(took.values()) == [0] * (len(took) - 1) + [size], took
            made.append((rid, digest))
        store = workers.running[WORKERS[0]].store
        for rid, digest in made:
            assert sha256_file(store.stored_file(DEVICE, rid)) == digest
            row = store.catalogue.get_recording(rid)
            assert row is not None and row.sha256 == digest
        assert workers.stored() == len(made)
    finally:
        device.close()


def test_worker_killed_mid_file_another_completes_it(tmp_path: Path, worker_pki: Pki,
                                                     shared_broker: Broker,
                                                     workers: Workers) -> None:
    first = workers.start(WORKERS[0])
    device = _device(tmp_path, worker_pki, shared_broker, workers)
    try:
        rid, digest = device.add_recording(8 * MB)
        device.start_agent()
        wait_until(lambda: first.store.stats.chunk_bytes >= 2 * MB, what="2 MB received")
        first.kill()
        del workers.running[WORKERS[0]]
        second = workers.start(WORKERS[1])
        wait_until(lambda: device.outbox_state(rid) == "stored", 60.0, "stored after the kill")
        assert sha256_file(second.store.stored_file(DEVICE, rid)) == digest
        assert second.store.stats.chunk_bytes < 8 * MB, "the second worker started over"
    finally:
        device.close()


def _init(key: Ed25519PrivateKey, rid: str, data: bytes, sha: str | None = None) -> bytes:
    sha = sha or hashlib.sha256(data).hexdigest()
    manifest = {"recording_id": rid, "device_id": DEVICE, "size": len(data), "sha256": sha,
                "call_id": "c", "segment": 0, "line_id": "l", "direction": "inbound",
                "started_at": None, "created_at": "x", "audio_s": 0, "decision": None,
                "retention_until": None, "codec": "alaw"}
    sig = base64.b64encode(key.sign(p.manifest_bytes(manifest))).decode()
    return json.dumps({"v": 1, "recording_id": rid, "size": len(data), "sha256": sha,
                       "chunk_size": 1024, "manifest": manifest, "manifest_sig": sig}).encode()


def test_duplicates_bad_hash_bad_signature(tmp_path: Path, catalogue_url: str) -> None:
    """Without a broker: the store's answers to duplicate, forged and damaged uploads."""
    devices = tmp_path / "devices"
    devices.mkdir()
    device_key = Ed25519PrivateKey.generate()
    (devices / f"{DEVICE}.pub").write_bytes(public_key_pem(device_key.public_key()))
    stores = [CentralStore(tmp_path / "store", devices, Ed25519PrivateKey.generate(),
                           catalogue=open_catalogue(catalogue_url), worker_id=w)
              for w in WORKERS[:2]]
    try:
        data, rid = os.urandom(5000), str(uuid.uuid4())

        def send(store: CentralStore, leaf: str, payload: bytes) -> p.Ack:
            answers = store.handle(p.rec_topic(DEVICE, "up", rid, leaf), payload)
            return p.decode_ack(answers[0][1])

        init = _init(device_key, rid, data)
        fin = json.dumps({"v": 1, "recording_id": rid, "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}).encode()
        assert send(stores[0], "init", init).state == p.PARTIAL
        send(stores[0], "chunk", p.encode_chunk(rid, 0, data[:3000]))
        send(stores[1], "chunk", p.encode_chunk(rid, 0, data[:3000]))  # duplicate, other worker
        assert send(stores[1], "chunk", p.encode_chunk(rid, 3000, data[3000:])).have == [(0, 5000)]
        assert send(stores[0], "fin", fin).state == p.STORED
        assert send(stores[1], "fin", fin).state == p.STORED
        assert stores[0].stats.stored + stores[1].stats.stored == 1
        assert len(stores[0].catalogue.search(device_id=DEVICE)) == 1

        forged = _init(Ed25519PrivateKey.generate(), str(uuid.uuid4()), data)
        rid_f = json.loads(forged)["recording_id"]
        answer = stores[0].handle(p.rec_topic(DEVICE, "up", rid_f, "init"), forged)
        assert p.decode_ack(answer[0][1]).error == "bad_signature"

        rid = str(uuid.uuid4())
        lying = _init(device_key, rid, data, sha="00" * 32)
        send(stores[0], "init", lying)
        send(stores[0], "chunk", p.encode_chunk(rid, 0, data))
        fin_bad = json.dumps({"v": 1, "recording_id": rid, "size": len(data),
                              "sha256": "00" * 32}).encode()
        ack = send(stores[1], "fin", fin_bad)
        assert (ack.state, ack.error, ack.have) == (p.PARTIAL, "sha256_mismatch", [])
        kinds = {a["kind"] for a in stores[0].catalogue.alerts(DEVICE)}
        assert kinds == {"ingest.bad_signature", "ingest.sha256_mismatch"}
        assert not stores[0].stored_file(DEVICE, rid).exists()
    finally:
        for store in stores:
            store.close()


def test_retention_and_erasure_leave_tombstones(tmp_path: Path, catalogue_url: str) -> None:
    devices = tmp_path / "devices"
    devices.mkdir()
    device_key = Ed25519PrivateKey.generate()
    (devices / f"{DEVICE}.pub").write_bytes(public_key_pem(device_key.public_key()))
    store = CentralStore(tmp_path / "store", devices, Ed25519PrivateKey.generate(),
                         catalogue=open_catalogue(catalogue_url))
    try:
        rids = []
        for retention in ("2000-01-01T00:00:00.000Z", "2099-01-01T00:00:00.000Z", None):
            data, rid = os.urandom(100), str(uuid.uuid4())
            raw = json.loads(_init(device_key, rid, data))
            raw["manifest"]["retention_until"] = retention
            raw["manifest_sig"] = base64.b64encode(device_key.sign(
                p.manifest_bytes(raw["manifest"]))).decode()
            store.handle(p.rec_topic(DEVICE, "up", rid, "init"), json.dumps(raw).encode())
            store.handle(p.rec_topic(DEVICE, "up", rid, "chunk"), p.encode_chunk(rid, 0, data))
            fin = {"v": 1, "recording_id": rid, "size": 100, "sha256": raw["sha256"]}
            store.handle(p.rec_topic(DEVICE, "up", rid, "fin"), json.dumps(fin).encode())
            rids.append(rid)
        assert apply_retention(store) == [rids[0]]
        assert not store.stored_file(DEVICE, rids[0]).exists()
        assert (store.catalogue.tombstone(rids[0]) or {})["cause"] == "retention"
        erasure = p.Erasure(rids[1], "objection", "2030-01-01T00:00:00.000Z").encode()
        answer = store.handle(f"er/v1/{DEVICE}/up/erasure", erasure)
        assert p.decode_erasure_ack(answer[0][1]).recording_id == rids[1]
        assert not store.stored_file(DEVICE, rids[1]).exists()
        tomb = store.catalogue.tombstone(rids[1]) or {}
        assert (tomb["cause"], tomb["reason"]) == ("erasure", "objection")
        assert store.stored_file(DEVICE, rids[2]).exists()
        assert {r.recording_id for r in store.catalogue.search()} == {rids[2]}
    finally:
        store.close()


def test_chunks_of_one_commit_share_one_cumulative_ack(tmp_path: Path) -> None:
    """Chunks made durable by one fdatasync (two staged batches, one commit): one ack per
    recording, on its last chunk, with every range of the commit; none on the chunks
    before it (each still gets its PUBACK from the worker)."""
    devices = tmp_path / "devices"
    devices.mkdir()
    device_key = Ed25519PrivateKey.generate()
    (devices / f"{DEVICE}.pub").write_bytes(public_key_pem(device_key.public_key()))
    store = CentralStore(tmp_path / "store", devices, Ed25519PrivateKey.generate(),
                         catalogue=open_catalogue(f"sqlite:///{tmp_path / 'c.db'}"))
    try:
        (a, data_a), (b, data_b) = [(str(uuid.uuid4()), os.urandom(4096)) for _ in range(2)]
        for rid, data in ((a, data_a), (b, data_b)):
            store.handle(p.rec_topic(DEVICE, "up", rid, "init"), _init(device_key, rid, data))
        chunks = [(p.rec_topic(DEVICE, "up", rid, "chunk"),
                   p.encode_chunk(rid, at, data[at:at + 1024]))
                  for rid, data, at in ((a, data_a, 0), (a, data_a, 1024), (b, data_b, 0),
                                        (a, data_a, 2048))]
        answers = store.complete([store.stage_chunks(chunks[:3]),
                                  store.stage_chunks(chunks[3:])])
        acks = [[(topic.split("/")[-2], p.decode_ack(payload).have)
                 for topic, payload in answer] for answer in answers]
        assert acks == [[], [], [(b, [(0, 1024)])], [(a, [(0, 3072)])]]
        # the next commit answers again (a chunk already held: at once, with its `have`)
        again = store.complete([store.stage_chunks(chunks[:1])])
        assert [p.decode_ack(payload).have for _, payload in again[0]] == [[(0, 3072)]]
    finally:
        store.close()


def test_a_worker_whose_routed_topics_are_not_granted_still_stores(
        tmp_path: Path, worker_pki: Pki, catalogue_url: str) -> None:
    """An ACL block without the worker's to/ line (docs/CENTRAL.md, Deployment): uploads
    routed to it would never arrive; they must still be stored, on the shared topics."""
    broker = start_shared_broker(worker_pki, tmp_path / "broker", WORKERS, routed=False)
    devices = tmp_path / "devices"
    devices.mkdir()
    workers = Workers(tmp_path / "central", worker_pki, broker, catalogue_url, devices)
    try:
        workers.start(WORKERS[0])
        device = _device(tmp_path, worker_pki, broker, workers)
        try:
            rid, digest = device.add_recording(1 * MB)
            device.start_agent()
            wait_until(lambda: device.outbox_state(rid) == "stored", 60.0, "stored")
            assert sha256_file(workers.running[WORKERS[0]].store.stored_file(DEVICE, rid)) \
                == digest
        finally:
            device.close()
    finally:
        workers.close()
        broker.stop()
