"""age v1 file encryption (C2SP age.md, "age-encryption.org/v1") with X25519 recipients.

Built on ``cryptography`` alone and interoperable with the ``age`` / ``age-keygen``
command-line tools. The building blocks (header writing and parsing, file-key
unwrapping, payload key and nonce derivation) are public because the recording file
format (firmware.recfile, docs/FORMAT.md) reuses age's header with its own records.

Only the binary format is supported (no ASCII armor) and only X25519 identities; other
recipient stanzas (scrypt, plugins, grease) are parsed and skipped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

VERSION_LINE = b"age-encryption.org/v1\n"  # age.md "Version line"
FILE_KEY_BYTES = 16  # age.md "File key": 128-bit, 16 bytes of CSPRNG output
PAYLOAD_NONCE_BYTES = 16  # age.md "Payload": 16-byte nonce
CHUNK_BYTES = 64 * 1024  # age.md "Payload": plaintext chunks of 64 KiB
TAG_BYTES = 16  # RFC 7539 Poly1305 tag
COUNTER_BYTES = 11  # age.md "Payload": 11-byte big-endian chunk counter
BODY_COLUMNS = 64  # age.md "Recipient stanza": body wrapped at 64 columns
MAC_BYTES = 32  # HMAC-SHA-256
X25519_KEY_BYTES = 32  # RFC 7748
X25519_INFO = b"age-encryption.org/v1/X25519"  # age.md "X25519 recipient stanza"
HEADER_MAC_INFO = b"header"  # age.md "Header MAC"
PAYLOAD_INFO = b"payload"  # age.md "Payload"
RECIPIENT_HRP = "age"  # age.md "The X25519 recipient type"
IDENTITY_HRP = "age-secret-key-"  # compared in lower case; written upper case
ZERO_NONCE = bytes(12)  # age.md: stanza body nonce is 12 0x00 bytes

# Limits of this reader (not of the format): longest header line and whole header.
MAX_HEADER_LINE_BYTES = 4096
MAX_HEADER_BYTES = 64 * 1024

# BIP-173 bech32 alphabet and checksum generator.
_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_BECH32_CHECKSUM_LEN = 6


class AgeError(Exception):
    """Base of every age error; the message names the file, line or stanza at fault."""


class AgeFormatError(AgeError):
    """Malformed key, header or payload framing (including truncation)."""


class AgeAuthError(AgeError):
    """A header MAC or payload chunk failed authentication (altered data or wrong key)."""


class NoMatchingIdentity(AgeError):
    """None of the given identities can unwrap the file key."""


# --- bech32 (BIP-173, without the 90-character limit, as age.md specifies) ---------
def _bech32_polymod(values: Iterable[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = ((checksum & 0x1FFFFFF) << 5) ^ value
        for bit, generator in enumerate(_BECH32_GENERATOR):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum


def _bech32_hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], from_bits: int, to_bits: int, *, pad: bool) -> list[int]:
    """Regroup a bit string; without ``pad`` the leftover bits must be zero padding."""
    accumulator, bits, out = 0, 0, []
    mask = (1 << to_bits) - 1
    for value in data:
        accumulator = (accumulator << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((accumulator >> bits) & mask)
    if pad and bits:
        out.append((accumulator << (to_bits - bits)) & mask)
    elif not pad and (bits >= from_bits or (accumulator << (to_bits - bits)) & mask):
        raise AgeFormatError("bech32: invalid padding in the data part")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Lower-case bech32 string of ``data`` under human-readable part ``hrp``."""
    hrp = hrp.lower()
    groups = _convert_bits(data, 8, 5, pad=True)
    polymod = _bech32_polymod([*_bech32_hrp_expand(hrp), *groups, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(_BECH32_CHECKSUM_LEN)]
    return hrp + "1" + "".join(_BECH32_CHARSET[g] for g in groups + checksum)


def bech32_decode(text: str) -> tuple[str, bytes]:
    """(lower-case hrp, data) of a bech32 string; raises AgeFormatError if invalid."""
    if text.lower() != text and text.upper() != text:
        raise AgeFormatError("bech32: mixed upper and lower case")
    lowered = text.lower()
    separator = lowered.rfind("1")
    if separator < 1 or separator + 1 + _BECH32_CHECKSUM_LEN > len(lowered):
        raise AgeFormatError("bech32: missing separator or checksum")
    hrp, data_part = lowered[:separator], lowered[separator + 1:]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise AgeFormatError("bech32: invalid character in the human-readable part")
    if any(c not in _BECH32_CHARSET for c in data_part):
        raise AgeFormatError("bech32: invalid character in the data part")
    groups = [_BECH32_CHARSET.index(c) for c in data_part]
    if _bech32_polymod([*_bech32_hrp_expand(hrp), *groups]) != 1:
        raise AgeFormatError("bech32: checksum mismatch")
    return hrp, bytes(_convert_bits(groups[:-_BECH32_CHECKSUM_LEN], 5, 8, pad=False))


# --- small primitives ---------------------------------------------------------------
def b64encode_raw(data: bytes) -> bytes:
    """Standard base64 without padding (age.md "Conventions")."""
    return base64.b64encode(data).rstrip(b"=")


def b64decode_raw(text: bytes, what: str) -> bytes:
    """Decode canonical unpadded base64; ``what`` names the field in errors."""
    if b"=" in text or len(text) % 4 == 1:
        raise AgeFormatError(f"{what}: not unpadded base64")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except ValueError as exc:
        raise AgeFormatError(f"{what}: not base64") from exc
    if b64encode_raw(data) != text:
        raise AgeFormatError(f"{what}: non-canonical base64")
    return data


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """32 bytes of HKDF-SHA-256 (RFC 5869) as age.md uses it."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def derive_payload_key(file_key: bytes, nonce: bytes) -> bytes:
    """age.md "Payload": HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload")."""
    return hkdf_sha256(file_key, nonce, PAYLOAD_INFO)


def stream_nonce(counter: int, last: bool) -> bytes:
    """age.md "Payload": 11-byte big-endian counter || 0x01 for the final chunk else 0x00."""
    return counter.to_bytes(COUNTER_BYTES, "big") + (b"\x01" if last else b"\x00")


def read_full(src: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


# --- keys ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Recipient:
    """An X25519 recipient (public key), written ``age1...``."""

    public_key: bytes

    def __post_init__(self) -> None:
        if len(self.public_key) != X25519_KEY_BYTES:
            raise AgeFormatError(f"recipient: {len(self.public_key)} bytes, expected 32")

    @classmethod
    def parse(cls, text: str) -> Recipient:
        hrp, data = bech32_decode(text.strip())
        if hrp != RECIPIENT_HRP:
            raise AgeFormatError(f"recipient {text.strip()!r}: not an age1... X25519 recipient")
        return cls(data)

    def __str__(self) -> str:
        return bech32_encode(RECIPIENT_HRP, self.public_key)

    def wrap(self, file_key: bytes) -> Stanza:
        """age.md "X25519 recipient stanza": wrap ``file_key`` with a fresh ephemeral key."""
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        shared_secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(self.public_key))
        wrap_key = hkdf_sha256(shared_secret, share + self.public_key, X25519_INFO)
        body = ChaCha20Poly1305(wrap_key).encrypt(ZERO_NONCE, file_key, None)
        return Stanza(("X25519", b64encode_raw(share).decode("ascii")), body)


class Identity:
    """An X25519 identity (private key), written ``AGE-SECRET-KEY-1...``.

    ``repr()`` never shows the key; ``str()`` does (it is the identity file line).
    """

    __slots__ = ("_private", "_public")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self._public = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse ``AGE-SECRET-KEY-1...``; errors never echo the secret."""
        hrp, data = bech32_decode(text.strip())
        if hrp != IDENTITY_HRP or len(data) != X25519_KEY_BYTES:
            raise AgeFormatError("identity: not an AGE-SECRET-KEY-1... X25519 identity")
        return cls(X25519PrivateKey.from_private_bytes(data))

    @property
    def recipient(self) -> Recipient:
        return Recipient(self._public)

    def __str__(self) -> str:
        return bech32_encode(IDENTITY_HRP, self._private.private_bytes_raw()).upper()

    def __repr__(self) -> str:
        return f"Identity(recipient={self.recipient})"

    def unwrap(self, share: bytes, body: bytes) -> bytes | None:
        """The file key from an X25519 stanza, or None if it is not addressed to us."""
        try:
            shared_secret = self._private.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError as exc:  # low-order point: all-zero shared secret
            raise AgeFormatError("X25519 stanza: ephemeral share gives a zero secret") from exc
        if shared_secret == bytes(X25519_KEY_BYTES):
            raise AgeFormatError("X25519 stanza: ephemeral share gives a zero secret")
        salt = share + self._public
        wrap_key = hkdf_sha256(shared_secret, salt, X25519_INFO)
        try:
            return ChaCha20Poly1305(wrap_key).decrypt(ZERO_NONCE, body, None)
        except InvalidTag:
            return None


def parse_identities(lines: Iterable[str], source: str = "identities") -> list[Identity]:
    """Identities from age identity-file lines (``#`` comments and blank lines skipped)."""
    identities = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            identities.append(Identity.parse(text))
        except AgeFormatError as exc:
            raise AgeFormatError(f"{source}:{number}: {exc}") from None
    if not identities:
        raise AgeFormatError(f"{source}: no identities found")
    return identities


def load_identities(path: Path) -> list[Identity]:
    """Read an age identity file as ``age-keygen`` writes it."""
    return parse_identities(Path(path).read_text(encoding="utf-8").splitlines(), str(path))


def parse_recipients(lines: Iterable[str], source: str = "recipients") -> list[Recipient]:
    """Recipients from recipient-file lines (``#`` comments and blank lines skipped)."""
    recipients = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            recipients.append(Recipient.parse(text))
        except AgeFormatError as exc:
            raise AgeFormatError(f"{source}:{number}: {exc}") from None
    return recipients


def load_recipients(path: Path) -> list[Recipient]:
    """Read an age recipients file (one ``age1...`` per line)."""
    return parse_recipients(Path(path).read_text(encoding="utf-8").splitlines(), str(path))


# --- header -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Stanza:
    """One recipient stanza: its arguments and its (decoded) body."""

    args: tuple[str, ...]
    body: bytes

    def to_bytes(self) -> bytes:
        encoded = b64encode_raw(self.body)
        lines = [encoded[i:i + BODY_COLUMNS] for i in range(0, len(encoded), BODY_COLUMNS)]
        if len(encoded) % BODY_COLUMNS == 0:
            lines.append(b"")  # age.md: the body ends with a line shorter than 64 columns
        arg_line = b"-> " + " ".join(self.args).encode("ascii") + b"\n"
        return arg_line + b"".join(line + b"\n" for line in lines)


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed age header. ``mac_input`` is the header up to and including ``---``."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    mac_input: bytes


def _header_mac(file_key: bytes, mac_input: bytes) -> bytes:
    """age.md "Header MAC": HMAC-SHA-256 keyed by HKDF(file key, "", "header")."""
    mac_key = hkdf_sha256(file_key, b"", HEADER_MAC_INFO)
    return hmac.new(mac_key, mac_input, hashlib.sha256).digest()


def write_header(file_key: bytes, recipients: Sequence[Recipient]) -> bytes:
    """The complete age v1 header (through ``--- <mac>\\n``) wrapping ``file_key``."""
    if len(file_key) != FILE_KEY_BYTES:
        raise ValueError(f"file key must be {FILE_KEY_BYTES} bytes, not {len(file_key)}")
    if not recipients:
        raise ValueError("at least one recipient is needed")
    stanzas = b"".join(r.wrap(file_key).to_bytes() for r in recipients)
    mac_input = VERSION_LINE + stanzas + b"---"
    return mac_input + b" " + b64encode_raw(_header_mac(file_key, mac_input)) + b"\n"


class _LineReader:
    """Header lines from a stream, counting bytes and enforcing the reader's limits."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.consumed = bytearray()
        self.number = 0

    def next(self) -> bytes:
        line = self._src.readline(MAX_HEADER_LINE_BYTES + 1)
        self.number += 1
        if not line.endswith(b"\n"):
            raise AgeFormatError(f"age header line {self.number}: truncated or too long")
        self.consumed += line
        if len(self.consumed) > MAX_HEADER_BYTES:
            raise AgeFormatError(f"age header: longer than {MAX_HEADER_BYTES} bytes")
        return line[:-1]


def _parse_args(line: bytes, number: int) -> tuple[str, ...]:
    args = line[3:].split(b" ")
    if any(not arg or any(not 0x21 <= c <= 0x7E for c in arg) for arg in args):
        raise AgeFormatError(f"age header line {number}: malformed stanza arguments")
    return tuple(arg.decode("ascii") for arg in args)


def _read_stanza_body(reader: _LineReader) -> bytes:
    encoded = bytearray()
    while True:
        line = reader.next()
        if len(line) > BODY_COLUMNS:
            raise AgeFormatError(f"age header line {reader.number}: body line over 64 columns")
        encoded += line
        if len(line) < BODY_COLUMNS:
            return b64decode_raw(bytes(encoded), f"age header line {reader.number}")


def read_header(src: BinaryIO) -> tuple[Header, int]:
    """Parse an age v1 header from a stream positioned at its start; (header, length)."""
    reader = _LineReader(src)
    if reader.next() + b"\n" != VERSION_LINE:
        raise AgeFormatError("age header line 1: not 'age-encryption.org/v1'")
    stanzas = []
    while True:
        line = reader.next()
        if line.startswith(b"---"):
            break
        if not line.startswith(b"-> "):
            raise AgeFormatError(f"age header line {reader.number}: expected '-> ' or '---'")
        args = _parse_args(line, reader.number)
        stanzas.append(Stanza(args, _read_stanza_body(reader)))
    if not stanzas or not line.startswith(b"--- "):
        raise AgeFormatError(f"age header line {reader.number}: malformed MAC line")
    mac = b64decode_raw(line[4:], f"age header line {reader.number} (MAC)")
    if len(mac) != MAC_BYTES:
        raise AgeFormatError(f"age header line {reader.number}: MAC is not 32 bytes")
    mac_input = bytes(reader.consumed[:-len(line) - 1]) + b"---"
    return Header(tuple(stanzas), mac, mac_input), len(reader.consumed)


def parse_header(buf: bytes) -> tuple[Header, int]:
    """Parse the age header at the start of ``buf``; (header, its length in bytes)."""
    return read_header(io.BytesIO(buf))


def _x25519_share(stanza: Stanza) -> bytes:
    """Validate an X25519 stanza (age.md) and return its ephemeral share."""
    if len(stanza.args) != 2:
        raise AgeFormatError("X25519 stanza: expected exactly two arguments")
    share = b64decode_raw(stanza.args[1].encode("ascii"), "X25519 stanza share")
    if len(share) != X25519_KEY_BYTES:
        raise AgeFormatError("X25519 stanza: share is not 32 bytes")
    if len(stanza.body) != FILE_KEY_BYTES + TAG_BYTES:
        raise AgeFormatError("X25519 stanza: body is not 32 bytes")
    return share


def verify_header_mac(header: Header, file_key: bytes) -> None:
    """Raise AgeAuthError unless the header MAC matches ``file_key``."""
    if not hmac.compare_digest(_header_mac(file_key, header.mac_input), header.mac):
        raise AgeAuthError("age header: MAC mismatch (header altered)")


def unwrap_file_key(header: Header, identities: Sequence[Identity]) -> bytes:
    """The file key, unwrapped by the first matching identity, with the header MAC checked."""
    x25519_stanzas = [s for s in header.stanzas if s.args[0] == "X25519"]
    for stanza in x25519_stanzas:
        share = _x25519_share(stanza)
        for identity in identities:
            file_key = identity.unwrap(share, stanza.body)
            if file_key is not None:
                verify_header_mac(header, file_key)
                log.debug("file key unwrapped by the identity of %s", identity.recipient)
                return file_key
    raise NoMatchingIdentity(
        f"no identity matches: {len(identities)} identities tried against "
        f"{len(x25519_stanzas)} X25519 stanzas ({len(header.stanzas)} stanzas in all)")


# --- STREAM payload -----------------------------------------------------------------
def encrypt_stream(src: BinaryIO, dst: BinaryIO, recipients: Sequence[Recipient]) -> int:
    """Encrypt all of ``src`` to ``dst`` as a standard age file; returns plaintext bytes."""
    file_key = os.urandom(FILE_KEY_BYTES)
    nonce = os.urandom(PAYLOAD_NONCE_BYTES)
    dst.write(write_header(file_key, recipients) + nonce)
    aead = ChaCha20Poly1305(derive_payload_key(file_key, nonce))
    chunk, counter, total = read_full(src, CHUNK_BYTES), 0, 0
    while True:
        following = read_full(src, CHUNK_BYTES) if len(chunk) == CHUNK_BYTES else b""
        last = not following
        dst.write(aead.encrypt(stream_nonce(counter, last), chunk, None))
        total += len(chunk)
        if last:
            return total
        chunk, counter = following, counter + 1


def decrypt_stream(src: BinaryIO, dst: BinaryIO, identities: Sequence[Identity]) -> int:
    """Decrypt a standard age file; verified chunks reach ``dst`` before any error."""
    header, _ = read_header(src)
    file_key = unwrap_file_key(header, identities)
    nonce = read_full(src, PAYLOAD_NONCE_BYTES)
    if len(nonce) != PAYLOAD_NONCE_BYTES:
        raise AgeFormatError("age payload: truncated before the nonce ends")
    aead = ChaCha20Poly1305(derive_payload_key(file_key, nonce))
    sealed_len = CHUNK_BYTES + TAG_BYTES
    chunk, counter, total = read_full(src, sealed_len), 0, 0
    while True:
        if len(chunk) < TAG_BYTES:
            raise AgeFormatError(f"age payload: chunk {counter} truncated (no final chunk)")
        following = read_full(src, sealed_len) if len(chunk) == sealed_len else b""
        last = not following
        plain = _open_chunk(aead, counter, last, chunk)
        if last and not plain and counter:
            raise AgeFormatError(f"age payload: final chunk {counter} is empty")
        dst.write(plain)
        total += len(plain)
        if last:
            return total
        chunk, counter = following, counter + 1


def _open_chunk(aead: ChaCha20Poly1305, counter: int, last: bool, sealed: bytes) -> bytes:
    try:
        return aead.decrypt(stream_nonce(counter, last), sealed, None)
    except InvalidTag:
        raise AgeAuthError(
            f"age payload: chunk {counter} fails authentication (altered or truncated)"
        ) from None
