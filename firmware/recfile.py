"""The encrypted recording file, "EDGEREC1" (specified byte by byte in docs/FORMAT.md).

A recording is G.711 A-law audio sealed on the device to one or more age X25519
recipients. The device only ever holds public keys: the per-file key lives in RAM while
the file is written and cannot be recovered from the file without an identity.

Layout: ``EDGEREC1\\n`` | compact JSON header line | age v1 header | 16-byte nonce |
records. Each record is ``u32 length | u32 CRC-32 | ChaCha20-Poly1305 ciphertext``;
the CRC lets the key-less device find a torn tail after power loss, the AEAD proves
authenticity. Records are sealed every ``flush_interval_s`` of audio and fdatasync'ed, so
a power cut loses at most that much audio.

Device side: :class:`RecordingWriter`, :func:`recover`, :func:`read_plain_header`.
Central side: :func:`decrypt_recording`, :func:`write_wav`, :func:`export_age`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import wave
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from firmware import agecrypt
from firmware.agecrypt import Identity, Recipient
from firmware.codec import alaw_decode, alaw_encode
from firmware.fsutil import fsync_dir, preallocate

log = logging.getLogger(__name__)

MAGIC_LINE = b"EDGEREC1\n"
CODEC = "alaw"  # ITU-T G.711 A-law
SAMPLE_RATE = 8000  # ITU-T G.711: 8000 samples/s
PART_SUFFIX = ".part"
NONCE_BYTES = agecrypt.PAYLOAD_NONCE_BYTES
TAG_BYTES = agecrypt.TAG_BYTES
FRAME_PREFIX = struct.Struct(">II")  # ciphertext length, CRC-32 of the ciphertext
RECORD_HEAD = struct.Struct(">BQ")  # record type, start sample
GAP_END = struct.Struct(">Q")  # GAP body: end sample
MAX_RECORD_PLAINTEXT = 64 * 1024  # cap of this format; larger lengths are rejected
# Blocks reserved past EOF at a time while writing: about 2 minutes of A-law audio.
PREALLOCATE_BYTES = 1024 * 1024
MIN_SEALED = RECORD_HEAD.size + TAG_BYTES
MAX_SEALED = MAX_RECORD_PLAINTEXT + TAG_BYTES
MAX_FLUSH_SAMPLES = MAX_RECORD_PLAINTEXT - RECORD_HEAD.size  # one A-law byte per sample
MAX_HEADER_JSON_BYTES = 16 * 1024
MAX_REASON_BYTES = 1024
# Longest timeline decrypt_recording will materialise (12 h of int16 is 691 MB).
MAX_TIMELINE_SAMPLES = 12 * 3600 * SAMPLE_RATE
UNRECORDED = "unrecorded"  # reason given to a jump in sample numbers without a GAP record

AUDIO = 0x01
GAP = 0x02
END = 0x03


class RecordingError(Exception):
    """Base of every recording-file error; the message names the file."""


class RecordingFormatError(RecordingError):
    """The file is not a well-formed recording (bad header, torn or oversized record)."""


class RecordingAuthError(RecordingError):
    """Authentication failed: the file was altered, reordered or truncated in a record."""


class NoMatchingIdentity(RecordingAuthError, agecrypt.NoMatchingIdentity):
    """None of the given identities is a recipient of the recording."""


class RecordingIOError(RecordingError):
    """Writing, syncing or renaming the recording failed."""


@dataclass(frozen=True, slots=True)
class RecordingSummary:
    """A closed recording: what the catalogue and the audit trail keep."""

    path: Path
    size_bytes: int
    sha256: str  # hex digest of the whole final file
    samples: int  # audio samples stored (gaps excluded)
    records: int


@dataclass(frozen=True, slots=True)
class RecoverySummary:
    """An interrupted recording closed at boot (no key: records are counted, not read)."""

    path: Path
    size_bytes: int
    sha256: str
    records: int  # intact records kept
    truncated_bytes: int  # torn tail removed


@dataclass(frozen=True, slots=True)
class Gap:
    """Samples ``start_sample`` to ``end_sample`` (exclusive) deliberately not stored."""

    start_sample: int
    end_sample: int
    reason: str


@dataclass(slots=True)
class DecryptedRecording:
    """Everything verified in a recording; ``pcm`` starts at ``start_sample``.

    ``complete`` is True only when an authentic END record ended the file. ``error``
    says why reading stopped early; the audio before that point is still here.
    """

    header: dict[str, Any]
    pcm: np.ndarray
    start_sample: int
    gaps: list[Gap]
    complete: bool
    end_reason: str | None
    error: str | None
    records: int
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


def part_path_for(path: Path) -> Path:
    """Where a recording is written until it is closed (``<name>.part``)."""
    return path.with_name(path.name + PART_SUFFIX)


def plain_header_bytes(header: dict[str, Any]) -> bytes:
    """Magic line + compact, key-sorted JSON line; codec and sample rate filled in."""
    fields = {"codec": CODEC, "sample_rate": SAMPLE_RATE, **header}
    if fields["codec"] != CODEC or fields["sample_rate"] != SAMPLE_RATE:
        raise ValueError(f"recording header: codec must be {CODEC!r} at {SAMPLE_RATE} Hz")
    line = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    if len(line) > MAX_HEADER_JSON_BYTES:
        raise ValueError(f"recording header: {len(line)} bytes of JSON, "
                         f"max {MAX_HEADER_JSON_BYTES}")
    return MAGIC_LINE + line + b"\n"


# --- device side: writing ---------------------------------------------------------
class RecordingWriter:
    """Writes one encrypted recording as ``<path>.part``, renamed to ``path`` on close.

    Audio is buffered as A-law and sealed into one AUDIO record (then fdatasync'ed) each
    time ``flush_interval_s`` of audio has accumulated, so at most that much is lost on
    power failure. Only the payload key is kept, inside the AEAD object, and it is dropped
    at close; Python cannot guarantee the memory is wiped. Not thread-safe.
    """

    def __init__(self, path: Path, *, recipients: Sequence[Recipient], header: dict[str, Any],
                 flush_interval_s: float = 2.0, sync: bool = True) -> None:
        self.path = Path(path)
        self.part_path = part_path_for(self.path)
        self._flush_samples = round(flush_interval_s * SAMPLE_RATE)
        if not 1 <= self._flush_samples <= MAX_FLUSH_SAMPLES:
            raise ValueError(f"{self.path}: flush_interval_s {flush_interval_s} out of range "
                             f"(max {MAX_FLUSH_SAMPLES / SAMPLE_RATE:.2f} s)")
        if self.path.exists():
            raise RecordingIOError(f"{self.path}: a recording with this name already exists")
        plain = plain_header_bytes(header)
        file_key = os.urandom(agecrypt.FILE_KEY_BYTES)  # age.md "File key": fresh per file
        nonce = os.urandom(NONCE_BYTES)
        prelude = plain + agecrypt.write_header(file_key, recipients) + nonce
        self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(
            agecrypt.derive_payload_key(file_key, nonce))
        del file_key
        self._ad = hashlib.sha256(plain).digest()
        self._sync = sync
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._counter = 0
        self._audio_samples = 0
        self._buffer = bytearray()
        self._buffer_start = 0
        self._next_sample: int | None = None
        self._summary: RecordingSummary | None = None
        self._aborted = False
        self._fd = -1
        self._allocated = 0
        self._create(prelude)
        log.info("recording %s: started", self.path.name)

    def _create(self, prelude: bytes) -> None:
        """Create the ``.part`` (0600, never over an existing file) and make it durable."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self._fd = os.open(self.part_path, flags, 0o600)
        except OSError as exc:
            raise RecordingIOError(f"{self.part_path}: cannot create: {exc}") from exc
        try:
            self._write(prelude)
            self._sync_file(full=True)
            if self._sync:
                fsync_dir(self.part_path.parent)
        except (OSError, RecordingIOError) as exc:
            os.close(self._fd)
            self.part_path.unlink(missing_ok=True)
            raise RecordingIOError(f"{self.part_path}: cannot write the header: {exc}") from exc

    # --- public API ---
    @property
    def bytes_written(self) -> int:
        """Bytes written to the file so far (header and records)."""
        return self._bytes

    @property
    def records(self) -> int:
        return self._counter

    def write_audio(self, sample: int, pcm: np.ndarray) -> None:
        """Append int16 audio starting at ``sample`` on the line timeline."""
        self._check_open()
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"{self.path}: write_audio takes a 1-D int16 array")
        self.write_alaw(sample, alaw_encode(pcm))

    def write_alaw(self, sample: int, data: bytes) -> None:
        """Append audio already encoded as G.711 A-law (one byte per sample)."""
        self._check_open()
        self._check_forward(sample)
        if self._buffer and sample != self._buffer_start + len(self._buffer):
            self._seal_audio()  # a jump: the next record starts at the exact sample
        self._next_sample = sample + len(data)
        self._audio_samples += len(data)
        self._buffer_samples(sample, data)

    def write_gap(self, start_sample: int, end_sample: int, reason: str) -> None:
        """Mark samples [start, end) as deliberately not stored (a pause, lost audio)."""
        self._check_open()
        body = reason.encode("utf-8")
        if end_sample < start_sample or len(body) > MAX_REASON_BYTES:
            raise ValueError(f"{self.path}: bad gap {start_sample}..{end_sample} ({reason!r})")
        self._check_forward(start_sample)
        self._seal_audio()
        self._seal(GAP, start_sample, GAP_END.pack(end_sample) + body)
        self._next_sample = end_sample

    def flush(self) -> None:
        """Seal and sync the audio buffered so far."""
        self._check_open()
        self._seal_audio()

    def close(self, reason: str) -> RecordingSummary:
        """Seal the rest, write END, sync and rename to the final path. Idempotent."""
        if self._summary is not None:
            return self._summary
        self._check_open()
        self._seal_audio()
        end_body = {"end_sample": self._next_sample or 0, "reason": reason,
                    "samples": self._audio_samples}
        self._seal(END, self._next_sample or 0, _compact_json(end_body), last=True)
        try:
            self._finish()
        except RecordingError:
            self._aborted = True  # the .part stays for recover()
            raise
        self._summary = RecordingSummary(self.path, self._bytes, self._sha.hexdigest(),
                                         self._audio_samples, self._counter)
        log.info("recording %s: closed (%s), %d samples, %d records, %d bytes", self.path.name,
                 reason, self._audio_samples, self._counter, self._bytes)
        return self._summary

    def abort(self, *, discard: bool = False) -> None:
        """Stop without END; the ``.part`` stays for :func:`recover` unless ``discard``."""
        if self._summary is not None or self._aborted:
            return
        self._aborted = True
        self._aead = None
        try:
            os.close(self._fd)
        finally:
            if discard:
                self.part_path.unlink(missing_ok=True)
        log.warning("recording %s: aborted after %d records%s", self.path.name, self._counter,
                    " and discarded" if discard else "")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.abort()
        elif self._summary is None and not self._aborted:
            self.close("end")

    # --- internals ---
    def _check_open(self) -> None:
        if self._aborted or self._summary is not None:
            raise RecordingError(f"{self.path}: recording already closed")

    def _check_forward(self, sample: int) -> None:
        if sample < 0 or (self._next_sample is not None and sample < self._next_sample):
            raise ValueError(f"{self.path}: sample {sample} goes back before "
                             f"{self._next_sample}; the timeline only moves forward")

    def _buffer_samples(self, sample: int, alaw: bytes) -> None:
        if not self._buffer:
            self._buffer_start = sample
        offset = 0
        while offset < len(alaw):
            room = self._flush_samples - len(self._buffer)
            self._buffer += alaw[offset:offset + room]
            offset += room
            if len(self._buffer) >= self._flush_samples:
                self._seal_audio()

    def _seal_audio(self) -> None:
        if self._buffer:
            self._seal(AUDIO, self._buffer_start, bytes(self._buffer))
            self._buffer_start += len(self._buffer)
            self._buffer.clear()

    def _seal(self, record_type: int, start_sample: int, body: bytes, *,
              last: bool = False) -> None:
        assert self._aead is not None
        plaintext = RECORD_HEAD.pack(record_type, start_sample) + body
        nonce = agecrypt.stream_nonce(self._counter, last)
        sealed = self._aead.encrypt(nonce, plaintext, self._ad)
        self._write(FRAME_PREFIX.pack(len(sealed), zlib.crc32(sealed)) + sealed)
        self._counter += 1
        self._sync_file(full=False)

    def _write(self, data: bytes) -> None:
        if self._sync and self._bytes + len(data) > self._allocated:
            self._reserve()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise RecordingIOError(f"{self.part_path}: write failed: {exc}") from exc
        self._sha.update(data)
        self._bytes += len(data)

    def _reserve(self) -> None:
        """Reserve the next PREALLOCATE_BYTES past EOF (see fsutil.preallocate): about a
        third less written per fdatasync on ext4. Released at close by ftruncate."""
        start = max(self._allocated, self._bytes)
        if preallocate(self._fd, start, PREALLOCATE_BYTES):
            self._allocated = start + PREALLOCATE_BYTES
        else:
            self._allocated = 1 << 62  # unsupported here: stop trying

    def _sync_file(self, *, full: bool) -> None:
        """fdatasync after a record; full fsync for the header and at close."""
        if not self._sync:
            return
        try:
            (os.fsync if full else os.fdatasync)(self._fd)
        except OSError as exc:
            raise RecordingIOError(f"{self.part_path}: sync failed: {exc}") from exc

    def _finish(self) -> None:
        self._aead = None  # drop the payload key (see the class docstring)
        try:
            os.ftruncate(self._fd, self._bytes)  # release preallocated blocks past EOF
            self._sync_file(full=True)
        finally:
            os.close(self._fd)
        try:
            if self.path.exists():
                raise RecordingIOError(f"{self.path}: exists; {self.part_path} left in place")
            os.rename(self.part_path, self.path)
            if self._sync:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise RecordingIOError(f"{self.part_path}: cannot finish: {exc}") from exc


