"""The upload protocol between the sync agent and the central store: a pure codec.

Bytes in, typed values out; no I/O, no MQTT client. Every malformed message raises
:class:`ProtocolError` with one line naming the message and what is wrong.
docs/PROTOCOL.md ("Upload protocol", "Audit upload") describes the messages byte by byte.

Messages (topics under ``er/v1/<device_id>/``):

- ``up/rec/<id>/init``  JSON :class:`Init`: size, sha256, chunk size and the signed manifest.
- ``up/rec/<id>/chunk`` binary :class:`Chunk`: a 40-byte header, then the data.
- ``up/rec/<id>/fin``   JSON :class:`Fin`.
- ``down/rec/<id>/ack`` JSON :class:`Ack`: ``partial`` (with the ranges held), ``stored``
  or ``rejected``.
- ``up/audit/batch`` / ``down/audit/receipt`` JSON :class:`AuditBatch` / :class:`Receipt`.
- ``up/erasure`` / ``down/erasure/ack`` JSON :class:`Erasure` / :class:`ErasureAck`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from firmware.audit import AuditEntry, AuditError, Checkpoint, canonical_json

VERSION = 1
TOPIC_ROOT = "er/v1"  # docs/PROTOCOL.md, "Topics and access"
ROUTED = "to"  # er/v1/<device>/to/<worker>/...: up, to one ingest worker

# --- sizes ----------------------------------------------------------------------------
KIB = 1024
# docs/NOTES (MQTT): AWS IoT Core limits a message to 128 KB; 120 KiB leaves room for the
# topic, the PUBLISH header and our chunk header, so the default fits any common broker.
DEFAULT_CHUNK_BYTES = 120 * KIB
MAX_CHUNK_BYTES = 1024 * KIB  # largest chunk a receiver must accept (config caps chunk_kib)
MIN_CHUNK_BYTES = 1 * KIB  # below this the broker's limit is too small to be useful
MAX_RECORDING_BYTES = 4 * 1024 * KIB * KIB  # 4 GiB: a 12 h A-law segment is ~350 MB
MAX_JSON_BYTES = 64 * KIB  # init, fin, acks, erasure: small documents
MAX_AUDIT_BATCH_BYTES = 1024 * KIB
MAX_AUDIT_BATCH_ENTRIES = 2000
MAX_RANGES = 4096  # ranges in one ack; a receiver merges adjacent ones
# OASIS MQTT 5.0, 3.3: PUBLISH = fixed header (1 byte + remaining length <= 4 bytes),
# topic name (2-byte length + UTF-8), packet identifier (2 bytes, QoS > 0), property
# length (variable byte integer, 1 byte when no properties are sent; 4 bounds it).
PUBLISH_OVERHEAD_BYTES = 1 + 4 + 2 + 2 + 4

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # firmware/config.py DeviceId
WORKER_ID = DEVICE_ID  # an ingest worker's id: one topic level (sync/central/config.py Name)

# --- chunk header ---------------------------------------------------------------------
CHUNK_MAGIC = b"ERCK"
# magic, version, flags (0), reserved (0), recording UUID, offset, data length, CRC-32
# (ISO-HDLC, zlib.crc32) of the data. Big-endian.
CHUNK_HEADER = struct.Struct(">4sBBH16sQII")

# --- ack states and error codes -------------------------------------------------------
PARTIAL, STORED, REJECTED = "partial", "stored", "rejected"
ACK_STATES = frozenset({PARTIAL, STORED, REJECTED})
ERRORS: Mapping[str, str] = {
    "bad_message": "the message could not be decoded (JSON, types, sizes); nothing changed",
    "bad_signature": "the manifest signature does not verify with the device's key",
    "unknown_device": "central has no public key for this device",
    "too_large": "the recording exceeds the largest size central accepts",
    "bad_chunk": "a chunk's CRC-32 or bounds are wrong; it was dropped (resend the range)",
    "no_init": "a chunk or fin for an upload central does not know; send init again",
    "sha256_mismatch": "the whole file does not match the sha256; central discarded it",
    "conflict": "central already stored this recording id with other content",
    "io_error": "central could not write; try again later",
    "audit_gap": "the batch does not continue central's head; resend from its count",
    "audit_invalid": "the batch breaks the hash chain or a checkpoint signature",
}
# Errors after which the device may not retry the same upload unchanged.
FATAL_ERRORS = frozenset({"bad_signature", "unknown_device", "too_large", "conflict"})

Range = tuple[int, int]  # [start, end) in bytes


class ProtocolError(Exception):
    """A message does not follow the protocol (message is one line)."""

    def __init__(self, message: str, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code


# --- topics ---------------------------------------------------------------------------
def device_prefix(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}"


def rec_topic(device_id: str, direction: str, recording_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{direction}/rec/{recording_id}/{leaf}"


def routed_topic(device_id: str, worker: str, recording_id: str, leaf: str) -> str:
    """A chunk or fin sent to the ingest worker that holds the upload (its ack named it):
    ``er/v1/<device>/to/<worker>/rec/<recording>/<leaf>`` (docs/PROTOCOL.md, "Routing")."""
    return f"{TOPIC_ROOT}/{device_id}/{ROUTED}/{worker}/rec/{recording_id}/{leaf}"


@dataclass(frozen=True)
class Topic:
    """A parsed ``er/v1/<device>/<up|down>/<rest...>`` topic."""

    device_id: str
    direction: str
    rest: tuple[str, ...]


def parse_topic(topic: str) -> Topic:
    """A routed topic (``er/v1/<device>/to/<worker>/...``) parses as the ``up`` topic it
    stands for, its worker left out."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != TOPIC_ROOT or parts[3] not in (
            "up", "down", ROUTED):
        raise ProtocolError(f"topic {topic[:120]!r}: not er/v1/<device>/up|down|to/...")
    if not DEVICE_ID.fullmatch(parts[2]):
        raise ProtocolError(f"topic {topic[:120]!r}: device id is not valid")
    if parts[3] == ROUTED:
        if len(parts) < 5 or not WORKER_ID.fullmatch(parts[4]):
            raise ProtocolError(f"topic {topic[:120]!r}: worker id is not valid")
        return Topic(parts[2], "up", tuple(parts[5:]))
    return Topic(parts[2], parts[3], tuple(parts[4:]))


