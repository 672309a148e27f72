"""The serial provisioning protocol: framing, frames, messages, chunked items (no I/O).

A frame on the wire is ``COBS(header | payload | mac | crc32) 0x00`` (docs/PROTOCOL.md,
"Serial provisioning"). COBS removes every 0x00 from the body, so a receiver that lost
sync (garbage, a cut cable, a dropped byte) starts again at the next 0x00. The CRC32 covers
the header, payload and MAC; the MAC (HMAC-SHA256 of the session, 16 bytes) is present
when the MAC flag is set. Payloads are MessagePack maps described by the structs below.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

PROTOCOL_VERSION = 1
# version u8, flags u8, type u8, request id u32, payload length u16 (big-endian)
HEADER = struct.Struct(">BBBIH")
CRC = struct.Struct(">I")
MAC_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 section 5: >= half the output)
DELIMITER = b"\x00"
# Largest frame body (header + payload + mac + crc) either side ever accepts; the
# handshake agrees on a smaller one. COBS adds 1 byte per 254 and the delimiter 1.
MAX_FRAME_LIMIT = 8192
DEFAULT_MAX_FRAME = 1024
MIN_MAX_FRAME = 128
MAX_ITEM_BYTES = 256 * 1024  # a certificate chain or CSR is a few KiB; settings < 64 KiB
REQUEST_ID_MODULUS = 1 << 32


class CodecError(Exception):
    """Bytes that are not a valid frame or message (message is one line)."""


class Flag(enum.IntFlag):
    NONE = 0x00
    RESPONSE = 0x01
    ERROR = 0x02
    MAC = 0x04


class MsgType(enum.IntEnum):
    HELLO = 0x01
    IDENTIFY = 0x02
    AUTH_START = 0x10
    AUTH_CONFIRM = 0x11
    ITEM_BEGIN = 0x20
    ITEM_CHUNK = 0x21
    ITEM_READ = 0x22
    CONFIGURE = 0x30
    GENERATE_KEY = 0x31
    INSTALL = 0x32
    SELFTEST = 0x33
    LOCK = 0x34
    UNLOCK_CHALLENGE = 0x35
    UNLOCK = 0x36


class ErrorCode(enum.IntEnum):
    UNKNOWN_COMMAND = 1  # the type is not one this device knows
    BAD_STATE = 2  # not allowed in the device's current state
    BAD_AUTH = 3  # no authenticated session, a wrong MAC or a wrong secret
    RATE_LIMITED = 4  # too many failed authentications; retry_after_s says when
    BAD_REQUEST = 5  # the payload does not match the message's schema
    BAD_ITEM = 6  # a chunked item is unknown, incomplete, too large or fails its hash
    UNSUPPORTED_VERSION = 7  # the frame's protocol version is not spoken here
    LOCKED = 8  # the device is locked: only read-only commands work
    FAILED = 9  # the command ran and failed (the message says why)


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    request_id: int
    payload: bytes = b""
    flags: Flag = Flag.NONE
    mac: bytes = b""
    version: int = PROTOCOL_VERSION

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flag.ERROR)


# --- COBS (Cheshire & Baker, IEEE/ACM Trans. Networking 7(2), 1999) ----------------------
def cobs_encode(data: bytes) -> bytes:
    """``data`` with every 0x00 removed; decodable by :func:`cobs_decode`."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out += bytes((len(block) + 1,)) + block
            block.clear()
            continue
        block.append(byte)
        if len(block) == 254:
            out += b"\xff" + block
            block.clear()
    out += bytes((len(block) + 1,)) + block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """The bytes :func:`cobs_encode` made ``data`` from; CodecError if it cannot have."""
    out = bytearray()
    index = 0
    while index < len(data):
        code = data[index]
        if code == 0:
            raise CodecError("COBS: zero byte inside a frame")
        end = index + code
        if end > len(data):
            raise CodecError("COBS: block runs past the end of the frame")
        block = data[index + 1:end]
        if 0 in block:
            raise CodecError("COBS: zero byte inside a frame")
        out += block
        index = end
        if code != 0xFF and index < len(data):
            out.append(0)
    return bytes(out)


# --- frames -----------------------------------------------------------------------------
def mac_input(frame: Frame) -> bytes:
    """What the session MAC covers: the header (with the MAC flag) and the payload."""
    flags = frame.flags | Flag.MAC
    return HEADER.pack(frame.version, flags, frame.type, frame.request_id,
                       len(frame.payload)) + frame.payload


