"""The sync agent: `edge-recorder sync --config FILE`, its own process beside the recorder.

It drains the catalogue's outbox to the central store over MQTT 5 and TLS with the
device's client certificate (docs/PROTOCOL.md, "Upload protocol" and "Audit upload").
A recording is marked synced only when central answers ``stored`` (sha256 verified,
fsynced); a broker's PUBACK means nothing here. The agent deletes nothing: retention
(firmware/retention.py) does, once ``synced_at`` is set.

Threads: paho's network thread (``loop_start``) only turns callbacks into events on a
queue; the agent's main thread does everything else (catalogue, files, publishing).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.clock import Clock, SystemClock
from firmware.audit import GENESIS_HEX
from firmware.catalogue import Catalogue, iso_utc_ms, outbox_bell_path
from firmware.config import Config, Sync
from firmware.keys import key_id, load_or_create_signing_key
from firmware.policyfile import parse_public_key
from sync import protocol as p

log = logging.getLogger(__name__)

TICK_S = 0.25  # the main loop wakes at least this often (timeouts, heartbeats)
OUTBOX_POLL_S = 0.25  # look for new outbox items this often (part of the close-to-stored latency)
MAX_TIMEOUT_DOUBLINGS = 5  # ack timeout grows to at most 32x while central stays silent
REJECTED_RETRY_S = 3600.0  # a rejected item is tried again after an hour
# After a receipt that fails its signature, audit batches wait this long: central's key
# will not change by itself, and each rejection is an audit entry of its own.
RECEIPT_REJECTED_RETRY_S = 300.0
AUDIT_MIN_INTERVAL_S = 2.0  # at most one audit batch in flight, this far apart
AUDIT_BATCH_ENTRIES = 500


class SyncError(Exception):
    """The agent cannot start (message is one line)."""


class ControlLike(Protocol):
    """sync/control.py's ControlPlane, as the agent uses it."""

    def will(self) -> tuple[str, bytes, int, bool]: ...
    def birth(self) -> list[tuple[str, bytes, int, bool]]: ...
    def heartbeat_due(self, now_monotonic: float) -> list[tuple[str, bytes, int, bool]]: ...
    def subscriptions(self) -> list[tuple[str, int]]: ...
    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes, int, bool]]: ...


