"""The central catalogue: one interface, two backends (SQLite embedded, PostgreSQL).

``open_catalogue(url)`` takes ``sqlite:///path/to/central.db`` (or a bare path) or
``postgresql://...``; psycopg is imported only for the latter. Every method is one
transaction; a write returns only after its commit is durable (SQLite
``synchronous=FULL`` in WAL mode; PostgreSQL's default ``synchronous_commit=on``), except
:meth:`Catalogue.put_statuses`, which keeps fleet status (replaced by the next heartbeat
anyway) on a cheaper path. The schema is in docs/CENTRAL.md.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.audit import GENESIS_HEAD, AuditEntry, ChainHead, Checkpoint

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 30_000  # several worker processes may share one SQLite file

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS recordings (
        recording_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, sha256 TEXT NOT NULL,
        size BIGINT NOT NULL, manifest TEXT NOT NULL, manifest_sig TEXT NOT NULL,
        object_path TEXT NOT NULL, stored_at TEXT NOT NULL, started_at TEXT,
        retention_until TEXT, numbers TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS recordings_device ON recordings (device_id, started_at)",
    """CREATE TABLE IF NOT EXISTS tombstones (
        recording_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, sha256 TEXT,
        size BIGINT, cause TEXT NOT NULL, reason TEXT NOT NULL, requested_at TEXT,
        erased_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_entries (
        device_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL,
        subject TEXT NOT NULL, hash TEXT NOT NULL, entry TEXT NOT NULL,
        PRIMARY KEY (device_id, seq))""",
    "CREATE INDEX IF NOT EXISTS audit_subject ON audit_entries (device_id, subject)",
    """CREATE TABLE IF NOT EXISTS audit_checkpoints (
        device_id TEXT NOT NULL, count BIGINT NOT NULL, checkpoint TEXT NOT NULL,
        PRIMARY KEY (device_id, count))""",
    """CREATE TABLE IF NOT EXISTS audit_heads (
        device_id TEXT PRIMARY KEY, count BIGINT NOT NULL, hash TEXT NOT NULL,
        receipt_sig TEXT NOT NULL, updated_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS alerts (
        device_id TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
        detail TEXT NOT NULL, at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS exports (
        at TEXT NOT NULL, who TEXT NOT NULL, why TEXT NOT NULL, recording_ids TEXT NOT NULL,
        out TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fleet_status (
        device_id TEXT PRIMARY KEY, session BIGINT NOT NULL, state TEXT NOT NULL,
        since TEXT NOT NULL, received_at TEXT NOT NULL, status TEXT NOT NULL)""",
)


class CatalogueError(Exception):
    """The catalogue cannot be opened or used (URL, server, schema)."""


class _HeadMoved(Exception):
    """Another worker extended the chain first: roll back."""


@dataclass(frozen=True, slots=True)
class StoredRecording:
    recording_id: str
    device_id: str
    sha256: str
    size: int
    manifest: dict[str, Any]
    manifest_sig: str
    object_path: str
    stored_at: str
    started_at: str | None
    retention_until: str | None


@dataclass(frozen=True, slots=True)
class AnchoredHead:
    count: int
    hash: str
    receipt_sig: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class StatusRow:
    device_id: str
    session: int
    state: str
    since: str
    received_at: str
    status: dict[str, Any]


REC_COLUMNS = ("recording_id, device_id, sha256, size, manifest, manifest_sig, object_path, "
               "stored_at, started_at, retention_until")


class Catalogue(Protocol):
    """What the ingest, the anchoring, the fleet monitor and the export need."""

    def close(self) -> None: ...
    def get_recording(self, recording_id: str) -> StoredRecording | None: ...
    def add_recording(self, rec: StoredRecording) -> bool: ...
    def search(self, *, number: str | None = None, device_id: str | None = None,
               start: str | None = None, end: str | None = None) -> list[StoredRecording]: ...
    def expired(self, now_iso: str) -> list[StoredRecording]: ...
    def erase(self, rec: StoredRecording, *, cause: str, reason: str,
              requested_at: str | None, erased_at: str) -> None: ...
    def tombstone(self, recording_id: str) -> dict[str, Any] | None: ...
    def add_tombstone(self, device_id: str, recording_id: str, *, cause: str, reason: str,
                      requested_at: str | None, erased_at: str) -> None: ...
    def audit_head(self, device_id: str) -> AnchoredHead | None: ...
    def audit_hashes(self, device_id: str, first: int, last: int) -> dict[int, str]: ...
    def anchor(self, device_id: str, start: ChainHead, entries: Sequence[AuditEntry],
               checkpoints: Sequence[Checkpoint], head: ChainHead, receipt_sig: str,
               now_iso: str) -> bool: ...
    def audit_entries(self, device_id: str, first: int, last: int) -> list[AuditEntry]: ...
    def audit_checkpoints(self, device_id: str, first: int,
                          last: int) -> list[Checkpoint]: ...
    def first_seq_about(self, device_id: str, subject: str) -> int | None: ...
    def add_alert(self, device_id: str, kind: str, subject: str, detail: str,
                  at_iso: str) -> None: ...
    def alerts(self, device_id: str | None = None) -> list[dict[str, Any]]: ...
    def add_export(self, at_iso: str, who: str, why: str, recording_ids: Sequence[str],
                   out: str) -> None: ...
    def exports(self) -> list[dict[str, Any]]: ...
    def put_statuses(self, rows: Sequence[StatusRow]) -> None: ...
    def statuses(self) -> list[StatusRow]: ...


class SqlCatalogue:
    """The SQL shared by both backends; placeholders are written ``?``."""

    placeholder = "?"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # --- backend hooks -----------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _insert_ignore(self, table: str, columns: str, count: int) -> str:
        marks = ", ".join([self.placeholder] * count)
        return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"  # noqa: S608 - constant SQL

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run(self, cur: Any, text: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(text), tuple(params))
        return cur

    def close(self) -> None:
        raise NotImplementedError

    def _create_schema(self) -> None:
        with self._tx() as cur:
            for statement in SCHEMA:
                cur.execute(statement)

    # --- recordings --------------------------------------------------------------------
    def get_recording(self, recording_id: str) -> StoredRecording | None:
        with self._tx() as cur:
            row = self._run(cur, f"SELECT {REC_COLUMNS} FROM recordings WHERE recording_id = ?",  # noqa: S608 - constant columns
                            (recording_id,)).fetchone()
        return _recording(row) if row else None

    def add_recording(self, rec: StoredRecording) -> bool:
        """Insert the row; False when the id was stored before (idempotent)."""
        numbers = " ".join(_numbers(rec.manifest))
        with self._tx() as cur:
            cur.execute(self._insert_ignore("recordings", REC_COLUMNS + ", numbers", 11),
                        (rec.recording_id, rec.device_id, rec.sha256, rec.size,
                         json.dumps(rec.manifest), rec.manifest_sig, rec.object_path,
                         rec.stored_at, rec.started_at, rec.retention_until, numbers))
            return bool(cur.rowcount == 1)

    def search(self, *, number: str | None = None, device_id: str | None = None,
               start: str | None = None, end: str | None = None) -> list[StoredRecording]:
        where, params = ["1 = 1"], []
        for clause, value in (("numbers LIKE ?", f"%{number}%" if number else None),
                              ("device_id = ?", device_id), ("started_at >= ?", start),
                              ("started_at < ?", end)):
            if value:
                where.append(clause)
                params.append(value)
        text = (f"SELECT {REC_COLUMNS} FROM recordings WHERE {' AND '.join(where)} "  # noqa: S608 - constant SQL
                "ORDER BY started_at, recording_id")
        with self._tx() as cur:
            return [_recording(r) for r in self._run(cur, text, params).fetchall()]

    def expired(self, now_iso: str) -> list[StoredRecording]:
        text = (f"SELECT {REC_COLUMNS} FROM recordings WHERE retention_until IS NOT NULL "  # noqa: S608 - constant SQL
                "AND retention_until < ? ORDER BY retention_until")
        with self._tx() as cur:
            return [_recording(r) for r in self._run(cur, text, (now_iso,)).fetchall()]

    def erase(self, rec: StoredRecording, *, cause: str, reason: str,
              requested_at: str | None, erased_at: str) -> None:
        """The row goes, its tombstone comes, in one transaction."""
        with self._tx() as cur:
            self._run(cur, "DELETE FROM recordings WHERE recording_id = ?", (rec.recording_id,))
            self._tombstone(cur, rec.device_id, rec.recording_id, rec.sha256, rec.size,
                            cause, reason, requested_at, erased_at)

    def add_tombstone(self, device_id: str, recording_id: str, *, cause: str, reason: str,
                      requested_at: str | None, erased_at: str) -> None:
        with self._tx() as cur:
            self._tombstone(cur, device_id, recording_id, None, None, cause, reason,
                            requested_at, erased_at)

    def _tombstone(self, cur: Any, *values: Any) -> None:
        cur.execute(self._insert_ignore(
            "tombstones", "device_id, recording_id, sha256, size, cause, reason, "
            "requested_at, erased_at", 8), values)

    def tombstone(self, recording_id: str) -> dict[str, Any] | None:
        with self._tx() as cur:
            row = self._run(cur, "SELECT device_id, recording_id, sha256, size, cause, reason, "
                            "requested_at, erased_at FROM tombstones WHERE recording_id = ?",
                            (recording_id,)).fetchone()
        keys = ("device_id", "recording_id", "sha256", "size", "cause", "reason",
                "requested_at", "erased_at")
        return dict(zip(keys, row, strict=True)) if row else None

    # --- audit -------------------------------------------------------------------------
    def audit_head(self, device_id: str) -> AnchoredHead | None:
        with self._tx() as cur:
            row = self._run(cur, "SELECT count, hash, receipt_sig, updated_at FROM audit_heads "
                            "WHERE device_id = ?", (device_id,)).fetchone()
        return AnchoredHead(int(row[0]), row[1], row[2], row[3]) if row else None

    def audit_hashes(self, device_id: str, first: int, last: int) -> dict[int, str]:
        with self._tx() as cur:
            rows = self._run(cur, "SELECT seq, hash FROM audit_entries WHERE device_id = ? "
                             "AND seq BETWEEN ? AND ?", (device_id, first, last)).fetchall()
        return {int(seq): str(digest) for seq, digest in rows}

    def anchor(self, device_id: str, start: ChainHead, entries: Sequence[AuditEntry],
               checkpoints: Sequence[Checkpoint], head: ChainHead, receipt_sig: str,
               now_iso: str) -> bool:
        """Append verified entries and move the head; False if another worker moved it."""
        try:
            with self._tx() as cur:
                if not self._move_head(cur, device_id, start, head, receipt_sig, now_iso):
                    raise _HeadMoved
                self._append_audit(cur, device_id, entries, checkpoints)
        except _HeadMoved:
            return False
        return True

    def _move_head(self, cur: Any, device_id: str, start: ChainHead, head: ChainHead,
                   receipt_sig: str, now_iso: str) -> bool:
        """Compare-and-set of the head, so two workers cannot both extend it."""
        if start == GENESIS_HEAD:
            cur.execute(self._insert_ignore(
                "audit_heads", "device_id, count, hash, receipt_sig, updated_at", 5),
                (device_id, head.count, head.hash, receipt_sig, now_iso))
        else:
            self._run(cur, "UPDATE audit_heads SET count = ?, hash = ?, receipt_sig = ?, "
                      "updated_at = ? WHERE device_id = ? AND count = ? AND hash = ?",
                      (head.count, head.hash, receipt_sig, now_iso, device_id, start.count,
                       start.hash))
        return bool(cur.rowcount == 1)

    def _append_audit(self, cur: Any, device_id: str, entries: Sequence[AuditEntry],
                      checkpoints: Sequence[Checkpoint]) -> None:
        cur.executemany(self._insert_ignore(
            "audit_entries", "device_id, seq, kind, subject, hash, entry", 6),
            [(device_id, e.seq, e.kind, e.subject, e.hash, json.dumps(e.to_dict()))
             for e in entries])
        cur.executemany(self._insert_ignore("audit_checkpoints", "device_id, count, checkpoint",
                                            3),
                        [(device_id, c.count, json.dumps(c.to_dict())) for c in checkpoints])

    def audit_entries(self, device_id: str, first: int, last: int) -> list[AuditEntry]:
        with self._tx() as cur:
            rows = self._run(cur, "SELECT entry FROM audit_entries WHERE device_id = ? AND seq "
                             "BETWEEN ? AND ? ORDER BY seq", (device_id, first, last)).fetchall()
        return [AuditEntry.from_dict(json.loads(r[0])) for r in rows]

    def audit_checkpoints(self, device_id: str, first: int, last: int) -> list[Checkpoint]:
        with self._tx() as cur:
            rows = self._run(cur, "SELECT checkpoint FROM audit_checkpoints WHERE device_id = ? "
                             "AND count BETWEEN ? AND ? ORDER BY count",
                             (device_id, first, last)).fetchall()
        return [Checkpoint.from_dict(json.loads(r[0])) for r in rows]

    def first_seq_about(self, device_id: str, subject: str) -> int | None:
        with self._tx() as cur:
            row = self._run(cur, "SELECT MIN(seq) FROM audit_entries WHERE device_id = ? AND "
                            "subject = ?", (device_id, subject)).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    # --- alerts, exports ---------------------------------------------------------------
    def add_alert(self, device_id: str, kind: str, subject: str, detail: str,
                  at_iso: str) -> None:
        with self._tx() as cur:
            self._run(cur, "INSERT INTO alerts (device_id, kind, subject, detail, at) "
                      "VALUES (?, ?, ?, ?, ?)", (device_id, kind, subject, detail[:300], at_iso))

    def alerts(self, device_id: str | None = None) -> list[dict[str, Any]]:
        text = "SELECT device_id, kind, subject, detail, at FROM alerts"
        params: tuple[Any, ...] = ()
        if device_id is not None:
            text, params = text + " WHERE device_id = ?", (device_id,)
        with self._tx() as cur:
            rows = self._run(cur, text + " ORDER BY at", params).fetchall()
        keys = ("device_id", "kind", "subject", "detail", "at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def add_export(self, at_iso: str, who: str, why: str, recording_ids: Sequence[str],
                   out: str) -> None:
        with self._tx() as cur:
            self._run(cur, "INSERT INTO exports (at, who, why, recording_ids, out) VALUES "
                      "(?, ?, ?, ?, ?)", (at_iso, who, why, json.dumps(list(recording_ids)), out))

    def exports(self) -> list[dict[str, Any]]:
        with self._tx() as cur:
            rows = self._run(cur, "SELECT at, who, why, recording_ids, out FROM exports "
                             "ORDER BY at").fetchall()
        return [{"at": r[0], "who": r[1], "why": r[2], "recording_ids": json.loads(r[3]),
                 "out": r[4]} for r in rows]

    # --- fleet -------------------------------------------------------------------------
    def put_statuses(self, rows: Sequence[StatusRow]) -> None:
        """Upsert the newest status per device (the caller applies the session rule)."""
        if not rows:
            return
        text = self._sql(
            "INSERT INTO fleet_status (device_id, session, state, since, received_at, status) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "session = excluded.session, state = excluded.state, since = excluded.since, "
            "received_at = excluded.received_at, status = excluded.status")
        with self._tx() as cur:
            cur.executemany(text, [(r.device_id, r.session, r.state, r.since, r.received_at,
                                    json.dumps(r.status)) for r in rows])

    def statuses(self) -> list[StatusRow]:
        with self._tx() as cur:
            rows = self._run(cur, "SELECT device_id, session, state, since, received_at, status "
                             "FROM fleet_status ORDER BY device_id").fetchall()
        return [StatusRow(r[0], int(r[1]), r[2], r[3], r[4], json.loads(r[5])) for r in rows]


class SqliteCatalogue(SqlCatalogue):
    """The embedded default: one file, WAL, every commit synced (synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._create_schema()
        except (OSError, sqlite3.Error) as exc:
            raise CatalogueError(f"{path}: cannot open the catalogue: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresCatalogue(SqlCatalogue):
    """Production: PostgreSQL through psycopg 3, shared by every ingest worker."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as exc:
            raise CatalogueError("a postgresql:// catalogue needs psycopg: pip install "
                                 "'edge-recorder[central]'") from exc
        self._errors = psycopg.Error
        try:
            self._conn = psycopg.connect(url, autocommit=False)
            self._create_schema()
        except psycopg.Error as exc:
            raise CatalogueError(f"{_redact(url)}: cannot open the catalogue: "
                                 f"{str(exc).strip().splitlines()[0]}") from exc

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            yield cur

    def put_statuses(self, rows: Sequence[StatusRow]) -> None:
        """Status is replaced by the next heartbeat: no need to wait for the WAL flush."""
        with self._lock:
            self._conn.execute("SET synchronous_commit = off")
            self._conn.commit()
            try:
                super().put_statuses(rows)
            finally:
                self._conn.execute("SET synchronous_commit = on")
                self._conn.commit()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_catalogue(url: str) -> SqliteCatalogue | PostgresCatalogue:
    """The catalogue named by ``url`` (``sqlite:///PATH``, a bare path, ``postgresql://``)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresCatalogue(url)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    return SqliteCatalogue(Path(path))


def _recording(row: Sequence[Any]) -> StoredRecording:
    return StoredRecording(row[0], row[1], row[2], int(row[3]), json.loads(row[4]), row[5],
                           row[6], row[7], row[8], row[9])


def _numbers(manifest: dict[str, Any]) -> list[str]:
    """Phone numbers in a manifest, for search (the device may add them; see CENTRAL.md)."""
    found = [manifest.get(k) for k in ("remote_number", "local_number", "number")]
    numbers = manifest.get("numbers")
    if isinstance(numbers, dict) and numbers.get("audit_numbers") == "clear":
        found += [numbers.get("caller"), numbers.get("dialed")]
    decision = manifest.get("decision")
    if isinstance(decision, dict):
        found.append(decision.get("number"))
    return [str(n) for n in found if n]


def _redact(url: str) -> str:
    """The URL without a password, for error messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
