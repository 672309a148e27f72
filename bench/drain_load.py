"""Load generator of the ingest drain (bench/central_bench.py): simulated devices on MQTT.

One process, one paho MQTT 5 client per simulated device, each with that device's
certificate (the ACL lets a device publish only under its own ``er/v1/<id>/up/`` and
``to/``, and read its own ``down/``). The recordings are rows and files of a real device catalogue
(``tests/sync/uploadkit.Device``); the init carries the manifest the sync agent builds
from them (``sync.agent._manifest``), signed with the device key, and the messages are
the protocol's own encodings (``sync.protocol``).

``begin`` sends every init, as the agent does, and waits for each answer, which names
the ingest worker that took the upload (docs/PROTOCOL.md, "Routing"). ``queue`` then
publishes, QoS 1 and without waiting for central's answers, every chunk (each device its
recordings one after another, the devices interleaved) to that worker's routed topic,
and on request every fin; each phase is taken by the broker (every PUBACK in, none
refused, none without a subscriber) before the next begins. ``wait_stored`` follows the
acks on the devices' ``down/rec/+/ack`` (cumulative: one per recording and group commit)
and sends what the agent would: a recording's fin as soon as the acks say central holds
every byte, unless the backlog carried it; after a fin answered with bytes missing, or
an error answer, init; after an init, the chunks missing from its answer (``have``), or
fin. When no ack has come for ``IDLE_S`` every open recording sends init again (the
agent's ack timeout). ``verify`` checks the central catalogue rows and the stored
objects' sha256 against what was sent.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sync import protocol as p
from sync.agent import _manifest
from sync.central.catalogue import open_catalogue
from sync.pki import Pki
from tests.sync.uploadkit import Device

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 20.0
PUBLISH_WAIT_S = 120.0  # for one phase's PUBACKs
IDLE_S = 2.0  # no ack for this long: every open recording sends init again
MAX_INITS = 20  # rounds of init, chunks, fin for one recording before the drain fails
NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK reason (OASIS MQTT 5.0, 3.4.2.1)


class LoadError(Exception):
    """The drain did not complete or did not check out (message is one line)."""


@dataclass
class Upload:
    """One recording as the generator sends it, and what central answered."""

    device_id: str
    rid: str
    data: bytes
    sha256: str
    init: bytes
    sent: int = 0  # messages published for it
    # "queued" (the backlog), "send" (missing chunks sent again), "fin" or "init" (one
    # message out, waiting for its answer)
    phase: str = "queued"
    have: list[p.Range] = field(default_factory=list)  # what the acks say central holds
    route: str | None = None  # the worker the last init's answer named
    stored_s: float | None = None  # time.monotonic() of the first "stored" ack
    fins: int = 0  # fins sent
    resent_chunks: int = 0
    resent_inits: int = 0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def resent_fins(self) -> int:
        return max(self.fins - 1, 0)

    def fin(self) -> bytes:
        return p.Fin(self.rid, self.size, self.sha256).encode()


@dataclass
class _Link:
    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    max_packet: int | None = None


class LoadGenerator:
    """Simulated devices publishing their backlog at once and following central's acks."""

    def __init__(self, devices: Sequence[Device], pki: Pki, host: str, port: int) -> None:
        self.devices = {d.device_id: d for d in devices}
        self.host, self.port = host, port
        self.uploads: dict[str, Upload] = {}
        self._acks: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        self._puback_problems: list[str] = []
        self._lock = threading.Lock()
        self._links = {d.device_id: self._client(d.device_id, pki) for d in devices}
        self.chunk_bytes = 0

    def _client(self, device_id: str, pki: Pki) -> _Link:
        cred = pki.clients[device_id]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=mqtt.MQTTv5, userdata=device_id)
        client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(cred.cert),
                       keyfile=str(cred.key))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return _Link(client)

    # --- network (paho's threads) ------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, device_id: str, _f: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused %s: %s", device_id, reason)
            return
        link = self._links[device_id]
        link.max_packet = getattr(properties, "MaximumPacketSize", None)
        client.subscribe(f"{p.device_prefix(device_id)}/down/rec/+/ack", qos=1)
        link.connected.set()

    def _on_subscribe(self, _c: mqtt.Client, device_id: str, _mid: int,
                      reasons: list[ReasonCode], _p: Properties | None) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error("%s: ack subscription refused: %s", device_id, reasons)
            return
        self._links[device_id].subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._acks.put((time.monotonic(), message.topic, bytes(message.payload)))

    def _on_publish(self, _c: mqtt.Client, device_id: str, mid: int, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.is_failure or reason.value == NO_MATCHING_SUBSCRIBERS:
            with self._lock:
                self._puback_problems.append(f"{device_id} mid {mid}: {reason}")

    # --- set-up --------------------------------------------------------------------------
    def connect(self) -> None:
        """Every device connected and subscribed to its acks."""
        for link in self._links.values():
            link.client.connect_async(self.host, self.port, keepalive=60, clean_start=True)
            link.client.loop_start()
        for device_id, link in self._links.items():
            if not (link.connected.wait(CONNECT_WAIT_S) and link.subscribed.wait(CONNECT_WAIT_S)):
                raise LoadError(f"{device_id}: not connected and subscribed within "
                                f"{CONNECT_WAIT_S:g} s")
        topic_bytes = max(len(p.routed_topic(d, "w" * 64, "0" * 36, "chunk").encode())
                          for d in self.devices)
        configured = min(d.config.sync.chunk_kib * p.KIB for d in self.devices.values()
                         if d.config.sync is not None)
        max_packet = min((link.max_packet for link in self._links.values()
                          if link.max_packet is not None), default=None)
        self.chunk_bytes = p.chunk_size(configured, topic_bytes, max_packet)

    def add(self, device: Device, rid: str, data: bytes) -> Upload:
        """An upload of the device's catalogued recording ``rid`` whose file holds ``data``,
        with the init the agent would send."""
        row = device.recording(rid)
        call = device.catalogue.get_call(str(row["call_id"])) or {}
        manifest = _manifest(device.device_id, row, call)
        init = p.Init(rid, int(row["size"]), str(row["sha256"]), self.chunk_bytes, manifest,
                      device.key.sign(p.manifest_bytes(manifest)))
        upload = Upload(device.device_id, rid, data, init.sha256, init.encode())
        self.uploads[rid] = upload
        return upload

    # --- the backlog -------------------------------------------------------------------------
    def begin(self, uploads: Sequence[Upload], timeout_s: float) -> int:
        """Every init, answered (the workers are running): each upload learns its worker;
        the messages sent."""
        count = self._phase([(u, "init", u.init) for u in uploads])
        deadline = time.monotonic() + timeout_s
        waiting = {u.rid for u in uploads}
        while waiting:
            try:
                _, topic, payload = self._acks.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadError(f"{len(waiting)} inits not answered within {timeout_s:g} s") \
                    from None
            ack = p.decode_ack(payload)
            upload = self.uploads.get(ack.recording_id)
            if upload is None or ack.state != p.PARTIAL or ack.error is not None:
                raise LoadError(f"init answered {ack} on {topic}")
            upload.route = ack.worker
            waiting.discard(upload.rid)
        return count

    def queue(self, uploads: Sequence[Upload], *, fins: bool = False) -> int:
        """Every chunk (each device its recordings one after another), then with ``fins``
        every fin into the broker, routed as :meth:`begin` learned; the messages sent."""
        count = 0
        streams = [[(u, "chunk", p.encode_chunk(u.rid, start, u.data[start:end]))
                    for u in uploads if u.device_id == device_id
                    for start, end in p.split_ranges([(0, u.size)], self.chunk_bytes)]
                   for device_id in self.devices]
        chunks = [m for ranked in itertools.zip_longest(*streams) for m in ranked if m]
        count += self._phase(chunks)
        if fins:
            count += self._phase([(u, "fin", u.fin()) for u in uploads])
            for upload in uploads:
                upload.phase, upload.fins = "fin", 1
        return count

    def _phase(self, messages: list[tuple[Upload, str, bytes]]) -> int:
        infos = [self._send(upload, leaf, payload) for upload, leaf, payload in messages]
        deadline = time.monotonic() + PUBLISH_WAIT_S
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise LoadError(f"PUBACK {info.mid} not received within {PUBLISH_WAIT_S:g} s")
        with self._lock:
            if self._puback_problems:
                raise LoadError(f"{len(self._puback_problems)} publishes not taken: "
                                f"{self._puback_problems[0]}")
        return len(infos)

    def _send(self, upload: Upload, leaf: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        upload.sent += 1
        if leaf == "init" or upload.route is None:
            topic = p.rec_topic(upload.device_id, "up", upload.rid, leaf)
        else:
            topic = p.routed_topic(upload.device_id, upload.route, upload.rid, leaf)
        info = self._links[upload.device_id].client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LoadError(f"{topic}: publish failed: {mqtt.error_string(info.rc)}")
        return info

    # --- the drain ----------------------------------------------------------------------
    def wait_stored(self, uploads: Sequence[Upload], timeout_s: float) -> float:
        """Follow the acks until every upload is stored, sending what the agent would;
        the time.monotonic() of the last "stored" ack."""
        deadline = time.monotonic() + timeout_s
        open_ = {u.rid: u for u in uploads if u.stored_s is None}
        while open_:
            try:
                received_s, topic, payload = self._acks.get(timeout=IDLE_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise LoadError(f"{len(open_)} recordings not stored within "
                                    f"{timeout_s:g} s") from None
                for upload in open_.values():
                    self._next(upload, None)  # an answer went missing: as the agent
                continue
            upload, ack = self._ack(received_s, topic, payload)
            if upload.rid not in open_:
                continue
            if upload.stored_s is not None:
                del open_[upload.rid]
            else:
                self._next(upload, ack)
        return max(u.stored_s for u in uploads if u.stored_s is not None)

    def _ack(self, received_s: float, topic: str, payload: bytes) -> tuple[Upload, p.Ack]:
        ack = p.decode_ack(payload)
        upload = self.uploads.get(ack.recording_id)
        if upload is None or not topic.startswith(p.device_prefix(upload.device_id) + "/"):
            raise LoadError(f"ack on {topic}: not an upload of this generator")
        if ack.worker is not None:
            upload.route = ack.worker
        if ack.state == p.REJECTED and ack.error in p.FATAL_ERRORS:
            raise LoadError(f"{upload.device_id} {upload.rid}: rejected: {ack.error} "
                            f"{ack.detail}")
        if ack.state == p.STORED:
            if (ack.size, ack.sha256) != (upload.size, upload.sha256):
                raise LoadError(f"{upload.rid}: stored with size {ack.size} sha256 "
                                f"{ack.sha256}, sent {upload.size} {upload.sha256}")
            if upload.stored_s is None:
                upload.stored_s = received_s
        elif ack.state == p.PARTIAL and ack.error is None and upload.phase in ("queued",
                                                                                "send"):
            upload.have = p.merge_ranges([*upload.have, *ack.have])
        return upload, ack

    def _next(self, upload: Upload, ack: p.Ack | None) -> None:
        """What the agent sends next for an upload not yet stored, on ``ack`` (None: no
        answer came for IDLE_S, the agent's ack timeout). While chunks are out: fin as
        soon as the acks say central holds every byte. An error, a fin answered with
        bytes missing, or silence: init. The answer to an init: the chunks it lacks, or
        fin."""
        if ack is None or ack.error is not None or ack.state == p.REJECTED or (
                upload.phase == "fin" and p.missing_ranges(upload.size, ack.have)):
            if upload.resent_inits >= MAX_INITS:
                raise LoadError(f"{upload.device_id} {upload.rid}: not stored after "
                                f"{MAX_INITS} rounds of init, chunks and fin; central "
                                f"answers {ack}")
            self._step(upload, "init")
            return
        if upload.phase in ("queued", "send"):
            if not p.missing_ranges(upload.size, upload.have):
                self._step(upload, "fin")
            return
        if upload.phase == "init":
            upload.have = ack.have
            if p.missing_ranges(upload.size, ack.have):
                self._send_missing(upload, ack.have)
            else:
                self._step(upload, "fin")

    def _send_missing(self, upload: Upload, have: list[p.Range]) -> None:
        upload.phase = "send"
        for start, end in p.split_ranges(p.missing_ranges(upload.size, have),
                                         self.chunk_bytes):
            self._send(upload, "chunk", p.encode_chunk(upload.rid, start,
                                                       upload.data[start:end]))
            upload.resent_chunks += 1

    def _step(self, upload: Upload, leaf: str) -> None:
        if leaf == "fin":
            upload.fins += 1
            self._send(upload, "fin", upload.fin())
        else:
            upload.resent_inits += 1
            upload.route = None  # until the answer names a worker
            self._send(upload, "init", upload.init)
        upload.phase = leaf

    # --- checks --------------------------------------------------------------------------
    def verify(self, uploads: Sequence[Upload], catalogue_url: str, store_dir: Path) -> None:
        """Every upload has its catalogue row (device, size, sha256) and its object file
        with that sha256."""
        catalogue = open_catalogue(catalogue_url)
        try:
            for upload in uploads:
                row = catalogue.get_recording(upload.rid)
                if row is None or (row.device_id, row.size, row.sha256) != \
                        (upload.device_id, upload.size, upload.sha256):
                    raise LoadError(f"{upload.device_id} {upload.rid}: catalogue row {row}")
                digest = hashlib.sha256((store_dir / row.object_path).read_bytes())
                if digest.hexdigest() != upload.sha256:
                    raise LoadError(f"{upload.rid}: object {row.object_path} has sha256 "
                                    f"{digest.hexdigest()}")
        finally:
            catalogue.close()

    def close(self) -> None:
        for link in self._links.values():
            link.client.disconnect()
            link.client.loop_stop()