# --- ranges ---------------------------------------------------------------------------
def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges; touching ones joined; empty ones dropped."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def add_range(ranges: Sequence[Range], new: Range) -> list[Range]:
    return merge_ranges([*ranges, new])


def missing_ranges(size: int, have: Iterable[Range]) -> list[Range]:
    """The parts of [0, size) not covered by ``have``."""
    missing: list[Range] = []
    cursor = 0
    for start, end in merge_ranges(have):
        if start > cursor:
            missing.append((cursor, min(start, size)))
        cursor = max(cursor, end)
        if cursor >= size:
            break
    if cursor < size:
        missing.append((cursor, size))
    return [r for r in missing if r[1] > r[0]]


def covered(have: Iterable[Range], want: Range) -> bool:
    return any(start <= want[0] and want[1] <= end for start, end in merge_ranges(have))


def split_ranges(ranges: Iterable[Range], chunk_bytes: int) -> list[Range]:
    """Ranges cut into pieces of at most ``chunk_bytes``."""
    pieces: list[Range] = []
    for start, end in ranges:
        pieces.extend((offset, min(offset + chunk_bytes, end))
                      for offset in range(start, end, chunk_bytes))
    return pieces


def held_bytes(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in merge_ranges(ranges))


# --- the chunk size rule --------------------------------------------------------------
def chunk_size(configured_bytes: int, topic_bytes: int,
               broker_max_packet: int | None) -> int:
    """Data bytes per chunk: the configured size, lowered so a whole PUBLISH fits the
    broker's Maximum Packet Size from CONNACK (OASIS MQTT 5.0, 3.2.2.3.6); rounded down
    to a KiB when that leaves at least one. Raises if not even MIN_CHUNK_BYTES fit."""
    size = min(configured_bytes, MAX_CHUNK_BYTES)
    if broker_max_packet is not None:
        room = broker_max_packet - PUBLISH_OVERHEAD_BYTES - topic_bytes - CHUNK_HEADER.size
        if room < MIN_CHUNK_BYTES:
            raise ProtocolError(f"broker maximum packet size {broker_max_packet}: leaves "
                                f"{room} bytes per chunk, below {MIN_CHUNK_BYTES}")
        size = min(size, room // KIB * KIB)
    return size


# --- JSON helpers ---------------------------------------------------------------------
def _load(payload: bytes, what: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    if len(payload) > limit:
        raise ProtocolError(f"{what}: {len(payload)} bytes, more than {limit}")
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: not UTF-8 JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    if value.get("v") != VERSION:
        raise ProtocolError(f"{what}: v: {value.get('v')!r}, expected {VERSION}")
    return value


def _dump(value: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **value}, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _get(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in raw:
        raise ProtocolError(f"{what}: {key}: missing")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{what}: {key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}: {key}: expected {_kind_name(kind)}, "
                            f"got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _recording_id(raw: Mapping[str, Any], what: str, key: str = "recording_id") -> str:
    text = _get(raw, key, str, what)
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        raise ProtocolError(f"{what}: {key}: {text[:60]!r} is not a UUID") from None
    if str(parsed) != text:
        raise ProtocolError(f"{what}: {key}: {text[:60]!r} is not a lower-case hyphenated UUID")
    return text


def _size(raw: Mapping[str, Any], what: str) -> int:
    size = _get(raw, "size", int, what)
    if size < 0:
        raise ProtocolError(f"{what}: size: {size} is negative")
    if size > MAX_RECORDING_BYTES:
        raise ProtocolError(f"{what}: size: {size} exceeds {MAX_RECORDING_BYTES}", "too_large")
    return int(size)


def _sha256(raw: Mapping[str, Any], what: str, key: str = "sha256") -> str:
    text = _get(raw, key, str, what)
    if not SHA256_HEX.fullmatch(text):
        raise ProtocolError(f"{what}: {key}: not 64 lower-case hex digits")
    return text


def _ranges(raw: Mapping[str, Any], what: str) -> list[Range]:
    items = _get(raw, "have", list, what)
    if len(items) > MAX_RANGES:
        raise ProtocolError(f"{what}: have: {len(items)} ranges, more than {MAX_RANGES}")
    ranges: list[Range] = []
    for index, item in enumerate(items):
        ok = (isinstance(item, list) and len(item) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
              and 0 <= item[0] <= item[1] <= MAX_RECORDING_BYTES)
        if not ok:
            raise ProtocolError(f"{what}: have[{index}]: expected [start, end) with "
                                f"0 <= start <= end")
        ranges.append((item[0], item[1]))
    return merge_ranges(ranges)


# --- init -----------------------------------------------------------------------------
MANIFEST_KEYS = ("recording_id", "call_id", "segment", "device_id", "line_id", "direction",
                 "started_at", "created_at", "audio_s", "decision", "retention_until",
                 "codec", "size", "sha256")


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """What the device signs: the canonical JSON of the manifest (firmware.audit)."""
    return canonical_json(dict(manifest)).encode("utf-8")


@dataclass(frozen=True)
class Init:
    recording_id: str
    size: int
    sha256: str
    chunk_size: int
    manifest: dict[str, Any]
    manifest_sig: bytes  # 64-byte Ed25519 signature over manifest_bytes(manifest)

    def encode(self) -> bytes:
        return _dump({"recording_id": self.recording_id, "size": self.size,
                      "sha256": self.sha256, "chunk_size": self.chunk_size,
                      "manifest": self.manifest,
                      "manifest_sig": base64.b64encode(self.manifest_sig).decode("ascii")})


def decode_init(payload: bytes) -> Init:
    what = "init"
    raw = _load(payload, what)
    rid = _recording_id(raw, what)
    size, sha = _size(raw, what), _sha256(raw, what)
    chunk = _get(raw, "chunk_size", int, what)
    if not 0 < chunk <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"{what}: chunk_size: {chunk} not in 1..{MAX_CHUNK_BYTES}")
    manifest = _get(raw, "manifest", dict, what)
    _check_manifest(manifest, rid, size, sha)
    try:
        sig = base64.b64decode(_get(raw, "manifest_sig", str, what), validate=True)
    except binascii.Error:
        raise ProtocolError(f"{what}: manifest_sig: not base64") from None
    if len(sig) != 64:
        raise ProtocolError(f"{what}: manifest_sig: {len(sig)} bytes, an Ed25519 "
                            "signature has 64")
    return Init(rid, size, sha, chunk, manifest, sig)


def _check_manifest(manifest: Mapping[str, Any], rid: str, size: int, sha: str) -> None:
    what = "init: manifest"
    if _recording_id(manifest, what) != rid:
        raise ProtocolError(f"{what}: recording_id differs from the init's")
    if manifest.get("size") != size or manifest.get("sha256") != sha:
        raise ProtocolError(f"{what}: size or sha256 differs from the init's")
    device = _get(manifest, "device_id", str, what)
    if not DEVICE_ID.fullmatch(device):
        raise ProtocolError(f"{what}: device_id: {device[:70]!r} is not a device id")


# --- chunk ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    recording_id: str
    offset: int
    data: bytes
    crc32: int | None = None  # the checked CRC-32 of ``data`` (decode_chunk sets it)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def encode(self) -> bytes:
        return encode_chunk(self.recording_id, self.offset, self.data)


def encode_chunk(recording_id: str, offset: int, data: bytes) -> bytes:
    header = CHUNK_HEADER.pack(CHUNK_MAGIC, VERSION, 0, 0, uuid.UUID(recording_id).bytes,
                               offset, len(data), zlib.crc32(data))
    return header + data


def decode_chunk(payload: bytes) -> Chunk:
    """A chunk with its CRC checked; a bad CRC or bound raises code ``bad_chunk``."""
    if len(payload) < CHUNK_HEADER.size:
        raise ProtocolError(f"chunk: {len(payload)} bytes, shorter than the "
                            f"{CHUNK_HEADER.size}-byte header")
    magic, version, _flags, _reserved, rid, offset, length, crc = CHUNK_HEADER.unpack_from(
        payload)
    if magic != CHUNK_MAGIC or version != VERSION:
        raise ProtocolError(f"chunk: magic {magic!r} version {version}, expected "
                            f"{CHUNK_MAGIC!r} {VERSION}")
    data = payload[CHUNK_HEADER.size:]
    recording_id = str(uuid.UUID(bytes=rid))
    if length != len(data) or length > MAX_CHUNK_BYTES or length == 0:
        raise ProtocolError(f"chunk {recording_id}@{offset}: length {length}, "
                            f"{len(data)} data bytes follow", "bad_chunk")
    if zlib.crc32(data) != crc:
        raise ProtocolError(f"chunk {recording_id}@{offset}: CRC-32 mismatch", "bad_chunk")
    return Chunk(recording_id, offset, data, crc)


def chunk_recording_id(payload: bytes) -> str | None:
    """The recording id of a chunk header, even when the rest is damaged."""
    if len(payload) < CHUNK_HEADER.size or payload[:4] != CHUNK_MAGIC:
        return None
    return str(uuid.UUID(bytes=payload[8:24]))


def chunk_offset(payload: bytes) -> int | None:
    if len(payload) < CHUNK_HEADER.size or payload[:4] != CHUNK_MAGIC:
        return None
    offset: int = struct.unpack_from(">Q", payload, 24)[0]
    return offset


# --- fin ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fin:
    recording_id: str
    size: int
    sha256: str

    def encode(self) -> bytes:
        return _dump({"recording_id": self.recording_id, "size": self.size,
                      "sha256": self.sha256})


def decode_fin(payload: bytes) -> Fin:
    raw = _load(payload, "fin")
    return Fin(_recording_id(raw, "fin"), _size(raw, "fin"), _sha256(raw, "fin"))


# --- ack ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ack:
    recording_id: str
    state: str
    have: list[Range] = field(default_factory=list)
    size: int | None = None
    sha256: str | None = None
    error: str | None = None
    detail: str = ""
    bad_offset: int | None = None  # the chunk a ``bad_chunk`` error is about
    worker: str | None = None  # the ingest worker holding the upload: route chunks to it

    def encode(self) -> bytes:
        body: dict[str, Any] = {"recording_id": self.recording_id, "state": self.state,
                                "have": [list(r) for r in self.have]}
        optional = {"size": self.size, "sha256": self.sha256, "error": self.error,
                    "bad_offset": self.bad_offset, "worker": self.worker}
        body.update({k: v for k, v in optional.items() if v is not None})
        if self.detail:
            body["detail"] = self.detail[:300]
        return _dump(body)


def decode_ack(payload: bytes) -> Ack:
    what = "ack"
    raw = _load(payload, what)
    state = _get(raw, "state", str, what)
    if state not in ACK_STATES:
        raise ProtocolError(f"{what}: state: {state[:40]!r} not one of {sorted(ACK_STATES)}")
    error = raw.get("error")
    if error is not None and error not in ERRORS:
        raise ProtocolError(f"{what}: error: {str(error)[:40]!r} is not a known code")
    if state == REJECTED and error is None:
        raise ProtocolError(f"{what}: state rejected needs an error code")
    bad = raw.get("bad_offset")
    if bad is not None and (not isinstance(bad, int) or isinstance(bad, bool) or bad < 0):
        raise ProtocolError(f"{what}: bad_offset: expected a non-negative integer")
    worker = raw.get("worker")
    if worker is not None and not (isinstance(worker, str) and WORKER_ID.fullmatch(worker)):
        raise ProtocolError(f"{what}: worker: {str(worker)[:40]!r} is not a worker id")
    ack = Ack(_recording_id(raw, what), state, _ranges(raw, what), error=error,
              detail=str(raw.get("detail", ""))[:300], bad_offset=bad, worker=worker)
    if state == STORED:
        ack = Ack(ack.recording_id, state, ack.have, _size(raw, what), _sha256(raw, what),
                  error, ack.detail)
    return ack


# --- erasure --------------------------------------------------------------------------
@dataclass(frozen=True)
class Erasure:
    recording_id: str
    reason: str
    erased_at: str

    def encode(self) -> bytes:
        return _dump({"recording_id": self.recording_id, "reason": self.reason,
                      "erased_at": self.erased_at})


def decode_erasure(payload: bytes) -> Erasure:
    raw = _load(payload, "erasure")
    return Erasure(_recording_id(raw, "erasure"), _get(raw, "reason", str, "erasure")[:200],
                   _get(raw, "erased_at", str, "erasure")[:40])


@dataclass(frozen=True)
class ErasureAck:
    recording_id: str

    def encode(self) -> bytes:
        return _dump({"recording_id": self.recording_id, "state": "erased"})


def decode_erasure_ack(payload: bytes) -> ErasureAck:
    raw = _load(payload, "erasure ack")
    if raw.get("state") != "erased":
        raise ProtocolError("erasure ack: state: expected 'erased'")
    return ErasureAck(_recording_id(raw, "erasure ack"))


# --- audit ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditBatch:
    """Entries ``start_count + 1 ..`` of the device's chain and the checkpoints in range."""

    start_count: int
    start_hash: str
    entries: list[AuditEntry]
    checkpoints: list[Checkpoint]

    def encode(self) -> bytes:
        return _dump({"start_count": self.start_count, "start_hash": self.start_hash,
                      "entries": [e.to_dict() for e in self.entries],
                      "checkpoints": [c.to_dict() for c in self.checkpoints]})


def decode_audit_batch(payload: bytes) -> AuditBatch:
    what = "audit batch"
    raw = _load(payload, what, MAX_AUDIT_BATCH_BYTES)
    start = _get(raw, "start_count", int, what)
    if start < 0:
        raise ProtocolError(f"{what}: start_count: {start} is negative")
    entries_raw = _get(raw, "entries", list, what)
    if not 0 < len(entries_raw) <= MAX_AUDIT_BATCH_ENTRIES:
        raise ProtocolError(f"{what}: entries: {len(entries_raw)}, expected "
                            f"1..{MAX_AUDIT_BATCH_ENTRIES}")
    checkpoints_raw = _get(raw, "checkpoints", list, what)
    try:
        entries = [AuditEntry.from_dict(_object(e, what)) for e in entries_raw]
        checkpoints = [Checkpoint.from_dict(_object(c, what)) for c in checkpoints_raw]
    except AuditError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    return AuditBatch(start, _sha256(raw, what, "start_hash"), entries, checkpoints)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: an entry or checkpoint is not a JSON object")
    return value


RECEIPT_ORIGIN = "edge-recorder/audit-receipt/"


def receipt_body(device_id: str, count: int, head_hash: str) -> bytes:
    """What central signs: ``edge-recorder/audit-receipt/<device>\\n<count>\\n<head hex>\\n``."""
    return f"{RECEIPT_ORIGIN}{device_id}\n{count}\n{head_hash}\n".encode()


@dataclass(frozen=True)
class Receipt:
    """Central's countersignature of the device's chain head it holds."""

    count: int
    head_hash: str
    key_id: str
    signature: str  # base64 Ed25519 over receipt_body(device, count, head_hash)
    error: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"count": self.count, "head_hash": self.head_hash,
                                "key_id": self.key_id, "signature": self.signature}
        if self.error is not None:
            body["error"] = self.error
        return _dump(body)


def decode_receipt(payload: bytes) -> Receipt:
    what = "audit receipt"
    raw = _load(payload, what)
    count = _get(raw, "count", int, what)
    if count < 0:
        raise ProtocolError(f"{what}: count: {count} is negative")
    error = raw.get("error")
    if error is not None and error not in ERRORS:
        raise ProtocolError(f"{what}: error: {str(error)[:40]!r} is not a known code")
    key = _get(raw, "key_id", str, what)[:64]
    signature = _get(raw, "signature", str, what)
    if len(signature) > 200:
        raise ProtocolError(f"{what}: signature: too long")
    return Receipt(count, _sha256(raw, what, "head_hash"), key, signature, error)
