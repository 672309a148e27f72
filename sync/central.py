"""A minimal central store: the other end of the upload protocol (docs/PROTOCOL.md).

``python -m sync.central --dir DIR --host H --port P --ca CA --cert CRT --key KEY
--devices DIR --signing-key FILE`` subscribes ``er/v1/+/up/#`` with a persistent session
(clean start off, session expiry) so QoS 1 messages queue at the broker while it is
briefly away. Per device it keeps, under ``DIR/<device_id>/``:

    <recording>.part        the upload being assembled (chunks written at their offsets)
    <recording>.state.json  init, the byte ranges held, state partial|stored (fsynced)
    <recording>.rec         the stored recording (sha256 verified, fsynced, renamed)
    <recording>.manifest.json  the signed manifest
    audit.jsonl, audit.head.json, checkpoints.jsonl   the device's audit trail
    erasures.jsonl          erasure requests received

Every answer states what is durably on disk, so a device can resume from it; every
message is idempotent. Callbacks run on paho's network thread, one at a time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware.audit import GENESIS_HEAD, ChainHead, verify_entries
from firmware.fsutil import atomic_write, fsync_dir, make_dirs
from firmware.keys import KeyFileError, key_id, load_or_create_signing_key, load_public_key
from sync import protocol as p

log = logging.getLogger(__name__)

CLIENT_ID = "central"  # the certificate CN the ACL grants er/v1/+/up/# (sync/mosquitto/acl)
SESSION_EXPIRY_S = 24 * 3600  # the broker keeps our subscription and queue this long
KEEPALIVE_S = 30
STATE_SUFFIX, PART_SUFFIX, REC_SUFFIX = ".state.json", ".part", ".rec"
HASH_BLOCK_BYTES = 1024 * 1024
DIR_MODE, FILE_MODE = 0o700, 0o600


@dataclass
class UploadState:
    init: dict[str, Any]
    have: list[p.Range] = field(default_factory=list)
    state: str = p.PARTIAL

    @property
    def size(self) -> int:
        return int(self.init["size"])

    @property
    def sha256(self) -> str:
        return str(self.init["sha256"])

    def to_json(self) -> bytes:
        return json.dumps({"init": self.init, "have": [list(r) for r in self.have],
                           "state": self.state}).encode()


@dataclass
class Stats:
    """Counters for tests and benchmarks."""

    chunk_bytes: int = 0  # data bytes of every chunk received, duplicates included
    chunks: int = 0
    stored: int = 0
    refused: int = 0  # messages answered with an error or dropped as malformed


class CentralStore:
    """The ingest: file handling and answers; MQTT is :class:`CentralClient`'s."""

    def __init__(self, directory: Path, devices_dir: Path, signing_key: Ed25519PrivateKey) -> None:
        self.directory = directory
        self.devices_dir = devices_dir
        self.key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.stats = Stats()
        self._uploads: dict[tuple[str, str], UploadState] = {}
        make_dirs(directory, DIR_MODE)

    # --- dispatch ----------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
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
            return []

    def _dispatch(self, topic: p.Topic, payload: bytes) -> list[tuple[str, bytes]]:
        device, rest = topic.device_id, topic.rest
        if len(rest) == 3 and rest[0] == "rec":
            handler = {"init": self._init, "chunk": self._chunk, "fin": self._fin}.get(rest[2])
            if handler is None:
                raise p.ProtocolError(f"rec/{rest[2][:20]}: unknown message")
            ack = handler(device, rest[1], payload)
            return [(p.rec_topic(device, "down", ack.recording_id, "ack"), ack.encode())]
        if rest == ("audit", "batch"):
            receipt = self._audit(device, p.decode_audit_batch(payload))
            return [(f"{p.device_prefix(device)}/down/audit/receipt", receipt.encode())]
        if rest == ("erasure",):
            done = self._erasure(device, p.decode_erasure(payload))
            return [(f"{p.device_prefix(device)}/down/erasure/ack", done.encode())]
        log.debug("%s/up/%s: not an upload message; ignored", device, "/".join(rest)[:80])
        return []

    def _error_answer(self, topic: str, payload: bytes,
                      exc: p.ProtocolError) -> list[tuple[str, bytes]]:
        """A rejected/partial ack when the message names a recording we can answer for."""
        try:
            parsed = p.parse_topic(topic)
        except p.ProtocolError:
            return []
        rest = parsed.rest
        if len(rest) != 3 or rest[0] != "rec" or not _is_uuid(rest[1]):
            return []
        rid, device = rest[1], parsed.device_id
        state = self._load(device, rid)
        have = state.have if state else []
        if exc.code in p.FATAL_ERRORS or rest[2] == "init":
            ack = p.Ack(rid, p.REJECTED, have, error=exc.code, detail=str(exc))
        else:
            bad = p.chunk_offset(payload) if rest[2] == "chunk" else None
            ack = p.Ack(rid, p.PARTIAL, have, error=exc.code, detail=str(exc), bad_offset=bad)
        return [(p.rec_topic(device, "down", rid, "ack"), ack.encode())]

    # --- recordings --------------------------------------------------------------------
    def _init(self, device: str, rid: str, payload: bytes) -> p.Ack:
        init = p.decode_init(payload)
        _same_id(init.recording_id, rid)
        if init.manifest.get("device_id") != device:
            raise p.ProtocolError("init: manifest device_id is not the sender", "bad_signature")
        self._verify_manifest(device, init)
        state = self._load(device, rid)
        if state is not None and state.state == p.STORED:
            if state.sha256 != init.sha256 or state.size != init.size:
                raise p.ProtocolError(f"recording {rid}: stored with another sha256",
                                      "conflict")
            return self._stored_ack(rid, state)
        if state is None or state.sha256 != init.sha256 or state.size != init.size:
            state = self._begin(device, rid, payload, init)
        return p.Ack(rid, p.PARTIAL, state.have)

    def _verify_manifest(self, device: str, init: p.Init) -> None:
        public = self._device_key(device)
        try:
            public.verify(init.manifest_sig, p.manifest_bytes(init.manifest))
        except InvalidSignature:
            raise p.ProtocolError(f"init {init.recording_id}: manifest signature does not "
                                  f"verify with {device}'s key", "bad_signature") from None

    def _device_key(self, device: str) -> Ed25519PublicKey:
        path = self.devices_dir / f"{device}.pub"
        try:
            return load_public_key(path)
        except KeyFileError as exc:
            raise p.ProtocolError(f"device {device}: no usable public key ({exc})",
                                  "unknown_device") from None

    def _begin(self, device: str, rid: str, payload: bytes, init: p.Init) -> UploadState:
        folder = self._folder(device)
        state = UploadState(json.loads(payload))
        with self._part(device, rid).open("wb") as handle:
            os.fsync(handle.fileno())
        fsync_dir(folder)
        self._save(device, rid, state)
        log.info("%s: upload %s begun (%d bytes)", device, rid, init.size)
        return state

    def _chunk(self, device: str, rid: str, payload: bytes) -> p.Ack:
        chunk = p.decode_chunk(payload)
        _same_id(chunk.recording_id, rid)
        self.stats.chunks += 1
        self.stats.chunk_bytes += len(chunk.data)
        state = self._load(device, rid)
        if state is None:
            return p.Ack(rid, p.PARTIAL, [], error="no_init")
        if state.state == p.STORED:
            return self._stored_ack(rid, state)
        if chunk.end > state.size:
            raise p.ProtocolError(f"chunk {rid}@{chunk.offset}: ends at {chunk.end}, after "
                                  f"the size {state.size}", "bad_chunk")
        if not p.covered(state.have, (chunk.offset, chunk.end)):
            fd = os.open(self._part(device, rid), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, chunk.data, chunk.offset)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            state.have = p.add_range(state.have, (chunk.offset, chunk.end))
            self._save(device, rid, state)
        return p.Ack(rid, p.PARTIAL, state.have)

    def _fin(self, device: str, rid: str, payload: bytes) -> p.Ack:
        fin = p.decode_fin(payload)
        _same_id(fin.recording_id, rid)
        state = self._load(device, rid)
        if state is None:
            return p.Ack(rid, p.PARTIAL, [], error="no_init")
        if state.state == p.STORED:
            return self._stored_ack(rid, state)
        if (fin.size, fin.sha256) != (state.size, state.sha256):
            raise p.ProtocolError(f"fin {rid}: size or sha256 differs from the init")
        if p.missing_ranges(state.size, state.have):
            return p.Ack(rid, p.PARTIAL, state.have)
        if _file_sha256(self._part(device, rid)) != state.sha256:
            log.error("%s: upload %s does not match its sha256; discarding it", device, rid)
            os.truncate(self._part(device, rid), 0)
            state.have = []
            self._save(device, rid, state)
            return p.Ack(rid, p.PARTIAL, [], error="sha256_mismatch")
        return self._store(device, rid, state)

    def _store(self, device: str, rid: str, state: UploadState) -> p.Ack:
        folder = self._folder(device)
        part, final = self._part(device, rid), folder / f"{rid}{REC_SUFFIX}"
        with part.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part, final)
        manifest = {"manifest": state.init["manifest"],
                    "manifest_sig": state.init["manifest_sig"]}
        atomic_write(folder / f"{rid}.manifest.json", json.dumps(manifest).encode(), FILE_MODE)
        state.state = p.STORED
        self._save(device, rid, state)  # fsyncs the directory, and the rename with it
        self.stats.stored += 1
        log.info("%s: recording %s stored (%d bytes, sha256 %s)", device, rid, state.size,
                 state.sha256)
        return self._stored_ack(rid, state)

    @staticmethod
    def _stored_ack(rid: str, state: UploadState) -> p.Ack:
        return p.Ack(rid, p.STORED, [(0, state.size)] if state.size else [], state.size,
                     state.sha256)

    # --- state files -------------------------------------------------------------------
    def _folder(self, device: str) -> Path:
        folder = self.directory / device
        make_dirs(folder, DIR_MODE)
        return folder

    def _part(self, device: str, rid: str) -> Path:
        return self.directory / device / f"{rid}{PART_SUFFIX}"

    def _load(self, device: str, rid: str) -> UploadState | None:
        cached = self._uploads.get((device, rid))
        if cached is not None:
            return cached
        path = self.directory / device / f"{rid}{STATE_SUFFIX}"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        state = UploadState(raw["init"], [tuple(r) for r in raw["have"]],  # type: ignore[misc]
                            raw["state"])
        self._uploads[(device, rid)] = state
        return state

    def _save(self, device: str, rid: str, state: UploadState) -> None:
        atomic_write(self._folder(device) / f"{rid}{STATE_SUFFIX}", state.to_json(), FILE_MODE)
        self._uploads[(device, rid)] = state

    # --- audit -------------------------------------------------------------------------
    def _audit(self, device: str, batch: p.AuditBatch) -> p.Receipt:
        head = self._audit_head(device)
        if (batch.start_count, batch.start_hash) != (head.count, head.hash):
            log.info("%s: audit batch starts at %d, central holds %d", device,
                     batch.start_count, head.count)
            return self._receipt(device, head, "audit_gap")
        report = verify_entries(batch.entries, batch.checkpoints, self._device_key(device),
                                device_id=device, start=head)
        if not report.ok:
            log.warning("%s: audit batch refused: %s", device, report.message)
            self.stats.refused += 1
            return self._receipt(device, head, "audit_invalid")
        folder = self._folder(device)
        _append_lines(folder / "audit.jsonl", [e.to_dict() for e in batch.entries])
        _append_lines(folder / "checkpoints.jsonl", [c.to_dict() for c in batch.checkpoints])
        new_head = ChainHead(report.head.count, report.head.hash)
        atomic_write(folder / "audit.head.json", json.dumps(new_head._asdict()).encode(),
                     FILE_MODE)
        return self._receipt(device, new_head, None)

    def _audit_head(self, device: str) -> ChainHead:
        try:
            raw = json.loads((self.directory / device / "audit.head.json").read_bytes())
        except FileNotFoundError:
            return GENESIS_HEAD
        return ChainHead(int(raw["count"]), str(raw["hash"]))

    def _receipt(self, device: str, head: ChainHead, error: str | None) -> p.Receipt:
        signature = self.key.sign(p.receipt_body(device, head.count, head.hash))
        return p.Receipt(head.count, head.hash, self.key_id,
                         base64.b64encode(signature).decode("ascii"), error)

    # --- erasure -----------------------------------------------------------------------
    def _erasure(self, device: str, request: p.Erasure) -> p.ErasureAck:
        folder = self._folder(device)
        rid = request.recording_id
        for suffix in (REC_SUFFIX, PART_SUFFIX, ".manifest.json"):
            (folder / f"{rid}{suffix}").unlink(missing_ok=True)
        _append_lines(folder / "erasures.jsonl", [{"recording_id": rid,
                                                   "reason": request.reason,
                                                   "erased_at": request.erased_at}])
        fsync_dir(folder)
        log.info("%s: recording %s erased on request (%s)", device, rid, request.reason)
        return p.ErasureAck(rid)