def backoff_s(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": half fixed, half random, so a fleet
    that lost the broker together does not come back together."""
    ceiling = min(max_s, min_s * 2 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class Upload:
    """One recording on its way; everything here can be rebuilt by sending init again."""

    outbox_id: int
    recording_id: str
    path: Path
    size: int
    sha256: str
    init: bytes
    phase: str = "init"  # init (waiting for central's ranges) | send | fin
    have: list[p.Range] = field(default_factory=list)
    todo: deque[p.Range] = field(default_factory=deque)
    inflight: dict[int, int] = field(default_factory=dict)  # offset -> end
    last_progress_s: float = 0.0
    timeouts: int = 0
    route: str | None = None  # the ingest worker that acked: chunks and fin go to it

    def topic(self, device_id: str, leaf: str) -> str:
        if self.route is None:
            return p.rec_topic(device_id, "up", self.recording_id, leaf)
        return p.routed_topic(device_id, self.route, self.recording_id, leaf)


@dataclass
class _Link:
    """What the network thread reported last."""

    connected: bool = False
    connections: int = 0
    max_packet: int | None = None
    receive_max: int | None = None
    failures: int = 0


class SyncAgent:
    def __init__(self, config: Config, *, clock: Clock | None = None,
                 stop: threading.Event | None = None) -> None:
        if config.sync is None:
            raise SyncError(f"{config.source}: sync: the [sync] table is missing")
        self.config = config
        self.settings: Sync = config.sync
        self.clock = clock or SystemClock()
        self.stop_event = stop or threading.Event()
        self.device_id = config.device_id
        self.link = _Link()
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._rng = random.Random()  # noqa: S311 (jitter, not secrets)
        self._catalogue: Catalogue | None = None
        self._key: Ed25519PrivateKey | None = None
        self._central_key: Ed25519PublicKey | None = None
        if self.settings.central_public_key is not None:
            self._central_key = parse_public_key(self.settings.central_public_key)
        self._control: ControlLike | None = None
        self._client: mqtt.Client | None = None
        self.upload: Upload | None = None
        self._skip_until: dict[str, float] = {}
        self._erasures_sent: dict[str, float] = {}
        self._next_poll_s = 0.0
        self._bell: socket.socket | None = None
        self._audit_sent_s: float | None = None
        self._audit_next_s = 0.0
        self.chunk_bytes = p.DEFAULT_CHUNK_BYTES
        self.window = self.settings.window
        # workers whose routed topics answered nothing (an ACL that does not let them read
        # their to/ topics: mosquitto grants the filter and drops at delivery); uploads go
        # on the shared topics instead until the next connection
        self._unroutable: set[str] = set()

    # --- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        self._open()
        try:
            self._start_network()
            while not self.stop_event.is_set():
                self._drain_events(TICK_S)
                self._tick(self.clock.monotonic())
        finally:
            self._shutdown()
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        self._events.put(("wake",))

    def _open(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            path = self.config.resolve_path(getattr(self.settings, name))
            if not path.is_file():
                raise SyncError(f"{self.config.source}: sync.{name}: {path}: no such file")
        self._key = load_or_create_signing_key(self.config.device_key_path)
        self._catalogue = Catalogue(self.config.catalogue_path, clock=self.clock,
                                    device_id=self.device_id)
        self._control = self._load_control()
        self._open_bell()

    def _open_bell(self) -> None:
        """Listen on the outbox bell: the recorder rings it when it queues a recording, so
        an upload starts at once instead of at the next poll (which stays the fallback)."""
        path = outbox_bell_path(self.config.catalogue_path)
        bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            path.unlink(missing_ok=True)
            bell.bind(str(path))
        except OSError as exc:  # e.g. a path over the 107-byte limit of a socket address
            bell.close()
            log.info("outbox bell %s unavailable (%s); polling every %.2f s", path, exc,
                     OUTBOX_POLL_S)
            return
        self._bell = bell
        threading.Thread(target=self._bell_loop, args=(bell,), name="outbox-bell",
                         daemon=True).start()

    def _bell_loop(self, bell: socket.socket) -> None:
        with contextlib.suppress(OSError):  # closed at shutdown
            while bell.recv(64):
                self._events.put(("outbox",))

    def _load_control(self) -> ControlLike | None:
        try:
            from sync.control import ControlPlane  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            log.warning("fleet status and commands off: sync.control unavailable (%s)", exc)
            return None
        control: ControlLike = ControlPlane(self.config, self.config.catalogue_path,
                                            self.clock, self._key)
        return control

    def _shutdown(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        if self._control is not None and hasattr(self._control, "close"):
            self._control.close()
        if self._bell is not None:
            path = outbox_bell_path(self.config.catalogue_path)
            with contextlib.suppress(OSError):  # an empty datagram ends the bell thread
                self._bell.sendto(b"", str(path))
            self._bell.close()
            path.unlink(missing_ok=True)
        if self._catalogue is not None:
            self._catalogue.close()
        log.info("sync agent stopped")

    # --- network (paho's thread only queues events) ----------------------------------
    def _start_network(self) -> None:
        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(self.config.resolve_path(s.ca_file)),
                       certfile=str(self.config.resolve_path(s.cert_file)),
                       keyfile=str(self.config.resolve_path(s.key_file)))
        client.max_inflight_messages_set(2 * s.window + 16)
        client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_min_s)
        client.on_socket_open = _set_nodelay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        if self._control is not None:
            # before every connection attempt, reconnects included: the will must carry
            # the session the next birth announces, or a crash would never show offline
            client.on_pre_connect = self._set_will
        self._client = client
        client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=True)
        client.loop_start()

    def _set_will(self, client: mqtt.Client, _userdata: Any) -> None:
        assert self._control is not None
        topic, payload, qos, retain = self._control.will()
        client.will_set(topic, payload, qos, retain)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.settings.host,
                      self.settings.port, reason)
            return
        self.link.failures = 0
        client.reconnect_delay_set(self.settings.reconnect_min_s,
                                   self.settings.reconnect_min_s)
        topics = [(f"{p.device_prefix(self.device_id)}/down/rec/+/ack", 1),
                  (f"{p.device_prefix(self.device_id)}/down/audit/receipt", 1),
                  (f"{p.device_prefix(self.device_id)}/down/erasure/ack", 1)]
        if self._control is not None:
            topics += self._control.subscriptions()
        client.subscribe(topics)
        max_packet = getattr(properties, "MaximumPacketSize", None)
        receive_max = getattr(properties, "ReceiveMaximum", None)
        self._events.put(("connected", max_packet, receive_max))

    def _on_connect_fail(self, client: mqtt.Client, _u: Any) -> None:
        self._set_backoff(client)
        self._events.put(("connect_failed",))

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                       _p: Properties | None) -> None:
        self._set_backoff(client)
        self._events.put(("disconnected", str(reason)))

    def _set_backoff(self, client: mqtt.Client) -> None:
        delay_s = backoff_s(self.link.failures, self.settings.reconnect_min_s,
                            self.settings.reconnect_max_s, self._rng)
        self.link.failures += 1
        client.reconnect_delay_set(delay_s, delay_s)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._events.put(("message", message.topic, bytes(message.payload)))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.value == 0x10:  # No matching subscribers: central is not listening
            self._events.put(("no_subscribers", mid))
        elif reason.is_failure:
            self._events.put(("publish_failed", mid, str(reason)))

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=qos, retain=retain)

    # --- events ----------------------------------------------------------------------
    def _drain_events(self, timeout_s: float) -> None:
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            self._handle_event(event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "connected":
            self._connected(event[1], event[2])
        elif kind == "disconnected":
            self.link.connected = False
            log.warning("disconnected from the broker (%s); uploads wait", event[1])
        elif kind == "connect_failed":
            log.info("broker %s:%d unreachable; retrying", self.settings.host,
                     self.settings.port)
        elif kind == "message":
            self._message(event[1], event[2])
        elif kind == "outbox":
            self._next_poll_s = 0.0  # new work: look at the outbox on this tick
        elif kind == "no_subscribers":
            upload = self.upload
            if upload is not None and upload.route is not None:
                log.info("recording %s: worker %s is gone (PUBACK 0x10); asking again",
                         upload.recording_id, upload.route)
                self._send_init(upload)  # any worker answers, and names itself
            else:
                log.debug("central is not subscribed (PUBACK 0x10); waiting for it")
        elif kind == "publish_failed":
            log.warning("publish refused by the broker: %s", event[2])

    def _connected(self, max_packet: int | None, receive_max: int | None) -> None:
        self.link.connected = True
        self.link.connections += 1
        self._unroutable.clear()
        self.link.max_packet, self.link.receive_max = max_packet, receive_max
        # the longest chunk topic: routed to a worker id of the longest kind
        topic_bytes = len(p.routed_topic(self.device_id, "w" * 64, "0" * 36, "chunk").encode())
        try:
            self.chunk_bytes = p.chunk_size(self.settings.chunk_kib * p.KIB, topic_bytes,
                                            max_packet)
        except p.ProtocolError as exc:
            log.error("%s; using %d-byte chunks", exc, p.MIN_CHUNK_BYTES)
            self.chunk_bytes = p.MIN_CHUNK_BYTES
        self.window = min(self.settings.window, receive_max or self.settings.window)
        log.info("connected to %s:%d (connection %d): chunks of %d bytes, window %d",
                 self.settings.host, self.settings.port, self.link.connections,
                 self.chunk_bytes, self.window)
        if self._control is not None:
            self._publish_all(self._control.birth())
        if self.upload is not None:
            self._send_init(self.upload)
        self._erasures_sent.clear()
        self._audit_sent_s = None

    def _message(self, topic: str, payload: bytes) -> None:
        prefix = f"{p.device_prefix(self.device_id)}/down/"
        rest = topic[len(prefix):] if topic.startswith(prefix) else ""
        try:
            if rest.startswith("rec/") and rest.endswith("/ack"):
                self._on_ack(p.decode_ack(payload), rest.split("/")[1])
            elif rest == "audit/receipt":
                self._on_receipt(p.decode_receipt(payload))
            elif rest == "erasure/ack":
                self._on_erasure_ack(p.decode_erasure_ack(payload))
            elif self._control is not None:
                self._publish_all(self._control.handle(topic, payload))
            else:
                log.warning("message on %s: not a topic the agent handles", topic[:120])
        except p.ProtocolError as exc:
            log.warning("message on %s refused: %s", topic[:120], exc)

    def _publish_all(self, messages: list[tuple[str, bytes, int, bool]]) -> None:
        if not self.link.connected:
            return
        for topic, payload, qos, retain in messages:
            self._publish(topic, payload, qos, retain)

    # --- the main loop's periodic work -----------------------------------------------
    def _tick(self, now_s: float) -> None:
        if self._control is not None:
            self._publish_all(self._control.heartbeat_due(now_s))
        if not self.link.connected:
            return
        if self.upload is not None:
            self._check_timeout(self.upload, now_s)
        if now_s >= self._next_poll_s:
            self._next_poll_s = now_s + OUTBOX_POLL_S
            if self.upload is None:
                self._start_next(now_s)
            self._send_erasures(now_s)
        self._send_audit(now_s)

    def _check_timeout(self, upload: Upload, now_s: float) -> None:
        limit_s = self.settings.ack_timeout_s * 2 ** min(upload.timeouts,
                                                          MAX_TIMEOUT_DOUBLINGS)
        if now_s - upload.last_progress_s < limit_s:
            return
        upload.timeouts += 1
        log.info("recording %s: no answer from central for %.1f s; sending init again",
                 upload.recording_id, limit_s)
        if upload.route is not None:
            self._unroutable.add(upload.route)
            log.warning("recording %s: nothing came back through worker %s; uploads use "
                        "the shared topics until the next connection", upload.recording_id,
                        upload.route)
        self._send_init(upload)

    def _pending(self) -> list[dict[str, Any]]:
        assert self._catalogue is not None
        return self._catalogue.outbox_pending()

    def _start_next(self, now_s: float) -> None:
        for item in self._pending():
            ref = str(item["ref"])
            if item["kind"] != "recording" or self._skip_until.get(ref, 0.0) > now_s:
                continue
            upload = self._prepare(item, now_s)
            if upload is not None:
                self.upload = upload
                self._send_init(upload)
                return

    # --- recordings ------------------------------------------------------------------
    def _prepare(self, item: dict[str, Any], now_s: float) -> Upload | None:
        assert self._catalogue is not None and self._key is not None
        rid = str(item["ref"])
        row = self._catalogue.get_recording(rid)
        # The file's hash is checked against the catalogue only when central finds a
        # mismatch (below): central verifies every upload anyway, and hashing 50 MB before
        # sending cost an eighth of the upload time.
        problem = _local_problem(row)
        if problem is not None or row is None:
            self._give_up(int(item["id"]), rid, "local", problem or "no recording row", now_s)
            return None
        call = self._catalogue.get_call(str(row["call_id"])) or {}
        manifest = _manifest(self.device_id, row, call)
        init = p.Init(rid, int(row["size"]), str(row["sha256"]), self.chunk_bytes, manifest,
                      self._key.sign(p.manifest_bytes(manifest)))
        return Upload(int(item["id"]), rid, Path(row["path"]), init.size, init.sha256,
                      init.encode())

    def _send_init(self, upload: Upload) -> None:
        upload.phase = "init"
        upload.route = None  # until the answer names a worker
        upload.todo.clear()
        upload.inflight.clear()
        upload.last_progress_s = self.clock.monotonic()
        self._publish(p.rec_topic(self.device_id, "up", upload.recording_id, "init"),
                      upload.init)

    def _on_ack(self, ack: p.Ack, topic_rid: str) -> None:
        upload = self.upload
        if ack.recording_id != topic_rid:
            raise p.ProtocolError(f"ack: recording_id differs from the topic's {topic_rid!r}")
        if upload is None or upload.recording_id != ack.recording_id:
            log.debug("ack for %s: not the upload in progress; ignored", ack.recording_id)
            return
        upload.last_progress_s = self.clock.monotonic()
        upload.timeouts = 0
        if ack.state == p.STORED:
            self._on_stored(upload, ack)
        elif ack.state == p.REJECTED:
            self._on_rejected(upload, ack)
        else:
            self._on_partial(upload, ack)

    def _on_partial(self, upload: Upload, ack: p.Ack) -> None:
        upload.have = ack.have
        if ack.worker is not None and ack.worker not in self._unroutable:
            upload.route = ack.worker  # the worker holding the upload: chunks go to it
        if ack.error == "no_init":
            self._send_init(upload)
            return
        if upload.phase == "init" or ack.error == "sha256_mismatch":
            if ack.error == "sha256_mismatch":
                local = _hash_problem(upload.path, upload.size, upload.sha256)
                if local is not None:  # the file here changed: sending again cannot help
                    self._give_up(upload.outbox_id, upload.recording_id, "local", local,
                                  self.clock.monotonic())
                    return
                log.warning("recording %s: central's copy failed its sha256; sending again",
                            upload.recording_id)
            upload.phase = "send"
            upload.inflight.clear()
            upload.todo = deque(p.split_ranges(p.missing_ranges(upload.size, upload.have),
                                               self.chunk_bytes))
        for offset, end in list(upload.inflight.items()):
            if p.covered(upload.have, (offset, end)):
                del upload.inflight[offset]
        if ack.error == "bad_chunk" and ack.bad_offset in upload.inflight:
            end = upload.inflight.pop(ack.bad_offset)
            upload.todo.appendleft((ack.bad_offset, end))
            log.warning("recording %s: chunk at %d damaged on the way; sending it again",
                        upload.recording_id, ack.bad_offset)
        self._pump(upload)

    def _pump(self, upload: Upload) -> None:
        """Fill the window; send fin once central holds every byte."""
        if upload.phase != "send":
            return
        while upload.todo and len(upload.inflight) < self.window:
            start, end = upload.todo.popleft()
            if p.covered(upload.have, (start, end)):
                continue
            self._send_chunk(upload, start, end)
        if upload.todo or upload.inflight:
            return
        if p.missing_ranges(upload.size, upload.have):
            self._send_init(upload)  # central lost something we sent: ask again
            return
        upload.phase = "fin"
        fin = p.Fin(upload.recording_id, upload.size, upload.sha256)
        self._publish(upload.topic(self.device_id, "fin"), fin.encode())

    def _send_chunk(self, upload: Upload, start: int, end: int) -> None:
        fd = os.open(upload.path, os.O_RDONLY | os.O_CLOEXEC)  # (a file object per chunk
        try:  # cost more than the read)
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        if len(data) != end - start:
            log.error("recording %s: %s is shorter than its catalogued size",
                      upload.recording_id, upload.path)
            self._give_up(upload.outbox_id, upload.recording_id, "local", "file shrank",
                          self.clock.monotonic())
            return
        upload.inflight[start] = end
        self._publish(upload.topic(self.device_id, "chunk"),
                      p.encode_chunk(upload.recording_id, start, data))

    def _on_stored(self, upload: Upload, ack: p.Ack) -> None:
        if ack.sha256 != upload.sha256 or ack.size != upload.size:
            log.error("recording %s: central stored sha256 %s size %s, ours is %s size %d; "
                      "not marking it synced", upload.recording_id, ack.sha256, ack.size,
                      upload.sha256, upload.size)
            self._give_up(upload.outbox_id, upload.recording_id, "central",
                          "stored content differs", self.clock.monotonic())
            return
        assert self._catalogue is not None
        with self._catalogue.transaction() as tx:
            tx.update_outbox(upload.outbox_id, state="stored")
            tx.update_recording(upload.recording_id,
                                synced_at=iso_utc_ms(self.clock.wall()))
            tx.audit("sync.stored", upload.recording_id, sha256=upload.sha256,
                     size=upload.size)
        log.info("recording %s: stored by central (%d bytes)", upload.recording_id,
                 upload.size)
        self.upload = None
        self._next_poll_s = 0.0

    def _on_rejected(self, upload: Upload, ack: p.Ack) -> None:
        if ack.error in p.FATAL_ERRORS:
            self._give_up(upload.outbox_id, upload.recording_id, "central",
                          f"{ack.error}: {ack.detail}", self.clock.monotonic())
            return
        log.warning("recording %s: central refused for now (%s); retrying",
                    upload.recording_id, ack.error)
        upload.last_progress_s = self.clock.monotonic()
        upload.phase = "init"

    def _give_up(self, outbox_id: int, rid: str, where: str, error: str, now_s: float) -> None:
        """Keep the item pending with its error; try again after REJECTED_RETRY_S."""
        assert self._catalogue is not None
        log.error("recording %s: not uploaded (%s: %s); trying again in %.0f s", rid, where,
                  error, REJECTED_RETRY_S)
        with self._catalogue.transaction() as tx:
            tx.update_outbox(outbox_id, state="pending", error=f"{where}: {error}"[:500])
            tx.audit("sync.refused", rid, where=where, error=error[:500])
        self._skip_until[rid] = now_s + REJECTED_RETRY_S
        if self.upload is not None and self.upload.recording_id == rid:
            self.upload = None

    # --- erasure ---------------------------------------------------------------------
    def _send_erasures(self, now_s: float) -> None:
        assert self._catalogue is not None
        due = [item for item in self._pending() if item["kind"] == "erasure"
               and now_s - self._erasures_sent.get(str(item["ref"]), -1e9)
               >= self.settings.ack_timeout_s]
        for item in due:
            rid = str(item["ref"])
            row = self._catalogue.get_recording(rid) or {}
            request = p.Erasure(rid, str(row.get("erase_reason") or "erased"),
                                str(row.get("deleted_at") or ""))
            self._publish(f"{p.device_prefix(self.device_id)}/up/erasure", request.encode())
            self._erasures_sent[rid] = now_s

    def _on_erasure_ack(self, ack: p.ErasureAck) -> None:
        assert self._catalogue is not None
        for item in self._pending():
            if item["kind"] == "erasure" and item["ref"] == ack.recording_id:
                with self._catalogue.transaction() as tx:
                    tx.update_outbox(int(item["id"]), state="stored")
                    tx.audit("sync.erased", ack.recording_id)
                log.info("recording %s: central confirmed the erasure", ack.recording_id)
        self._erasures_sent.pop(ack.recording_id, None)

    # --- audit -----------------------------------------------------------------------
    def _send_audit(self, now_s: float) -> None:
        assert self._catalogue is not None
        if now_s < self._audit_next_s:
            return
        if self._audit_sent_s is not None and now_s - self._audit_sent_s < \
                self.settings.ack_timeout_s:
            return
        after = self._catalogue.receipt_count()
        batch = self._audit_batch(after)
        if batch is None:
            self._audit_next_s = now_s + AUDIT_MIN_INTERVAL_S
            return
        self._publish(f"{p.device_prefix(self.device_id)}/up/audit/batch", batch)
        self._audit_sent_s = now_s
        self._audit_next_s = now_s + AUDIT_MIN_INTERVAL_S

    def _audit_batch(self, after: int) -> bytes | None:
        """Entries after ``after`` that fit in one chunk-sized message, with checkpoints."""
        assert self._catalogue is not None
        entries = self._catalogue.audit_entries(after, AUDIT_BATCH_ENTRIES)
        if not entries:
            return None
        start_hash = entries[0].prev_hash
        checkpoints = self._catalogue.checkpoints(after)
        while entries:
            last = entries[-1].seq
            batch = p.AuditBatch(after, start_hash, entries,
                                 [c for c in checkpoints if c.count <= last]).encode()
            if len(batch) <= self.chunk_bytes or len(entries) == 1:
                return batch
            entries = entries[: len(entries) // 2]
        return None

    def _on_receipt(self, receipt: p.Receipt) -> None:
        assert self._catalogue is not None
        self._audit_sent_s = None
        entries = self._catalogue.audit_entries(receipt.count - 1, 1) if receipt.count else []
        ours = entries[0].hash if entries else GENESIS_HEX
        if receipt.count > self._catalogue.head().count or ours != receipt.head_hash:
            log.error("audit receipt for %d entries names head %s, which is not ours; "
                      "central's copy of the trail differs", receipt.count, receipt.head_hash)
            return
        problem = self._receipt_problem(receipt)
        if problem is not None:
            self._reject_receipt(receipt, problem)
            return
        if receipt.error is not None:
            log.info("audit: central holds %d entries (%s)", receipt.count, receipt.error)
        if receipt.count > self._catalogue.receipt_count():
            with self._catalogue.transaction() as tx:
                tx.insert_audit_receipt(receipt.count, receipt.head_hash, receipt.key_id,
                                        receipt.signature, iso_utc_ms(self.clock.wall()))
        self._audit_next_s = 0.0

    def _receipt_problem(self, receipt: p.Receipt) -> str | None:
        """Why the receipt's signature does not hold with ``sync.central_public_key``;
        None when it does, or when no key is configured (receipts kept unverified)."""
        if self._central_key is None:
            return None
        return receipt_problem(receipt, self.device_id, self._central_key)

    def _reject_receipt(self, receipt: p.Receipt, problem: str) -> None:
        assert self._catalogue is not None
        log.error("audit receipt for %d entries rejected: %s; audit upload waits %.0f s",
                  receipt.count, problem, RECEIPT_REJECTED_RETRY_S)
        with self._catalogue.transaction() as tx:
            tx.audit("sync.receipt_rejected", self.device_id, count=receipt.count,
                     head_hash=receipt.head_hash, key_id=receipt.key_id, reason=problem)
        self._audit_next_s = self.clock.monotonic() + RECEIPT_REJECTED_RETRY_S


def receipt_problem(receipt: p.Receipt, device_id: str,
                    central_key: Ed25519PublicKey) -> str | None:
    """None if ``receipt`` is signed by ``central_key`` for ``device_id``, else why not."""
    expected_id = key_id(central_key)
    if receipt.key_id != expected_id:
        return f"signed by key {receipt.key_id[:16]!r}, not the configured central key " \
               f"{expected_id}"
    try:
        signature = base64.b64decode(receipt.signature, validate=True)
        central_key.verify(signature, p.receipt_body(device_id, receipt.count,
                                                     receipt.head_hash))
    except (binascii.Error, ValueError, InvalidSignature):
        return f"signature does not verify with central key {expected_id}"
    return None


# --- pure helpers --------------------------------------------------------------------
def _manifest(device_id: str, row: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    return {"recording_id": row["id"], "call_id": row["call_id"], "segment": row["segment"],
            "device_id": device_id, "line_id": row["line_id"],
            "direction": call.get("direction"), "started_at": call.get("started_at"),
            "created_at": row["created_at"], "audio_s": row["audio_s"],
            "decision": call.get("decision"), "retention_until": row["retention_until"],
            "codec": row["codec"], "size": int(row["size"]), "sha256": row["sha256"],
            "numbers": _manifest_numbers(call)}


def _manifest_numbers(call: dict[str, Any]) -> dict[str, Any]:
    """The call's numbers for central's search, as the policy's ``audit_numbers`` says.

    "clear": the numbers themselves. "commitment" (the default): the audit trail's HMAC
    commitments and the call's salt, so central can test a number it is asked about
    (docs/CENTRAL.md, "Search"); erasing central's row erases the salt with it.
    """
    from firmware.recorder import commitment

    caller, dialed, salt = call.get("caller_number"), call.get("dialed_number"), call.get("salt")
    if _audit_numbers(call.get("decision")) == "clear":
        return {"audit_numbers": "clear", "caller": caller or None, "dialed": dialed or None}
    if not salt:
        return {"audit_numbers": "commitment", "salt": None, "caller": None, "dialed": None}
    return {"audit_numbers": "commitment", "salt": salt, "caller": commitment(salt, caller),
            "dialed": commitment(salt, dialed)}


def _audit_numbers(decision: Any) -> str:
    try:
        value = json.loads(decision)["audit_numbers"] if decision else "commitment"
    except (ValueError, TypeError, KeyError):
        return "commitment"
    return "clear" if value == "clear" else "commitment"


def _local_problem(row: dict[str, Any] | None) -> str | None:
    if row is None:
        return "no recording row"
    if row["deleted_at"]:
        return "recording was deleted"
    if row["state"] == "recording" or row["size"] is None or not row["sha256"]:
        return "recording is not closed"
    return None


def _hash_problem(path: Path, size: int, sha256: str) -> str | None:
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256")
            length = handle.tell()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if length != size or digest.hexdigest() != sha256:
        return f"{path}: size or sha256 differs from the catalogue"
    return None


def _set_nodelay(_client: mqtt.Client, _u: Any, sock: Any) -> None:
    """Without TCP_NODELAY each stop-and-wait message costs ~44 ms (Nagle + delayed ACK)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_agent(config_path: Path) -> int:
    """`edge-recorder sync --config FILE`: run until SIGTERM or SIGINT."""
    from firmware.config import load_config

    agent = SyncAgent(load_config(config_path))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _n, _f: agent.stop())
    return agent.run()