def _compact_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


# --- reading the framing (shared by recover and decrypt) ----------------------------
@dataclass(slots=True)
class _Prelude:
    plain: bytes  # magic line + JSON line (the associated data is its SHA-256)
    header: dict[str, Any]
    age_header: agecrypt.Header
    nonce: bytes
    length: int


def _read_plain(src: BinaryIO, path: Path) -> tuple[bytes, dict[str, Any]]:
    magic = src.readline(len(MAGIC_LINE))
    if magic != MAGIC_LINE:
        raise RecordingFormatError(f"{path}: not an EDGEREC1 recording (bad magic line)")
    line = src.readline(MAX_HEADER_JSON_BYTES + 1)
    if not line.endswith(b"\n"):
        raise RecordingFormatError(f"{path}: header JSON line truncated or too long")
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise RecordingFormatError(f"{path}: header JSON line is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise RecordingFormatError(f"{path}: header JSON line is not an object")
    return magic + line, header


def _read_prelude(src: BinaryIO, path: Path) -> _Prelude:
    plain, header = _read_plain(src, path)
    try:
        age_header, age_length = agecrypt.read_header(src)
    except agecrypt.AgeFormatError as exc:
        raise RecordingFormatError(f"{path}: {exc}") from exc
    nonce = src.read(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise RecordingFormatError(f"{path}: truncated inside the payload nonce")
    return _Prelude(plain, header, age_header, nonce, len(plain) + age_length + NONCE_BYTES)


class _FrameScanner:
    """Yields intact frames (offset, prefix + ciphertext); ``problem`` tells why it stopped."""

    def __init__(self, src: BinaryIO, offset: int) -> None:
        self._src = src
        self.offset = offset  # end of the last intact frame
        self.problem: str | None = None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while True:
            frame = self._next()
            if frame is None:
                return
            yield self.offset, frame
            self.offset += len(frame)

    def _next(self) -> bytes | None:
        prefix = agecrypt.read_full(self._src, FRAME_PREFIX.size)
        if not prefix:
            return None
        if len(prefix) < FRAME_PREFIX.size:
            return self._stop("truncated record prefix")
        length, crc = FRAME_PREFIX.unpack(prefix)
        if not MIN_SEALED <= length <= MAX_SEALED:
            return self._stop(f"record length {length} out of range")
        sealed = agecrypt.read_full(self._src, length)
        if len(sealed) < length:
            return self._stop("truncated record")
        if zlib.crc32(sealed) != crc:
            return self._stop("record CRC-32 mismatch")
        return prefix + sealed

    def _stop(self, problem: str) -> None:
        self.problem = f"{problem} at offset {self.offset}"


def read_plain_header(path: Path) -> dict[str, Any]:
    """The plain JSON header of a recording (or ``.part``); no key needed."""
    with open(path, "rb") as src:
        return _read_plain(src, Path(path))[1]


# --- device side: recovery at boot ----------------------------------------------------
def recover(part_path: Path, final_path: Path) -> RecoverySummary:
    """Close an interrupted ``.part``: cut after the last intact record, rename, sync.

    Needs no key. The result has no END record, which is how an interrupted recording
    is recognised when it is decrypted. A file whose header is torn raises
    :class:`RecordingFormatError` and is left untouched.
    """
    part_path, final_path = Path(part_path), Path(final_path)
    if final_path.exists():
        raise RecordingIOError(f"{final_path}: exists; not recovering {part_path} over it")
    with open(part_path, "r+b") as f:
        prelude = _read_prelude(f, part_path)
        f.seek(0)
        sha = hashlib.sha256(f.read(prelude.length))
        scanner = _FrameScanner(f, prelude.length)
        records = 0
        for _offset, frame in scanner:
            sha.update(frame)
            records += 1
        original_size = f.seek(0, os.SEEK_END)
        f.truncate(scanner.offset)
        os.fsync(f.fileno())
    os.rename(part_path, final_path)
    fsync_dir(final_path.parent)
    truncated = original_size - scanner.offset
    log.warning("recording %s: recovered %d records, cut %d bytes (%s)", final_path.name,
                records, truncated, scanner.problem or "clean end")
    return RecoverySummary(final_path, scanner.offset, sha.hexdigest(), records, truncated)


# --- central side: decryption ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Problem:
    kind: type[RecordingError]
    message: str


@dataclass(slots=True)
class _Timeline:
    """Assembles verified records into audio segments, gaps and the END facts."""

    segments: list[tuple[int, np.ndarray]] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    origin: int | None = None
    cursor: int | None = None
    audio_samples: int = 0
    ended: bool = False
    end_reason: str | None = None

    def add(self, plaintext: bytes, last: bool) -> str | None:
        """Apply one record; returns what is wrong with it, or None."""
        if len(plaintext) < RECORD_HEAD.size:
            return "record shorter than its type and start sample"
        record_type, start = RECORD_HEAD.unpack_from(plaintext)
        body = plaintext[RECORD_HEAD.size:]
        if last != (record_type == END):
            return "final-record flag and END type disagree"
        if self.cursor is not None and start < self.cursor:
            return f"starts at sample {start}, before the previous record ends ({self.cursor})"
        if record_type == AUDIO:
            return self._audio(start, body)
        if record_type == GAP:
            return self._gap(start, body)
        if record_type == END:
            return self._end(start, body)
        return f"unknown record type 0x{record_type:02x}"

    def _advance(self, start: int, end: int) -> str | None:
        if self.origin is None:
            self.origin = start
        elif self.cursor is not None and start > self.cursor:
            self.gaps.append(Gap(self.cursor, start, UNRECORDED))
        if end - self.origin > MAX_TIMELINE_SAMPLES:
            return f"timeline longer than {MAX_TIMELINE_SAMPLES} samples"
        self.cursor = end
        return None

    def _audio(self, start: int, body: bytes) -> str | None:
        if not body:
            return "empty AUDIO record"
        pcm = alaw_decode(body)
        self.segments.append((start, pcm))
        self.audio_samples += len(pcm)
        return self._advance(start, start + len(pcm))

    def _gap(self, start: int, body: bytes) -> str | None:
        if len(body) < GAP_END.size:
            return "GAP record without an end sample"
        (end,) = GAP_END.unpack_from(body)
        try:
            reason = body[GAP_END.size:].decode("utf-8")
        except UnicodeDecodeError:
            return "GAP reason is not UTF-8"
        if end < start:
            return f"GAP ends ({end}) before it starts ({start})"
        self.gaps.append(Gap(start, end, reason))
        return self._advance(start, end)

    def _end(self, start: int, body: bytes) -> str | None:
        try:
            facts = json.loads(body)
        except ValueError:
            return "END body is not JSON"
        if not isinstance(facts, dict) or not isinstance(facts.get("reason"), str):
            return "END body lacks a reason"
        if facts.get("samples", self.audio_samples) != self.audio_samples:
            return f"END counts {facts['samples']} samples, records hold {self.audio_samples}"
        self.ended, self.end_reason = True, facts["reason"]
        if self.origin is None:
            self.origin = self.cursor = start
        return None

    def pcm(self) -> np.ndarray:
        if self.origin is None or self.cursor is None:
            return np.zeros(0, dtype=np.int16)
        pcm = np.zeros(self.cursor - self.origin, dtype=np.int16)  # gaps stay silent
        for start, segment in self.segments:
            pcm[start - self.origin:start - self.origin + len(segment)] = segment
        return pcm


def _unwrap(prelude: _Prelude, identities: Sequence[Identity], path: Path) -> bytes:
    try:
        return agecrypt.unwrap_file_key(prelude.age_header, identities)
    except agecrypt.NoMatchingIdentity as exc:
        raise NoMatchingIdentity(f"{path}: {exc}") from exc
    except agecrypt.AgeAuthError as exc:
        raise RecordingAuthError(f"{path}: {exc}") from exc
    except agecrypt.AgeFormatError as exc:
        raise RecordingFormatError(f"{path}: {exc}") from exc


def _check_codec(header: dict[str, Any], path: Path) -> None:
    if header.get("codec") != CODEC or header.get("sample_rate") != SAMPLE_RATE:
        raise RecordingFormatError(f"{path}: header says codec {header.get('codec')!r} at "
                                   f"{header.get('sample_rate')!r} Hz; expected {CODEC!r} 8000")


def _open_record(aead: ChaCha20Poly1305, counter: int, sealed: bytes,
                 ad: bytes) -> tuple[bytes, bool] | None:
    """(plaintext, is_final) of record ``counter``, or None if it is not authentic."""
    for last in (False, True):
        try:
            return aead.decrypt(agecrypt.stream_nonce(counter, last), sealed, ad), last
        except InvalidTag:
            continue
    return None


def _read_records(src: BinaryIO, prelude: _Prelude, aead: ChaCha20Poly1305,
                  timeline: _Timeline) -> tuple[int, _Problem | None]:
    """Feed every authentic record to ``timeline``; (records read, first problem)."""
    ad = hashlib.sha256(prelude.plain).digest()
    scanner = _FrameScanner(src, prelude.length)
    counter = 0
    for offset, frame in scanner:
        where = f"record {counter} at offset {offset}"
        if timeline.ended:
            return counter, _Problem(RecordingFormatError, f"{where}: data after the END record")
        opened = _open_record(aead, counter, frame[FRAME_PREFIX.size:], ad)
        if opened is None:
            return counter, _Problem(RecordingAuthError,
                                     f"{where}: fails authentication (altered or reordered)")
        problem = timeline.add(*opened)
        if problem:
            return counter, _Problem(RecordingFormatError, f"{where}: {problem}")
        counter += 1
    if scanner.problem:
        after_end = "data after the END record: " if timeline.ended else ""
        return counter, _Problem(RecordingFormatError, after_end + scanner.problem)
    return counter, None


def decrypt_recording(path: Path, identities: Sequence[Identity], *,
                      strict: bool = False) -> DecryptedRecording:
    """Decrypt and verify a recording.

    Header problems (magic, JSON, age header, no matching identity) always raise. A bad
    record stops reading: the audio verified before it is returned with ``error`` set,
    unless ``strict``, which raises on any problem, including a missing END record.
    """
    path = Path(path)
    with open(path, "rb") as src:
        prelude = _read_prelude(src, path)
        _check_codec(prelude.header, path)
        payload_key = agecrypt.derive_payload_key(_unwrap(prelude, identities, path),
                                                  prelude.nonce)
        timeline = _Timeline()
        records, problem = _read_records(src, prelude, ChaCha20Poly1305(payload_key), timeline)
    if strict and problem is not None:
        raise problem.kind(f"{path}: {problem.message}")
    if strict and not timeline.ended:
        raise RecordingFormatError(f"{path}: no END record (interrupted or truncated)")
    if problem is not None:
        log.warning("recording %s: stopped early: %s", path.name, problem.message)
    return DecryptedRecording(
        header=prelude.header, pcm=timeline.pcm(), start_sample=timeline.origin or 0,
        gaps=timeline.gaps, complete=timeline.ended and problem is None,
        end_reason=timeline.end_reason, error=problem.message if problem else None,
        records=records)


# --- central side: standard outputs ---------------------------------------------------
def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A standard mono 16-bit PCM WAV file (format tag 1) holding ``pcm``."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def _write_atomically(path: Path, data: BinaryIO) -> None:
    """Copy ``data`` to ``<path>.part``, fsync, rename over ``path``, fsync the directory."""
    part = part_path_for(path)
    try:
        with open(part, "wb") as dst:
            while chunk := data.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(part, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise RecordingIOError(f"{path}: cannot write: {exc}") from exc


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``pcm`` as a standard 16-bit PCM WAV file (write, then rename)."""
    _write_atomically(Path(path), io.BytesIO(wav_bytes(pcm, sample_rate)))


def export_age(rec_path: Path, identities: Sequence[Identity], out_path: Path,
               recipients: Sequence[Recipient], *, strict: bool = False) -> DecryptedRecording:
    """Re-encrypt a recording as a standard age file whose plaintext is a WAV file.

    ``age -d -i key.txt out.age > call.wav`` then gives a playable file. Returns the
    decrypted recording so the caller sees ``complete`` and ``error``.
    """
    recording = decrypt_recording(rec_path, identities, strict=strict)
    sealed = io.BytesIO()
    agecrypt.encrypt_stream(io.BytesIO(wav_bytes(recording.pcm, recording.sample_rate)), sealed,
                            recipients)
    sealed.seek(0)
    _write_atomically(Path(out_path), sealed)
    log.info("recording %s: exported to %s", Path(rec_path).name, Path(out_path).name)
    return recording