class CentralClient:
    """The MQTT side: a persistent session as ``central``; answers from the store."""

    def __init__(self, store: CentralStore, host: str, port: int, ca: Path, cert: Path,
                 key: Path) -> None:
        self.store = store
        self.host, self.port = host, port
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S,
                                  clean_start=False, properties=properties)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused central: %s", reason)
            return
        # Subscribed again on every connection: a broker that lost its state (killed
        # between autosaves) has forgotten the session.
        client.subscribe(f"{p.TOPIC_ROOT}/+/up/#", qos=1)
        log.info("central connected (session present: %s)", flags.session_present)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                       _p: Properties | None) -> None:
        self.connected.clear()
        log.warning("central disconnected: %s", reason)

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        for topic, payload in self.store.handle(message.topic, bytes(message.payload)):
            client.publish(topic, payload, qos=1)


# --- helpers ------------------------------------------------------------------------
def _same_id(decoded: str, topic_rid: str) -> None:
    if decoded != topic_rid:
        raise p.ProtocolError(f"recording id {decoded} differs from the topic's "
                              f"{topic_rid[:40]!r}")


def _is_uuid(text: str) -> bool:
    return len(text) == 36 and all(c in "0123456789abcdef-" for c in text)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _append_lines(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("ab") as handle:
        handle.write(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


# --- command line -------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="python -m sync.central",
                     description="Minimal central store for the upload protocol.")
    parser.add_argument("--dir", type=Path, required=True, help="where recordings are stored")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (PEM)")
    parser.add_argument("--cert", type=Path, required=True, help="central's certificate")
    parser.add_argument("--key", type=Path, required=True, help="central's private key")
    parser.add_argument("--devices", type=Path, required=True,
                        help="folder of <device_id>.pub Ed25519 public keys (PEM)")
    parser.add_argument("--signing-key", type=Path, required=True,
                        help="central's Ed25519 key for audit receipts (created if absent)")
    return parser


def _check_files(args: argparse.Namespace) -> None:
    for name in ("ca", "cert", "key"):
        if not getattr(args, name).is_file():
            raise _UsageError(f"--{name}: {getattr(args, name)}: no such file")
    if not args.devices.is_dir():
        raise _UsageError(f"--devices: {args.devices}: not a folder")
    if not 1 <= args.port <= 65535:
        raise _UsageError(f"--port: {args.port} is not in 1..65535")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        args = _parser().parse_args(argv)
        _check_files(args)
    except _UsageError as exc:
        print(f"sync.central: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        store = CentralStore(args.dir, args.devices, load_or_create_signing_key(args.signing_key))
    except (OSError, KeyFileError) as exc:
        print(f"sync.central: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    client = CentralClient(store, args.host, args.port, args.ca, args.cert, args.key)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _n, _f: stop.set())
    client.start()
    stop.wait()
    client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
