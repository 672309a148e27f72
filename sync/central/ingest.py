"""The ingest: the central side of the upload protocol (docs/PROTOCOL.md, docs/CENTRAL.md).

:class:`CentralStore` turns one device message into its answers; :class:`CentralClient`
is the MQTT worker. Several workers share the load through a shared subscription
(``$share/<group>/er/v1/+/up/#``): each has its own certificate and worker id, and they
share the object folder and the catalogue. An upload sticks to the worker that answered
its init: the acks name it and the device sends the rest to that worker's own
``er/v1/+/to/<worker>/#`` (docs/PROTOCOL.md, "Routing"). Nothing a worker decides lives only in its
memory: the ranges held are in the part files, "stored" is the catalogue row, so a
worker that dies mid-file loses nothing and any worker completes the upload when the
device resumes.

"stored" is answered only after the object is fsynced and renamed (directory fsynced)
and its catalogue row committed. Three threads: paho's network thread reads messages off
the connection (TLS, parsing); the handler thread handles them in arrival order, writing a
batch of chunks while the commit thread makes the previous batch durable (one fdatasync)
and sends its answers. The broker's PUBACK for a message is sent only after it was
handled and its answer built (manual acks), in arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware.catalogue import iso_utc_ms
from firmware.keys import KeyFileError, key_id, load_public_key
from sync import protocol as p
from sync.central.anchor import anchor_batch
from sync.central.catalogue import Catalogue, StatusRow, StoredRecording, open_catalogue
from sync.central.objects import ObjectStore

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CLIENT_ID = "central"  # the certificate CN the ACL grants er/v1/+/up/# (sync/mosquitto/acl)
BATCH_MAX = 32  # messages handled together: their chunks share one fdatasync
SESSION_EXPIRY_S = 24 * 3600  # the broker keeps our subscription and queue this long
KEEPALIVE_S = 30
STATUS_FLUSH_S = 1.0  # fleet status is written in batches at most this old
ALERT_BAD_SIGNATURE = "ingest.bad_signature"
ALERT_BAD_HASH = "ingest.sha256_mismatch"
STATE_TOPIC = f"{p.TOPIC_ROOT}/central/down/ingest"  # + /<worker>; "central" is never a device


@dataclass
class Stats:
    """Counters for tests and benchmarks."""

    chunk_bytes: int = 0  # data bytes of every chunk received, duplicates included
    chunks: int = 0
    stored: int = 0
    refused: int = 0  # messages answered with an error or dropped as malformed
    statuses: int = 0


Answers = list[tuple[str, bytes]]


@dataclass
class Staged:
    """Chunk messages written but not yet synced: their answers, with the acks of the
    ``deferred`` ones (index, device, recording) still to be built once durable."""

    answers: list[Answers] = field(default_factory=list)
    deferred: list[tuple[int, str, str]] = field(default_factory=list)


class CentralStore:
    """Message handling: objects on a filesystem path, rows in the catalogue."""

    def __init__(self, directory: Path, devices_dir: Path, signing_key: Ed25519PrivateKey,
                 *, catalogue: Catalogue | None = None, worker_id: str = CLIENT_ID,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.devices_dir = devices_dir
        self.key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.worker_id = worker_id
        # the worker id that acks name (a CentralClient sets it: it subscribes the routed
        # topics); None: no routing, devices send everything on the shared topics
        self.route: str | None = None
        self.objects = ObjectStore(directory, worker_id)
        self.catalogue: Catalogue = catalogue or open_catalogue(str(directory / "catalogue.db"))
        self.clock = clock
        self.stats = Stats()
        self._statuses: dict[str, StatusRow] = {}
        self._status_lock = threading.Lock()
        self._dirty: set[str] = set()
        self._group = False  # inside handle_batch: chunk records wait for one commit
        self._grouped: tuple[str, str] | None = None  # the chunk just written, unsynced

    def close(self) -> None:
        self.flush_statuses()
        self.catalogue.close()

    def stored_file(self, device: str, rid: str) -> Path:
        return self.objects.object_path(device, rid)

    def _now(self) -> str:
        return iso_utc_ms(self.clock())

    # --- dispatch ----------------------------------------------------------------------
    def handle_batch(self, messages: list[tuple[str, bytes]]) -> list[Answers]:
        """The answers to several messages in order, with one fdatasync for a run of
        chunks (group commit): a chunk's ack is built after its record is durable, so it
        never claims more than a crash would leave. Anything but a chunk commits first."""
        answers: list[Answers] = []
        staged = Staged()
        for topic, payload in messages:
            if is_chunk(topic):
                self.stage_chunks([(topic, payload)], staged)
                continue
            answers += self.complete([staged])
            staged = Staged()
            answers.append(self.handle(topic, payload))
        return answers + self.complete([staged])

    def stage_chunks(self, messages: list[tuple[str, bytes]],
                     staged: Staged | None = None) -> Staged:
        """Write chunk messages without syncing them; :meth:`complete` (on this thread or
        a commit thread) makes them durable and builds their acks."""
        staged = staged if staged is not None else Staged()
        for topic, payload in messages:
            self._group = True
            try:
                staged.answers.append(self.handle(topic, payload))
            finally:
                self._group = False
            if self._grouped is not None:
                staged.deferred.append((len(staged.answers) - 1, *self._grouped))
                self._grouped = None
        return staged

    def complete(self, batches: list[Staged]) -> list[Answers]:
        """One fdatasync for every record written so far, then the staged batches'
        answers in order (a chunk's ack says what is held once it is durable; the chunks
        of one recording in these batches share the last one's ack)."""
        deferred = [d for staged in batches for d in staged.deferred]
        failed = False
        if deferred:
            try:
                self.objects.commit()
            except OSError as exc:
                log.error("chunk records not synced: %s", exc)
                failed = True
        # One ack per recording and commit: its `have` says all that the earlier chunks'
        # acks would (the device needs only the newest); each chunk still gets its PUBACK.
        last = {(device, rid): (b, index) for b, staged in enumerate(batches)
                for index, device, rid in staged.deferred}
        answers: list[Answers] = []
        for b, staged in enumerate(batches):
            for index, device, rid in staged.deferred:
                if failed:
                    staged.answers[index] = self._io_error(p.rec_topic(device, "up", rid,
                                                                       "chunk"))
                elif last[device, rid] != (b, index):
                    staged.answers[index] = []
                else:
                    ack = p.Ack(rid, p.PARTIAL, self._have(device, rid), worker=self.route)
                    staged.answers[index] = [(p.rec_topic(device, "down", rid, "ack"),
                                              ack.encode())]
            answers += staged.answers
        return answers

    def handle(self, topic: str, payload: bytes) -> Answers:
        """The answers (topic, payload) to one message; malformed ones are logged."""
        try:
            parsed = p.parse_topic(topic)
            if parsed.direction != "up":
                return []
            return self._dispatch(parsed, payload)
        except p.ProtocolError as exc:
            self.stats.refused += 1
            log.warning("%s: refused: %s", topic[:120], exc)
            return self._error_answer(topic, payload, exc)
        except OSError as exc:
            self.stats.refused += 1
            log.error("%s: cannot store: %s", topic[:120], exc)
            return self._io_error(topic)

    def _dispatch(self, topic: p.Topic, payload: bytes) -> Answers:
        device, rest = topic.device_id, topic.rest
        if len(rest) == 3 and rest[0] == "rec":
            handler = {"init": self._init, "chunk": self._chunk, "fin": self._fin}.get(rest[2])
            if handler is None:
                raise p.ProtocolError(f"rec/{rest[2][:20]}: unknown message")
            ack = handler(device, rest[1], payload)
            if self.route is not None and ack.state == p.PARTIAL and ack.error is None:
                ack = dataclasses.replace(ack, worker=self.route)
            return [(p.rec_topic(device, "down", ack.recording_id, "ack"), ack.encode())]
        if rest == ("audit", "batch"):
            batch = p.decode_audit_batch(payload)
            answer = anchor_batch(self.catalogue, self.key, device, self._device_key(device),
                                  batch, self._now())
            if answer.error == "audit_invalid":
                self.stats.refused += 1
            return [(f"{p.device_prefix(device)}/down/audit/receipt", answer.encode())]
        if rest == ("erasure",):
            done = self._erasure(device, p.decode_erasure(payload))
            return [(f"{p.device_prefix(device)}/down/erasure/ack", done.encode())]
        if rest == ("status",):
            self._status(device, payload)
            return []
        log.debug("%s/up/%s: not an ingest message; ignored", device, "/".join(rest)[:80])
        return []

    def _error_answer(self, topic: str, payload: bytes, exc: p.ProtocolError) -> Answers:
        """A rejected/partial ack when the message names a recording we can answer for."""
        named = _recording_topic(topic)
        if named is None:
            return []
        device, rid, leaf = named
        have = self._have(device, rid)
        if exc.code in p.FATAL_ERRORS or leaf == "init":
            ack = p.Ack(rid, p.REJECTED, have, error=exc.code, detail=str(exc))
        else:
            bad = p.chunk_offset(payload) if leaf == "chunk" else None
            ack = p.Ack(rid, p.PARTIAL, have, error=exc.code, detail=str(exc), bad_offset=bad)
        return [(p.rec_topic(device, "down", rid, "ack"), ack.encode())]

    def _io_error(self, topic: str) -> Answers:
        named = _recording_topic(topic)
        if named is None:
            return []
        ack = p.Ack(named[1], p.REJECTED, [], error="io_error", detail="central cannot write")
        return [(p.rec_topic(named[0], "down", named[1], "ack"), ack.encode())]

    def _have(self, device: str, rid: str) -> list[p.Range]:
        try:
            init = self.objects.load_init(device, rid)
            return self.objects.held(device, rid, size=int(init["size"])) if init else []
        except OSError:
            return []

    # --- recordings --------------------------------------------------------------------
    def _init(self, device: str, rid: str, payload: bytes) -> p.Ack:
        init = p.decode_init(payload)
        _same_id(init.recording_id, rid)
        if init.manifest.get("device_id") != device:
            raise p.ProtocolError("init: manifest device_id is not the sender", "bad_signature")
        self._verify_manifest(device, init)
        done = self._already_stored(device, rid, init.sha256, init.size)
        if done is not None:
            return done
        staged = self.objects.load_init(device, rid)
        if staged is None or (staged["sha256"], staged["size"]) != (init.sha256, init.size):
            self.objects.begin(device, rid, json.loads(payload))
            log.info("%s: upload %s begun (%d bytes)", device, rid, init.size)
        return p.Ack(rid, p.PARTIAL, self.objects.held(device, rid, fresh=True))

    def _already_stored(self, device: str, rid: str, sha256: str, size: int) -> p.Ack | None:
        row = self.catalogue.get_recording(rid)
        if row is None:
            tomb = self.catalogue.tombstone(rid)
            if tomb is None:
                return None
            return p.Ack(rid, p.STORED, [(0, size)] if size else [], size, sha256)
        if row.device_id != device or (row.sha256, row.size) != (sha256, size):
            raise p.ProtocolError(f"recording {rid}: stored with another sha256", "conflict")
        return _stored_ack(rid, row.size, row.sha256)

    def _verify_manifest(self, device: str, init: p.Init) -> None:
        try:
            self._device_key(device).verify(init.manifest_sig, p.manifest_bytes(init.manifest))
        except InvalidSignature:
            self.catalogue.add_alert(device, ALERT_BAD_SIGNATURE, init.recording_id,
                                     "manifest signature does not verify", self._now())
            raise p.ProtocolError(f"init {init.recording_id}: manifest signature does not "
                                  f"verify with {device}'s key", "bad_signature") from None

    def _device_key(self, device: str) -> Ed25519PublicKey:
        try:
            return load_public_key(self.devices_dir / f"{device}.pub")
        except KeyFileError as exc:
            raise p.ProtocolError(f"device {device}: no usable public key ({exc})",
                                  "unknown_device") from None

    def _chunk(self, device: str, rid: str, payload: bytes) -> p.Ack:
        chunk = p.decode_chunk(payload)
        _same_id(chunk.recording_id, rid)
        self.stats.chunks += 1
        self.stats.chunk_bytes += len(chunk.data)
        staged = self.objects.load_init(device, rid)
        if staged is None:
            row = self.catalogue.get_recording(rid)
            if row is not None and row.device_id == device:
                return _stored_ack(rid, row.size, row.sha256)
            return p.Ack(rid, p.PARTIAL, [], error="no_init")
        if chunk.end > int(staged["size"]):
            raise p.ProtocolError(f"chunk {rid}@{chunk.offset}: ends at {chunk.end}, after "
                                  f"the size {staged['size']}", "bad_chunk")
        have = self.objects.held(device, rid, size=int(staged["size"]))
        if not p.covered(have, (chunk.offset, chunk.end)):
            self.objects.append(device, rid, chunk.offset, chunk.data, sync=not self._group,
                                crc32=chunk.crc32)
            if self._group:  # acked by handle_batch once durable
                self._grouped = (device, rid)
                return p.Ack(rid, p.PARTIAL, have)
            have = p.add_range(have, (chunk.offset, chunk.end))
        return p.Ack(rid, p.PARTIAL, have)

    def _fin(self, device: str, rid: str, payload: bytes) -> p.Ack:
        fin = p.decode_fin(payload)
        _same_id(fin.recording_id, rid)
        done = self._already_stored(device, rid, fin.sha256, fin.size)
        if done is not None:
            return done
        staged = self.objects.load_init(device, rid)
        if staged is None:
            return p.Ack(rid, p.PARTIAL, [], error="no_init")
        if (fin.size, fin.sha256) != (staged["size"], staged["sha256"]):
            raise p.ProtocolError(f"fin {rid}: size or sha256 differs from the init")
        have = self.objects.held(device, rid, fresh=True)  # every worker's parts, listed now
        if p.missing_ranges(fin.size, have):
            return p.Ack(rid, p.PARTIAL, have)
        return self._store(device, rid, staged)

    def _store(self, device: str, rid: str, staged: dict[str, Any]) -> p.Ack:
        try:
            assembled = self.objects.assemble(device, rid, int(staged["size"]))
        except FileNotFoundError:  # the staging folder went while this worker read it
            assembled = None
        if assembled is None:  # another worker stored it or it began again: say so
            return self._not_stored_here(device, rid, staged)
        tmp, digest = assembled
        if digest != staged["sha256"]:
            tmp.unlink(missing_ok=True)
            self.objects.begin(device, rid, staged)
            log.error("%s: upload %s does not match its sha256; discarded", device, rid)
            self.catalogue.add_alert(device, ALERT_BAD_HASH, rid,
                                     "every byte arrived but the sha256 did not match",
                                     self._now())
            return p.Ack(rid, p.PARTIAL, [], error="sha256_mismatch")
        manifest = {"manifest": staged["manifest"], "manifest_sig": staged["manifest_sig"]}
        try:
            final = self.objects.publish(device, rid, tmp, manifest)
        except FileNotFoundError as exc:  # another worker's begin removed the part meanwhile
            log.warning("%s: upload %s not published: %s", device, rid, exc)
            return self._not_stored_here(device, rid, staged)
        row = _row(device, staged, final.relative_to(self.directory), self._now())
        if self.catalogue.add_recording(row):
            self.stats.stored += 1
            log.info("%s: recording %s stored (%d bytes, sha256 %s)", device, rid, row.size,
                     row.sha256)
        self.objects.discard(device, rid)
        return _stored_ack(rid, row.size, row.sha256)

    def _not_stored_here(self, device: str, rid: str, staged: dict[str, Any]) -> p.Ack:
        """The answer when another worker's move took the bytes away mid-store: its
        catalogue row if it stored them, else what is held now."""
        done = self._already_stored(device, rid, staged["sha256"], int(staged["size"]))
        return done or p.Ack(rid, p.PARTIAL, self._have(device, rid))

    # --- erasure -----------------------------------------------------------------------
    def _erasure(self, device: str, request: p.Erasure) -> p.ErasureAck:
        from sync.central.retention import erase

        erase(self, device, request.recording_id, cause="erasure", reason=request.reason,
              requested_at=request.erased_at)
        return p.ErasureAck(request.recording_id)

    # --- fleet status ------------------------------------------------------------------
    def _status(self, device: str, payload: bytes) -> None:
        self.stats.statuses += 1
        try:
            status = json.loads(payload)
            session, state = int(status["session"]), str(status["state"])
        except (ValueError, KeyError, TypeError):
            raise p.ProtocolError("status: not a status message") from None
        now = self._now()
        with self._status_lock:
            last = self._statuses.get(device)
            if last is not None and session < last.session:
                return  # the session rule (docs/PROTOCOL.md, "Fleet status")
            since = last.since if last is not None and last.state == state else now
            self._statuses[device] = StatusRow(device, session, state, since, now, status)
            self._dirty.add(device)

    def flush_statuses(self) -> int:
        """Write the statuses that changed since the last flush; how many."""
        with self._status_lock:
            rows = [self._statuses[d] for d in sorted(self._dirty)]
            self._dirty.clear()
        self.catalogue.put_statuses(rows)
        return len(rows)


class CentralClient:
    """One ingest worker on MQTT: a persistent session, answers from the store.

    ``share_group`` subscribes ``$share/<group>/er/v1/+/up/#`` so that several workers
    split the messages; each must connect with its own certificate (``client_id`` is
    replaced by the certificate's CN on the repository's broker).
    """

    def __init__(self, store: CentralStore, host: str, port: int, ca: Path, cert: Path,
                 key: Path, *, client_id: str = CLIENT_ID, share_group: str | None = None) -> None:
        if not p.WORKER_ID.fullmatch(store.worker_id):
            raise ValueError(f"worker id {store.worker_id[:70]!r}: expected letters, digits, "
                             "'_', '.', '-' (at most 64), one MQTT topic level")
        self.store = store
        # its acks name it: the device routes the upload's chunks here (a device that
        # hears nothing back that way falls back to the shared topics, sync/agent.py)
        store.route = store.worker_id
        self.host, self.port = host, port
        self.share_group = share_group
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._handler: threading.Thread | None = None
        self._inbox: queue.Queue[_Received | None] = queue.Queue()
        # written chunk batches waiting for the commit thread's fdatasync (at most two)
        self._commits: queue.Queue[tuple[list[_Received], Staged] | None] = queue.Queue(2)
        self._committer: threading.Thread | None = None
        self._connection = 0  # counts connections; a PUBACK belongs to one
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.manual_ack_set(True)
        self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(100)
        self.client.will_set(self.state_topic, _state("offline", store.worker_id), 1, True)
        self.client.on_socket_open = _set_nodelay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def state_topic(self) -> str:
        return f"{STATE_TOPIC}/{self.store.worker_id}"

    @property
    def filter(self) -> str:
        topic = f"{p.TOPIC_ROOT}/+/up/#"
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic

    @property
    def routed_filter(self) -> str:
        """This worker's own topics: the chunks and fins of the uploads it acked (every
        worker subscribes its own, unshared; docs/PROTOCOL.md, "Routing")."""
        return f"{p.TOPIC_ROOT}/+/{p.ROUTED}/{self.store.worker_id}/#"

    def start(self) -> None:
        # A single worker keeps a persistent session, so its queue waits while it is away.
        # A shared-subscription worker must not: mosquitto keeps handing an offline
        # member its share of the messages. Its session ends with its connection; what
        # was in flight to it is found missing at the device's next init.
        shared = self.share_group is not None
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if shared else SESSION_EXPIRY_S
        self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S,
                                  clean_start=shared, properties=properties)
        self.client.loop_start()
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_loop, name="status-flush",
                                         daemon=True)
        self._flusher.start()
        self._handler = threading.Thread(target=self._handle_loop, name="ingest-handler",
                                         daemon=True)
        self._handler.start()
        self._committer = threading.Thread(target=self._commit_loop, name="ingest-commit",
                                           daemon=True)
        self._committer.start()

    def _end_handler(self) -> None:
        """The message being handled is finished; queued ones stay unacknowledged."""
        self._inbox.put(None)
        if self._handler is not None:
            self._handler.join(30)
            self._handler = None
        if self._committer is not None:  # after the handler: what it staged is answered
            self._commits.put(None)
            self._committer.join(30)
            self._committer = None

    def stop(self) -> None:
        """A clean stop: the state says offline, the connection ends."""
        self._stop.set()
        self._end_handler()
        if self.connected.is_set():
            self.client.publish(self.state_topic, _state("offline", self.store.worker_id),
                                1, True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()
        if self._flusher is not None:
            self._flusher.join(5)
        self.store.flush_statuses()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT (a crash, for tests): the will fires."""
        self._stop.set()
        self._end_handler()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _flush_loop(self) -> None:
        while not self._stop.wait(STATUS_FLUSH_S):
            try:
                self.store.flush_statuses()
            except Exception:
                log.exception("fleet status not written")

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused central: %s", reason)
            return
        # Subscribed again on every connection: a broker that lost its state (killed
        # between autosaves) has forgotten the session.
        self._connection += 1
        client.subscribe([(self.filter, 1), (self.routed_filter, 1)])
        client.publish(self.state_topic, _state("online", self.store.worker_id), 1, True)
        log.info("ingest %s connected (session present: %s)", self.store.worker_id,
                 flags.session_present)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                       _p: Properties | None) -> None:
        self.connected.clear()
        log.warning("ingest %s disconnected: %s", self.store.worker_id, reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(_Received(message.topic, bytes(message.payload), message.mid,
                                  message.qos, self._connection))

    def _handle_loop(self) -> None:
        """Handle what has arrived, up to BATCH_MAX messages at a time (one fdatasync for
        their chunks); broker acknowledgements follow the answers, in arrival order."""
        while (first := self._inbox.get()) is not None:
            batch, stop = _take_waiting(self._inbox, first, BATCH_MAX)
            try:
                self._handle(batch)
            except Exception:
                log.exception("%s: not handled", first.topic[:120])
            if stop:
                return

    def _handle(self, batch: list[_Received]) -> None:
        """Chunks at the head of the batch are written here and handed to the commit
        thread, which syncs them while the next batch is written; anything else waits
        until every earlier chunk is answered (answers and PUBACKs stay in arrival order)."""
        head = 0
        while head < len(batch) and is_chunk(batch[head].topic):
            head += 1
        if head:
            staged = self.store.stage_chunks([(r.topic, r.payload) for r in batch[:head]])
            self._commits.put((batch[:head], staged))
        if head < len(batch):
            self._commits.join()
            rest = batch[head:]
            self._answer(rest, self.store.handle_batch([(r.topic, r.payload) for r in rest]))

    def _commit_loop(self) -> None:
        """Sync what the handler wrote (everything queued with one fdatasync), then send
        those answers and the broker's acknowledgements."""
        while (first := self._commits.get()) is not None:
            items, stop = _take_waiting(self._commits, first)
            try:
                answers = self.store.complete([staged for _, staged in items])
                self._answer([r for received, _ in items for r in received], answers)
            except Exception:
                log.exception("chunk answers not sent")
            finally:
                for _ in items:
                    self._commits.task_done()
            if stop:
                self._commits.task_done()
                return
        self._commits.task_done()

    def _answer(self, received: list[_Received], results: list[Answers]) -> None:
        for message, answers in zip(received, results, strict=True):
            for topic, payload in answers:
                self.client.publish(topic, payload, qos=1)
            if message.connection == self._connection:  # else the broker sends it again
                self.client.ack(message.mid, message.qos)


@dataclass(frozen=True)
class _Received:
    """A message from the broker, waiting for the handler thread."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int


# --- helpers ------------------------------------------------------------------------
def _take_waiting(waiting: queue.Queue[_T | None], first: _T,
                  limit: int | None = None) -> tuple[list[_T], bool]:
    """``first`` and what else waits in the queue already (at most ``limit`` in all), and
    whether the stop marker (None) was taken from it."""
    items = [first]
    while limit is None or len(items) < limit:
        try:
            more = waiting.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return items, True
        items.append(more)
    return items, False


def _set_nodelay(_client: mqtt.Client, _u: Any, sock: Any) -> None:
    """Acks are small: with Nagle's algorithm each waits for the broker's delayed ACK
    (up to 40 ms on Linux, tcp(7)) while the device's window stands still."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _state(state: str, worker: str) -> bytes:
    return json.dumps({"state": state, "worker": worker}).encode()


def _stored_ack(rid: str, size: int, sha256: str) -> p.Ack:
    return p.Ack(rid, p.STORED, [(0, size)] if size else [], size, sha256)


def _row(device: str, staged: dict[str, Any], path: Path, now: str) -> StoredRecording:
    manifest = staged["manifest"]
    return StoredRecording(staged["recording_id"], device, staged["sha256"],
                           int(staged["size"]), manifest, staged["manifest_sig"], str(path),
                           now, manifest.get("started_at"), manifest.get("retention_until"))


def is_chunk(topic: str) -> bool:
    named = _recording_topic(topic)
    return named is not None and named[2] == "chunk"


def _recording_topic(topic: str) -> tuple[str, str, str] | None:
    try:
        parsed = p.parse_topic(topic)
    except p.ProtocolError:
        return None
    rest = parsed.rest
    if len(rest) != 3 or rest[0] != "rec" or not _is_uuid(rest[1]):
        return None
    return parsed.device_id, rest[1], rest[2]


def _same_id(decoded: str, topic_rid: str) -> None:
    if decoded != topic_rid:
        raise p.ProtocolError(f"recording id {decoded} differs from the topic's "
                              f"{topic_rid[:40]!r}")


def _is_uuid(text: str) -> bool:
    return len(text) == 36 and all(c in "0123456789abcdef-" for c in text)