def frame_body(frame: Frame) -> bytes:
    """Header, payload, MAC and CRC32 before COBS (what the replay cache compares)."""
    if not 0 <= frame.request_id < REQUEST_ID_MODULUS:
        raise CodecError(f"request id {frame.request_id} out of range")
    if len(frame.payload) > 0xFFFF:
        raise CodecError(f"payload of {len(frame.payload)} bytes is over 65535")
    flags = frame.flags | Flag.MAC if frame.mac else frame.flags & ~Flag.MAC
    if frame.mac and len(frame.mac) != MAC_BYTES:
        raise CodecError(f"MAC must be {MAC_BYTES} bytes, not {len(frame.mac)}")
    raw = HEADER.pack(frame.version, flags, frame.type, frame.request_id,
                      len(frame.payload)) + frame.payload + frame.mac
    return raw + CRC.pack(zlib.crc32(raw))


def encode_frame(frame: Frame) -> bytes:
    """The frame as it goes on the wire, delimiter included."""
    return cobs_encode(frame_body(frame)) + DELIMITER


def decode_frame(encoded: bytes) -> Frame:
    """One frame from its COBS bytes (without the delimiter)."""
    return parse_body(cobs_decode(encoded))


def parse_body(raw: bytes) -> Frame:
    """A frame from header | payload | mac | crc32; CodecError names what is wrong."""
    if len(raw) < HEADER.size + CRC.size:
        raise CodecError(f"frame of {len(raw)} bytes is shorter than header and CRC")
    (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
    if zlib.crc32(raw[:-CRC.size]) != crc:
        raise CodecError("CRC32 mismatch")
    version, flags, msg_type, request_id, length = HEADER.unpack_from(raw)
    mac_len = MAC_BYTES if flags & Flag.MAC else 0
    if HEADER.size + length + mac_len + CRC.size != len(raw):
        raise CodecError(f"payload length {length} does not match the frame size {len(raw)}")
    payload = raw[HEADER.size:HEADER.size + length]
    mac = raw[HEADER.size + length:HEADER.size + length + mac_len]
    return Frame(type=msg_type, request_id=request_id, payload=payload, flags=Flag(flags),
                 mac=mac, version=version)


def encoded_limit(max_frame: int) -> int:
    """Longest COBS encoding of a body of ``max_frame`` bytes."""
    return max_frame + max_frame // 254 + 1


class FrameDecoder:
    """Splits a byte stream at 0x00 delimiters into frames.

    ``feed`` returns frames and, for every undecodable stretch, the CodecError. A stretch
    longer than the limit is dropped up to the next delimiter, so memory stays bounded
    whatever arrives.
    """

    def __init__(self, max_frame: int = MAX_FRAME_LIMIT) -> None:
        self._limit = encoded_limit(max_frame)
        self._buffer = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[Frame | CodecError]:
        out: list[Frame | CodecError] = []
        for part_index, part in enumerate(bytes(data).split(DELIMITER)):
            if part_index > 0:
                out.extend(self._end_of_frame())
            self._append(part)
        return out

    def _append(self, part: bytes) -> None:
        if self._overflow:
            return
        self._buffer += part
        if len(self._buffer) > self._limit:
            self._buffer.clear()
            self._overflow = True

    def _end_of_frame(self) -> list[Frame | CodecError]:
        encoded, overflow = bytes(self._buffer), self._overflow
        self._buffer.clear()
        self._overflow = False
        if overflow:
            return [CodecError(f"frame longer than {self._limit} bytes dropped")]
        if not encoded:
            return []  # back-to-back delimiters: idle line or a resync marker
        try:
            return [decode_frame(encoded)]
        except CodecError as exc:
            return [exc]


# --- messages ---------------------------------------------------------------------------
class Msg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every payload."""


class Empty(Msg):
    pass


class HelloReq(Msg):
    versions: list[int] = msgspec.field(default_factory=lambda: [PROTOCOL_VERSION])
    max_frame: int = DEFAULT_MAX_FRAME


class HelloRep(Msg):
    version: int
    max_frame: int
    firmware: str
    serial: str
    capabilities: list[str]


class LineInfo(Msg):
    id: str
    backend: str


class IdentifyRep(Msg):
    serial: str
    firmware: str
    state: str
    device_id: str | None = None
    site: str | None = None
    lines: list[LineInfo] = msgspec.field(default_factory=list)
    auth_retry_after_s: float = 0.0


class AuthStartReq(Msg):
    message: bytes


class AuthStartRep(Msg):
    message: bytes


class AuthConfirmReq(Msg):
    confirm: bytes


class AuthConfirmRep(Msg):
    confirm: bytes
    state: str


class ItemInfo(Msg):
    name: str
    size: int
    sha256: bytes


class ItemChunkReq(Msg):
    name: str
    offset: int
    data: bytes


class ItemChunkRep(Msg):
    received: int


class ItemReadReq(Msg):
    name: str
    offset: int
    length: int


class ItemReadRep(Msg):
    data: bytes


class ConfigureReq(Msg):
    settings: str  # name of the uploaded item holding the settings TOML


class StateRep(Msg):
    state: str
    detail: str = ""


class GenerateKeyRep(Msg):
    state: str
    csr: ItemInfo
    signing_public_key: str  # PEM of the Ed25519 audit key


class InstallReq(Msg):
    certificate: str  # item names
    chain: str
    broker_host: str
    ops_public_key: str
    broker_port: int = 8883


class SelfTestReq(Msg):
    tests: list[str]
    timeout_s: float = 10.0


class TestResult(Msg):
    name: str
    ok: bool
    detail: str


class SelfTestRep(Msg):
    state: str
    results: list[TestResult]


class ChallengeRep(Msg):
    serial: str
    nonce: bytes
    device_id: str | None = None
    state: str = ""


class UnlockReq(Msg):
    ticket: bytes  # packed UnlockTicket
    signature: bytes  # Ed25519 over the ticket bytes, by the ops key


class UnlockTicket(Msg):
    purpose: str  # "edge-recorder unlock"
    serial: str
    nonce: bytes
    expires_unix: int
    device_id: str | None = None  # when set, must be the device's configured id


class ErrorRep(Msg):
    code: int
    message: str
    retry_after_s: float = 0.0


REQUESTS: dict[MsgType, type[Msg]] = {
    MsgType.HELLO: HelloReq, MsgType.IDENTIFY: Empty, MsgType.AUTH_START: AuthStartReq,
    MsgType.AUTH_CONFIRM: AuthConfirmReq, MsgType.ITEM_BEGIN: ItemInfo,
    MsgType.ITEM_CHUNK: ItemChunkReq, MsgType.ITEM_READ: ItemReadReq,
    MsgType.CONFIGURE: ConfigureReq, MsgType.GENERATE_KEY: Empty, MsgType.INSTALL: InstallReq,
    MsgType.SELFTEST: SelfTestReq, MsgType.LOCK: Empty, MsgType.UNLOCK_CHALLENGE: Empty,
    MsgType.UNLOCK: UnlockReq,
}

M = TypeVar("M", bound=Msg)


def pack(message: Msg) -> bytes:
    return msgspec.msgpack.encode(message)


def unpack(payload: bytes, kind: type[M]) -> M:
    """A message of ``kind`` from ``payload``; CodecError names the field at fault."""
    try:
        return msgspec.msgpack.decode(payload, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise CodecError(f"{kind.__name__}: {exc}") from None


def to_builtins(message: Msg) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(message)
    return result


# --- chunked items ----------------------------------------------------------------------
def item_info(name: str, data: bytes) -> ItemInfo:
    return ItemInfo(name=name, size=len(data), sha256=hashlib.sha256(data).digest())


def chunk_bytes_for(max_frame: int) -> int:
    """Data bytes per ITEM_CHUNK / ITEM_READ that fit a frame of ``max_frame`` bytes
    (header, MAC, CRC and the MessagePack map with a short name take < 64 bytes)."""
    return max(16, max_frame - HEADER.size - MAC_BYTES - CRC.size - 64)


class ItemAssembler:
    """An item arriving in chunks, in order; checked against its SHA-256 at the end.

    A chunk at an offset already received is accepted again (a retry) if it matches;
    one beyond the received length is refused, so the item never has holes.
    """

    def __init__(self, info: ItemInfo, max_bytes: int = MAX_ITEM_BYTES) -> None:
        if info.size > max_bytes or info.size < 0:
            raise CodecError(f"item {info.name!r}: size {info.size} outside 0..{max_bytes}")
        if len(info.sha256) != hashlib.sha256().digest_size:
            raise CodecError(f"item {info.name!r}: sha256 must be 32 bytes")
        self.info = info
        self._data = bytearray()

    @property
    def received(self) -> int:
        return len(self._data)

    def add(self, offset: int, data: bytes) -> int:
        name, end = self.info.name, offset + len(data)
        if offset < 0 or offset > len(self._data):
            raise CodecError(f"item {name!r}: chunk at {offset}, have {len(self._data)} bytes")
        if end > self.info.size:
            raise CodecError(f"item {name!r}: chunk ends at {end}, past size {self.info.size}")
        overlap = min(end, len(self._data)) - offset
        if bytes(self._data[offset:offset + overlap]) != data[:overlap]:
            raise CodecError(f"item {name!r}: chunk at {offset} differs from the one received")
        self._data += data[overlap:]
        return len(self._data)

    def complete(self) -> bytes:
        name = self.info.name
        if len(self._data) != self.info.size:
            raise CodecError(f"item {name!r}: {len(self._data)} of {self.info.size} bytes")
        data = bytes(self._data)
        if hashlib.sha256(data).digest() != self.info.sha256:
            raise CodecError(f"item {name!r}: SHA-256 does not match")
        return data
