"""The tamper-evident audit trail: canonical entries, the hash chain, signed checkpoints.

Entries are written by :class:`firmware.catalogue.Txn` in the same SQLite transaction as
the state change they describe. Everything here except :func:`verify_audit` is pure and
needs only public keys, so the central side reuses :func:`verify_entries` on uploaded
batches. The byte-level format is in docs/FORMAT.md, "Audit trail and catalogue".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware.keys import key_id

log = logging.getLogger(__name__)

HASH_BYTES = 32  # SHA-256 output (FIPS 180-4)
GENESIS_HASH = bytes(HASH_BYTES)  # the "previous hash" of entry 1
GENESIS_HEX = GENESIS_HASH.hex()
# Checkpoint origin line, after C2SP tlog-checkpoint ("<origin>\n<size>\n<b64 hash>\n").
ORIGIN_PREFIX = "edge-recorder/audit/"
CHECKPOINT_KIND = "checkpoint"
# Entries whose data.sha256 is the sha256 of the recording file named by the subject.
FILE_HASH_KINDS = frozenset({"recording.closed", "recording.recovered"})
KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
# Append-only triggers created by the catalogue schema (defence in depth).
APPEND_ONLY_TRIGGERS = frozenset({
    "audit_no_update", "audit_no_delete",
    "checkpoints_no_update", "checkpoints_no_delete",
})

# The kinds of entry the appliance writes (docs/FORMAT.md lists their data).
AUDIT_KINDS: Mapping[str, str] = {
    "device.started": "the daemon started (subject: device id)",
    "device.stopped": "the daemon stopped cleanly (subject: device id)",
    "call.started": "a call began on a line (subject: call id)",
    "call.direction": "the call's direction became known or changed",
    "call.answered": "the call was answered",
    "call.numbers": "caller id / dialed number learnt (as commitments, not in clear)",
    "call.transition": "any other state change of the call engine",
    "call.ended": "the call ended",
    "recording.opened": "a recording file was created (subject: recording id)",
    "recording.segment": "a long call continued in a new recording segment",
    "recording.closed": "a recording was completed, sealed and hashed",
    "recording.recovered": "a recording left open by a crash was closed at start-up",
    "recording.failed": "a recording file could not be created",
    "recording.deleted": "a recording file was deleted (retention or command)",
    "decision": "the compliance policy decided about a call",
    CHECKPOINT_KIND: "a signed checkpoint of the chain head was stored",
}


class AuditError(Exception):
    """Base of audit trail errors; the message names the entry, checkpoint or file."""


class AuditFormatError(AuditError):
    """An entry, a checkpoint or its body is malformed."""


class AuditOpenError(AuditError):
    """The audit database cannot be opened or read."""


class ChainHead(NamedTuple):
    """The chain after ``count`` entries; ``hash`` is hex (GENESIS_HEX for 0)."""

    count: int
    hash: str


GENESIS_HEAD = ChainHead(0, GENESIS_HEX)


def canonical_json(value: Any) -> str:
    """The one JSON encoding hashed by the chain (sorted keys, no spaces, raw UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def canonical_entry_bytes(seq: int, wall: float, synced: bool, kind: str, subject: str,
                          data: Mapping[str, Any]) -> bytes:
    record = {"seq": seq, "wall": wall, "synced": synced, "kind": kind,
              "subject": subject, "data": data}
    return canonical_json(record).encode("utf-8")


def entry_hash(prev_hash: bytes, canonical: bytes) -> bytes:
    """SHA-256(previous entry hash || canonical entry bytes)."""
    return hashlib.sha256(prev_hash + canonical).digest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One stored entry; ``data_json`` is the canonical JSON of the data object."""

    seq: int
    wall: float
    synced: bool
    kind: str
    subject: str
    data_json: str
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data_json)
        return value

    def canonical_bytes(self) -> bytes:
        return canonical_entry_bytes(self.seq, self.wall, self.synced, self.kind,
                                     self.subject, self.data)

    def to_dict(self) -> dict[str, Any]:
        """The stored fields, for an upload batch (see :meth:`from_dict`)."""
        return {"seq": self.seq, "wall": self.wall, "synced": self.synced,
                "kind": self.kind, "subject": self.subject, "data": self.data_json,
                "prev_hash": self.prev_hash, "hash": self.hash}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AuditEntry:
        try:
            return cls(seq=int(raw["seq"]), wall=float(raw["wall"]),
                       synced=bool(raw["synced"]), kind=str(raw["kind"]),
                       subject=str(raw["subject"]), data_json=str(raw["data"]),
                       prev_hash=str(raw["prev_hash"]), hash=str(raw["hash"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditFormatError(f"audit entry {raw.get('seq')!r}: malformed ({exc})") from exc


def make_entry(prev: ChainHead, wall: float, synced: bool, kind: str, subject: str,
               data: Mapping[str, Any]) -> AuditEntry:
    """The entry that follows ``prev``; ``wall`` is rounded to the millisecond."""
    if not KIND_PATTERN.fullmatch(kind):
        raise AuditFormatError(f"audit kind {kind!r}: expected lower-case dotted words")
    seq = prev.count + 1
    wall_ms = round(float(wall), 3)
    try:
        data_json = canonical_json(dict(data))
        canonical = canonical_entry_bytes(seq, wall_ms, synced, kind, subject, data)
    except (TypeError, ValueError) as exc:
        raise AuditFormatError(f"audit {kind} {subject}: data is not plain JSON ({exc})") from exc
    digest = entry_hash(bytes.fromhex(prev.hash), canonical)
    return AuditEntry(seq, wall_ms, synced, kind, subject, data_json, prev.hash, digest.hex())


# --- checkpoints --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the device's chain had ``count`` entries ending in ``head_hash``."""

    count: int
    head_hash: str  # hex
    time: int  # Unix seconds when signed
    key_id: str
    signature: str  # base64 of the 64-byte Ed25519 signature over ``body``
    body: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "head_hash": self.head_hash, "time": self.time,
                "key_id": self.key_id, "signature": self.signature, "body": self.body}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Checkpoint:
        try:
            return cls(count=int(raw["count"]), head_hash=str(raw["head_hash"]),
                       time=int(raw["time"]), key_id=str(raw["key_id"]),
                       signature=str(raw["signature"]), body=str(raw["body"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditFormatError(f"checkpoint {raw.get('count')!r}: malformed ({exc})") from exc


class CheckpointBody(NamedTuple):
    device_id: str
    count: int
    head_hash: str  # hex
    time: int


def checkpoint_body(device_id: str, count: int, head_hash: str, unix_time: int) -> str:
    """``edge-recorder/audit/<device_id>\\n<count>\\n<base64 head>\\n<unix time>\\n``."""
    head_b64 = base64.b64encode(bytes.fromhex(head_hash)).decode("ascii")
    return f"{ORIGIN_PREFIX}{device_id}\n{count}\n{head_b64}\n{unix_time}\n"


def parse_checkpoint_body(body: str) -> CheckpointBody:
    lines = body.split("\n")
    if len(lines) != 5 or lines[4] != "" or not lines[0].startswith(ORIGIN_PREFIX):
        raise AuditFormatError(f"checkpoint body {body[:60]!r}: not 4 lines with the origin")
    try:
        head = base64.b64decode(lines[2], validate=True)
        count, unix_time = int(lines[1]), int(lines[3])
    except (binascii.Error, ValueError) as exc:
        raise AuditFormatError(f"checkpoint body {body[:60]!r}: {exc}") from exc
    if len(head) != HASH_BYTES:
        raise AuditFormatError(f"checkpoint body {body[:60]!r}: head is not {HASH_BYTES} bytes")
    return CheckpointBody(lines[0][len(ORIGIN_PREFIX):], count, head.hex(), unix_time)


def sign_checkpoint(key: Ed25519PrivateKey, device_id: str, head: ChainHead,
                    unix_time: int) -> Checkpoint:
    body = checkpoint_body(device_id, head.count, head.hash, unix_time)
    signature = key.sign(body.encode("utf-8"))
    return Checkpoint(head.count, head.hash, unix_time, key_id(key.public_key()),
                      base64.b64encode(signature).decode("ascii"), body)


# --- verification -------------------------------------------------------------------

PublicKeys = Ed25519PublicKey | Iterable[Ed25519PublicKey]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding; ``seq`` is the first entry it puts in doubt, if it names one."""

    message: str
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class AuditReport:
    ok: bool
    entries: int  # entries seen (the highest seq)
    checkpoints: int
    first_bad_seq: int | None
    message: str
    head: ChainHead = GENESIS_HEAD  # the verified head (up to the first bad entry)
    signed_count: int = 0  # entries covered by the last valid, matching checkpoint
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    files_checked: int = 0  # recording files hashed (verify_audit(check_files=True))


@dataclass(slots=True)
class _Walk:
    """What walking the chain found."""

    head: ChainHead
    last_seq: int
    heads: dict[int, str] = field(default_factory=dict)  # count -> head at that count
    checkpoint_refs: dict[int, int] = field(default_factory=dict)  # entry seq -> count
    problem: Problem | None = None


def verify_entries(entries: Iterable[AuditEntry], checkpoints: Sequence[Checkpoint],
                   public_key: PublicKeys, *, device_id: str | None = None,
                   start: ChainHead = GENESIS_HEAD) -> AuditReport:
    """Check a run of entries (seq ``start.count + 1`` onwards) and their checkpoints.

    ``entries`` is consumed once, in order, so a large trail streams. A batch from the
    middle of a chain passes the head it continues from as ``start`` and must carry
    every checkpoint whose count lies in its range.
    """
    keys = _key_map(public_key)
    ordered = sorted(checkpoints, key=lambda cp: cp.count)
    walk = _walk_chain(entries, start, {cp.count for cp in ordered})
    problems = [walk.problem] if walk.problem else []
    cp_problems, signed_count = _check_checkpoints(ordered, walk, keys, device_id, start)
    problems += cp_problems
    problems += _check_checkpoint_refs(walk, {cp.count for cp in ordered}, start)
    return _report(walk, len(ordered), signed_count, problems)


def _key_map(public_key: PublicKeys) -> dict[str, Ed25519PublicKey]:
    if isinstance(public_key, Ed25519PublicKey):
        return {key_id(public_key): public_key}
    return {key_id(key): key for key in public_key}


def _walk_chain(entries: Iterable[AuditEntry], start: ChainHead, wanted: set[int]) -> _Walk:
    walk = _Walk(head=start, last_seq=start.count)
    if start.count in wanted:
        walk.heads[start.count] = start.hash
    for entry in entries:
        if walk.problem is None:
            walk.problem = _check_entry(entry, walk.head)
        if walk.problem is None:
            walk.head = ChainHead(entry.seq, entry.hash)
            _note_entry(walk, entry, wanted)
        walk.last_seq = max(walk.last_seq, entry.seq)
    return walk


def _note_entry(walk: _Walk, entry: AuditEntry, wanted: set[int]) -> None:
    if entry.seq in wanted:
        walk.heads[entry.seq] = entry.hash
    if entry.kind == CHECKPOINT_KIND:
        count = entry.data.get("count")
        if isinstance(count, int):
            walk.checkpoint_refs[entry.seq] = count


def _check_entry(entry: AuditEntry, prev: ChainHead) -> Problem | None:
    """The first thing wrong with ``entry`` as the successor of ``prev``, if any."""
    expected = prev.count + 1
    if entry.seq > expected:
        return Problem(f"entry {expected}: missing (the next stored entry is {entry.seq}; "
                       f"entries deleted?)", expected)
    if entry.seq < expected:
        return Problem(f"entry {entry.seq}: out of order or duplicated after entry "
                       f"{prev.count}", entry.seq)
    if entry.prev_hash != prev.hash:
        return Problem(f"entry {entry.seq}: prev_hash does not link to entry {prev.count}",
                       entry.seq)
    return _check_content(entry, prev)


def _check_content(entry: AuditEntry, prev: ChainHead) -> Problem | None:
    try:
        data = entry.data
        canonical = entry.canonical_bytes()
    except ValueError as exc:
        return Problem(f"entry {entry.seq}: data is not valid JSON ({exc})", entry.seq)
    if not isinstance(data, dict) or canonical_json(data) != entry.data_json:
        return Problem(f"entry {entry.seq}: data is not in canonical form (edited?)", entry.seq)
    if entry_hash(bytes.fromhex(prev.hash), canonical).hex() != entry.hash:
        return Problem(f"entry {entry.seq}: hash mismatch (data changed?)", entry.seq)
    return None


def _check_checkpoints(ordered: Sequence[Checkpoint], walk: _Walk,
                       keys: Mapping[str, Ed25519PublicKey], device_id: str | None,
                       start: ChainHead) -> tuple[list[Problem], int]:
    problems: list[Problem] = []
    last_good = start.count
    for cp in ordered:
        problem = _check_signed(cp, keys, device_id) or _check_coverage(cp, walk, last_good)
        if problem is not None:
            problems.append(problem)
        elif cp.count in walk.heads:
            last_good = cp.count
    return problems, last_good


def _check_signed(cp: Checkpoint, keys: Mapping[str, Ed25519PublicKey],
                  device_id: str | None) -> Problem | None:
    key = keys.get(cp.key_id)
    if key is None:
        return Problem(f"checkpoint {cp.count}: signed by unknown key {cp.key_id} "
                       f"(known: {', '.join(sorted(keys)) or 'none'})")
    try:
        key.verify(base64.b64decode(cp.signature, validate=True), cp.body.encode("utf-8"))
    except (InvalidSignature, binascii.Error):
        return Problem(f"checkpoint {cp.count}: bad signature (key {cp.key_id})")
    try:
        body = parse_checkpoint_body(cp.body)
    except AuditFormatError as exc:
        return Problem(f"checkpoint {cp.count}: {exc}")
    if (body.count, body.head_hash, body.time) != (cp.count, cp.head_hash, cp.time):
        return Problem(f"checkpoint {cp.count}: stored fields differ from its signed body")
    if device_id is not None and body.device_id != device_id:
        return Problem(f"checkpoint {cp.count}: signed for device {body.device_id!r}, "
                       f"not {device_id!r}")
    return None


def _check_coverage(cp: Checkpoint, walk: _Walk, last_good: int) -> Problem | None:
    if cp.count > walk.last_seq:
        return Problem(f"checkpoint {cp.count}: covers {cp.count} entries but the trail ends "
                       f"at entry {walk.last_seq} (entries deleted or database rolled back)",
                       walk.last_seq + 1)
    head = walk.heads.get(cp.count)
    if head is not None and head != cp.head_hash:
        return Problem(f"checkpoint {cp.count}: head does not match entries 1..{cp.count} "
                       f"(chain rewritten after entry {last_good})", last_good + 1)
    return None


def _check_checkpoint_refs(walk: _Walk, stored: set[int], start: ChainHead) -> list[Problem]:
    return [Problem(f"entry {seq}: records checkpoint {count}, which is not stored "
                    f"(checkpoint deleted?)", seq)
            for seq, count in sorted(walk.checkpoint_refs.items())
            if count >= start.count and count not in stored]


def _report(walk: _Walk, checkpoints: int, signed_count: int,
            problems: list[Problem]) -> AuditReport:
    with_seq = [p.seq for p in problems if p.seq is not None]
    first_bad = min(with_seq) if with_seq else None
    ordered = sorted(problems, key=lambda p: p.seq if p.seq is not None else walk.last_seq + 2)
    if ordered:
        message = ordered[0].message
    elif walk.last_seq == 0:
        message = "no audit entries"
    else:
        message = (f"audit trail intact: {walk.last_seq} entries, {checkpoints} signed "
                   f"checkpoint(s), signed up to entry {signed_count}")
    return AuditReport(ok=not problems, entries=walk.last_seq, checkpoints=checkpoints,
                       first_bad_seq=first_bad, message=message, head=walk.head,
                       signed_count=signed_count,
                       problems=tuple(p.message for p in ordered))


# --- the database wrapper -----------------------------------------------------------

def verify_audit(db_path: Path, public_key: PublicKeys, *, device_id: str | None = None,
                 check_files: bool = False) -> AuditReport:
    """Verify the audit trail of a catalogue database, opened read-only.

    Needs only public keys. Reports the first broken entry (see :func:`verify_entries`).
    With ``check_files``, every recording file not marked deleted must also hash to the
    sha256 its ``recording.closed``/``recording.recovered`` entry recorded.
    """
    if not db_path.is_file():
        raise AuditOpenError(f"{db_path}: no such database")
    conn = _open_read_only(db_path)
    audited: dict[str, tuple[int, str]] = {}
    try:
        checkpoints = read_checkpoints(conn)
        entries = read_entries(conn)
        report = verify_entries(_collect_file_hashes(entries, audited) if check_files
                                else entries, checkpoints, public_key, device_id=device_id)
        missing = sorted(APPEND_ONLY_TRIGGERS - _trigger_names(conn))
        rows = _recording_rows(conn) if check_files else []
    except sqlite3.Error as exc:
        raise AuditOpenError(f"{db_path}: cannot read the audit tables ({exc})") from exc
    finally:
        conn.close()
    if check_files:
        report = _with_file_problems(report, check_recording_files(db_path.parent, rows, audited),
                                     len(rows))
    if missing:
        warning = f"append-only triggers missing: {', '.join(missing)}"
        log.warning("%s: %s", db_path, warning)
        report = replace(report, warnings=(*report.warnings, warning))
    return report


def _collect_file_hashes(entries: Iterable[AuditEntry],
                         audited: dict[str, tuple[int, str]]) -> Iterator[AuditEntry]:
    """Pass entries through, noting the last audited sha256 of each recording."""
    for entry in entries:
        if entry.kind in FILE_HASH_KINDS:
            try:
                digest = entry.data.get("sha256")
            except (ValueError, AttributeError):
                digest = None
            if isinstance(digest, str):
                audited[entry.subject] = (entry.seq, digest)
        yield entry


def _recording_rows(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    rows = conn.execute("SELECT id, path, sha256 FROM recordings WHERE deleted_at IS NULL "
                        "AND state != 'recording' ORDER BY created_at, id")
    return [(str(rid), str(path), sha) for rid, path, sha in rows]


def check_recording_files(base_dir: Path, rows: Iterable[tuple[str, str, str | None]],
                          audited: Mapping[str, tuple[int, str]]) -> list[str]:
    """Problems with recording files against their audited sha256 (rows: id, path, sha256)."""
    problems = []
    for rec_id, path_text, row_sha in rows:
        seq, digest = audited.get(rec_id, (None, None))
        if seq is None or digest is None:
            if row_sha is not None:
                problems.append(f"recording {rec_id}: has a sha256 but no audit entry records it")
            continue
        problem = _check_file(base_dir / path_text, row_sha, digest)
        if problem:
            problems.append(f"recording {rec_id}: {problem} (audited in entry {seq})")
    return problems


def _check_file(path: Path, row_sha: str | None, digest: str) -> str | None:
    if row_sha != digest:
        return "catalogue sha256 differs from the audited one"
    try:
        with path.open("rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        return f"file {path} is missing"
    except OSError as exc:
        return f"file {path} cannot be read ({exc.strerror})"
    return None if actual == digest else f"file {path} does not match its audited sha256"


def _with_file_problems(report: AuditReport, problems: list[str], files: int) -> AuditReport:
    if not problems:
        return replace(report, files_checked=files)
    message = report.message if not report.ok else problems[0]
    return replace(report, ok=False, message=message, files_checked=files,
                   problems=(*report.problems, *problems))


def _open_read_only(db_path: Path) -> sqlite3.Connection:
    uri = db_path.resolve().as_uri() + "?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise AuditOpenError(f"{db_path}: cannot open read-only ({exc})") from exc


def read_entries(conn: sqlite3.Connection, after_seq: int = 0,
                 limit: int | None = None) -> Iterator[AuditEntry]:
    """Entries in seq order from a catalogue connection (streamed)."""
    cursor = conn.execute(
        "SELECT seq, wall, wall_synced, kind, subject, data, prev_hash, hash FROM audit "
        "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, -1 if limit is None else limit))
    for seq, wall, synced, kind, subject, data, prev_hash, digest in cursor:
        yield AuditEntry(seq, float(wall), bool(synced), kind, subject, data, prev_hash, digest)


def read_checkpoints(conn: sqlite3.Connection, after_count: int = 0) -> list[Checkpoint]:
    rows = conn.execute(
        "SELECT count, head_hash, wall, key_id, signature, body FROM checkpoints "
        "WHERE count > ? ORDER BY count", (after_count,))
    return [Checkpoint(count, head, int(wall), kid, sig, body)
            for count, head, wall, kid, sig, body in rows]


def _trigger_names(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    return {name for (name,) in rows}
