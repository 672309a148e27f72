"""The catalogue: calls, recordings, the sync outbox and the audit trail in one SQLite file.

Every state change is written with its audit entry in ONE transaction
(:meth:`Catalogue.transaction` -> :class:`Txn`), so the trail and the rows cannot
disagree after a crash. One connection is shared by the line threads behind a lock;
it runs in WAL mode with ``synchronous=FULL`` so a commit survives a power cut.
Table and column names are a contract with the recorder, the CLI and the sync agent;
docs/FORMAT.md ("Audit trail and catalogue") describes them.

The schema is built and upgraded with sqlite-utils (:data:`MIGRATIONS`). sqlite-utils is
imported only when a migration has to run (a new or outdated database; see
:func:`needs_migration`): it would keep 3.5 MB of the daemon's 60 MB budget
(docs/DEPENDENCIES.md). Routine reads and writes use the same stdlib ``sqlite3``
connection directly, with column names checked against the table's columns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import logging
import re
import secrets
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.clock import Clock, SystemClock
from drivers.line import SAMPLE_RATE
from firmware.audit import (
    CHECKPOINT_KIND,
    GENESIS_HEAD,
    AuditEntry,
    AuditError,
    ChainHead,
    Checkpoint,
    make_entry,
    read_checkpoints,
    read_entries,
    sign_checkpoint,
)
from firmware.fsutil import make_dirs
from firmware.ids import Uuid7Factory

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for the sync agent's transaction
DATA_DIR_MODE = 0o700
# Same rule as firmware.config.DeviceId: it is a line of the checkpoint body.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
OUTBOX_KINDS = frozenset({"recording", "audit", "erasure"})
OUTBOX_STATES = frozenset({"pending", "sent", "stored"})
RECORDING_STATES = frozenset({"recording", "complete", "interrupted"})


class CatalogueError(Exception):
    """Base of catalogue errors; the message names the database and the row or key."""


class SchemaError(CatalogueError):
    """The database schema is newer than this firmware, or a migration failed."""


class NotFound(CatalogueError):
    """No row has the given id."""


class ReadOnlyError(CatalogueError):
    """A write was attempted on a catalogue opened read-only, or after close()."""


def iso_utc_ms(wall_s: float) -> str:
    """Unix seconds -> ISO 8601 UTC with milliseconds and 'Z' (``2026-09-21T12:00:00.000Z``)."""
    return datetime.fromtimestamp(wall_s, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# --- schema -------------------------------------------------------------------------

_APPEND_ONLY = "BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"

SCHEMA_V1: tuple[str, ...] = (
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        line_id TEXT NOT NULL,
        direction TEXT NOT NULL DEFAULT 'unknown'
            CHECK (direction IN ('inbound', 'outbound', 'unknown')),
        state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'ended')),
        started_at TEXT NOT NULL,
        started_wall REAL NOT NULL,
        wall_synced INTEGER NOT NULL CHECK (wall_synced IN (0, 1)),
        answered_offset_s REAL,
        ended_offset_s REAL,
        caller_number TEXT,
        caller_name TEXT,
        caller_id_standard TEXT,
        dialed_number TEXT,
        end_reason TEXT,
        decision TEXT,
        policy_hash TEXT,
        salt TEXT)""",
    "CREATE INDEX calls_started_at ON calls (started_at)",
    "CREATE INDEX calls_state ON calls (state)",
    """CREATE TABLE recordings (
        id TEXT PRIMARY KEY,
        call_id TEXT NOT NULL REFERENCES calls (id),
        segment INTEGER NOT NULL DEFAULT 0,
        line_id TEXT NOT NULL,
        path TEXT NOT NULL,
        codec TEXT NOT NULL,
        sample_rate INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'recording'
            CHECK (state IN ('recording', 'complete', 'interrupted')),
        started_offset_s REAL NOT NULL DEFAULT 0,
        ended_offset_s REAL,
        audio_s REAL,
        size INTEGER,
        sha256 TEXT,
        retention_until TEXT,
        synced_at TEXT,
        deleted_at TEXT,
        created_at TEXT NOT NULL,
        UNIQUE (call_id, segment))""",
    "CREATE INDEX recordings_state ON recordings (state)",
    "CREATE INDEX recordings_created_at ON recordings (created_at)",
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('recording', 'audit')),
        ref TEXT NOT NULL,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'stored')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        UNIQUE (kind, ref))""",
    "CREATE INDEX outbox_state ON outbox (state, id)",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        wall REAL NOT NULL,
        wall_synced INTEGER NOT NULL CHECK (wall_synced IN (0, 1)),
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL CHECK (length(prev_hash) = 64),
        hash TEXT NOT NULL CHECK (length(hash) = 64))""",
    "CREATE INDEX audit_subject ON audit (subject)",
    """CREATE TRIGGER audit_extends_head BEFORE INSERT ON audit
        WHEN NEW.seq != (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit)
          OR NEW.prev_hash != COALESCE((SELECT hash FROM audit WHERE seq = NEW.seq - 1),
                                       printf('%064d', 0))
        BEGIN SELECT RAISE(ABORT, 'audit entries must extend the chain head'); END""",
    f"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit {_APPEND_ONLY.format(table='audit')}",
    f"CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit {_APPEND_ONLY.format(table='audit')}",
    """CREATE TABLE checkpoints (
        count INTEGER PRIMARY KEY CHECK (count >= 1),
        head_hash TEXT NOT NULL,
        wall INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        body TEXT NOT NULL)""",
    "CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints "
    + _APPEND_ONLY.format(table="checkpoints"),
    "CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints "
    + _APPEND_ONLY.format(table="checkpoints"),
    """CREATE TABLE audit_receipts (
        count INTEGER PRIMARY KEY,
        head_hash TEXT NOT NULL,
        central_key_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        received_at TEXT NOT NULL)""",
    "CREATE TRIGGER audit_receipts_no_update BEFORE UPDATE ON audit_receipts "
    + _APPEND_ONLY.format(table="audit_receipts"),
    "CREATE TRIGGER audit_receipts_no_delete BEFORE DELETE ON audit_receipts "
    + _APPEND_ONLY.format(table="audit_receipts"),
)


def _migrate_v1(db: sqlite_utils.Database) -> None:
    for statement in SCHEMA_V1:
        db.execute(statement)


Migration: TypeAlias = "tuple[int, Callable[[sqlite_utils.Database], None]]"
# Append only: (version, function), versions 1..n. Each runs in its own transaction.
def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Erasure: recordings say why they were erased; the outbox carries erasure requests
    to the central store (a customer's objection). SQLite cannot alter a CHECK constraint,
    so the outbox table is rebuilt (sqlite.org/lang_altertable.html, "other changes")."""
    db.execute("ALTER TABLE recordings ADD COLUMN erase_reason TEXT")
    db.execute("""CREATE TABLE outbox_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('recording', 'audit', 'erasure')),
        ref TEXT NOT NULL,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'stored')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        UNIQUE (kind, ref))""")
    db.execute("INSERT INTO outbox_v2 SELECT * FROM outbox")
    db.execute("DROP TABLE outbox")
    db.execute("ALTER TABLE outbox_v2 RENAME TO outbox")
    db.execute("CREATE INDEX outbox_state ON outbox (state, id)")


MIGRATIONS: tuple[Migration, ...] = ((1, _migrate_v1), (2, _migrate_v2))

_RECORDING_LIST_SQL = """
SELECT r.*, c.direction, c.caller_number, c.caller_name, c.caller_id_standard,
       c.dialed_number, c.started_at, c.started_wall, c.answered_offset_s, c.end_reason,
       c.state AS call_state
FROM recordings r JOIN calls c ON c.id = r.call_id
"""


# --- plain sqlite3 helpers (the routine path, without sqlite-utils) -------------------

def outbox_bell_path(db_path: Path) -> Path:
    """The Unix datagram socket the outbox's reader (the sync agent) listens on."""
    return db_path.with_name(db_path.name + ".outbox-bell")


def ring_outbox_bell(db_path: Path) -> None:
    """Tell the outbox's reader, if it is listening, that new items were committed, so it
    need not wait for its next poll. Nobody listening (or a full queue) is fine: the
    reader polls anyway."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bell, contextlib.suppress(OSError):
        bell.setblocking(False)
        bell.sendto(b"outbox", str(outbox_bell_path(db_path)))


def _quote(name: str) -> str:
    """An SQL identifier in double quotes (sqlite.org/lang_keywords.html)."""
    return '"' + name.replace('"', '""') + '"'


def _sql_value(value: Any) -> Any:
    """A Python value as stored by sqlite-utils' inserts and updates, so rows do not
    depend on which path wrote them: containers as JSON text, dates and times in ISO
    8601, UUIDs and durations as text, decimals as floats; the rest as sqlite3 binds it."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=repr, ensure_ascii=False)
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (dt.timedelta, uuid.UUID)):
        return str(value)
    return value


def _dict_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


# --- connections --------------------------------------------------------------------

def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    make_dirs(path.parent, DATA_DIR_MODE)
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # Per connection (sqlite.org/pragma.html#pragma_synchronous): FULL syncs every
        # commit; WAL with NORMAL may lose the last commits on power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        raise CatalogueError(f"catalogue {path}: cannot open ({exc})") from exc
    if mode.lower() != "wal":
        conn.close()
        raise CatalogueError(f"catalogue {path}: journal_mode is {mode!r}, WAL is required")
    return conn


def _connect_read_only(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    if not path.is_file():
        raise CatalogueError(f"catalogue {path}: no such database")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000,
                               isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except sqlite3.Error as exc:
        raise CatalogueError(f"catalogue {path}: cannot open read-only ({exc})") from exc
    return conn


def _check_migrations(migrations: Sequence[Migration]) -> int:
    versions = [version for version, _ in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"migrations must be numbered 1..n in order, got {versions}")
    return len(versions)


def needs_migration(path: Path, migrations: Sequence[Migration] = MIGRATIONS,
                    busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> bool:
    """Whether opening ``path`` as a :class:`Catalogue` would run a migration (a missing
    database counts). Uses its own short-lived connection and imports no sqlite-utils."""
    latest = _check_migrations(migrations)
    if not path.exists():
        return True
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000)
        try:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CatalogueError(f"catalogue {path}: cannot read ({exc})") from exc
    return version < latest


# --- the catalogue ------------------------------------------------------------------

class Catalogue:
    """The device's catalogue database; thread-safe, one connection, one lock."""

    def __init__(self, path: Path, *, clock: Clock, device_id: str,
                 migrations: Sequence[Migration] = MIGRATIONS,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        if not DEVICE_ID_PATTERN.fullmatch(device_id):
            raise CatalogueError(f"catalogue {path}: invalid device id {device_id!r}")
        self._setup(path, _connect(path, busy_timeout_ms), clock, read_only=False)
        self.device_id = device_id
        try:
            self._migrate(migrations)
            self._load_columns()
            self._claim_device(device_id)
        except BaseException:
            self.close()
            raise

    @classmethod
    def read_only(cls, path: Path, *, migrations: Sequence[Migration] = MIGRATIONS,
                  busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Catalogue:
        """Open for reading only (CLI listings); the schema must be current."""
        cat = cls.__new__(cls)
        cat._setup(path, _connect_read_only(path, busy_timeout_ms), SystemClock(),
                   read_only=True)
        try:
            cat._check_current(migrations)
            cat.device_id = cat._meta("device_id") or ""
            cat._load_columns()
        except sqlite3.Error as exc:
            cat.close()
            raise CatalogueError(f"catalogue {path}: cannot read ({exc})") from exc
        except BaseException:
            cat.close()
            raise
        return cat

    def _setup(self, path: Path, conn: sqlite3.Connection, clock: Clock, *,
               read_only: bool) -> None:
        self.path = path
        self.clock = clock
        self.read_only_mode = read_only
        self._conn = conn
        self._lock = threading.RLock()
        self._ids = Uuid7Factory(clock)
        self._closed = False
        self._columns: dict[str, frozenset[str]] = {}
        self._ring_after_commit = False  # an outbox item was added in this transaction

    # --- life cycle ----------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
        log.debug("catalogue %s: closed", self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def new_id(self) -> str:
        """A fresh UUIDv7 string (RFC 9562 section 5.7) from the catalogue's clock."""
        return self._ids.new()

    def settings(self) -> dict[str, Any]:
        """The connection's effective PRAGMAs and schema version (self-test, status)."""
        names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "user_version")
        with self._reading():
            return {name: self._conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

    # --- migrations ----------------------------------------------------------------
    def _migrate(self, migrations: Sequence[Migration]) -> None:
        latest = _check_migrations(migrations)
        current = self._user_version()
        if current > latest:
            raise SchemaError(f"catalogue {self.path}: schema version {current} is newer than "
                              f"this firmware's {latest}; refusing to open it")
        if current == latest:
            return
        import sqlite_utils  # only here: see the module docstring

        db = sqlite_utils.Database(self._conn, execute_plugins=False)
        for version, apply in migrations[current:]:
            self._apply_migration(version, apply, db)

    def _apply_migration(self, version: int, apply: Callable[[sqlite_utils.Database], None],
                         db: sqlite_utils.Database) -> None:
        try:
            with self._write():
                if self._user_version() >= version:  # another process got there first
                    return
                apply(db)
                self._conn.execute(f"PRAGMA user_version={int(version)}")
        except (sqlite3.Error, CatalogueError) as exc:
            raise SchemaError(f"catalogue {self.path}: migration to schema version {version} "
                              f"failed: {exc}") from exc
        log.info("catalogue %s: migrated to schema version %d", self.path, version)

    def _check_current(self, migrations: Sequence[Migration]) -> None:
        latest = _check_migrations(migrations)
        current = self._user_version()
        if current != latest:
            raise SchemaError(f"catalogue {self.path}: schema version {current}, this "
                              f"firmware reads version {latest}")

    def _user_version(self) -> int:
        version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _claim_device(self, device_id: str) -> None:
        with self._write():
            owner = self._meta("device_id")
            if owner is None:
                self._insert_row("meta", {"key": "device_id", "value": device_id}, "device_id")
                self._insert_row("meta", {"key": "created_at",
                                          "value": iso_utc_ms(self.clock.wall())}, "created_at")
            elif owner != device_id:
                raise CatalogueError(f"catalogue {self.path}: belongs to device {owner!r}, "
                                     f"not {device_id!r}")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _load_columns(self) -> None:
        """Column names of every table: inserts and updates name only these."""
        with self._reading():
            tables = [row[0] for row in self._conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite%'")]
            self._columns = {table: frozenset(
                row[1] for row in self._conn.execute(f"PRAGMA table_info({_quote(table)})"))
                for table in tables}

    # --- transactions --------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One atomic unit: state changes and their audit entries commit together.

        BEGIN IMMEDIATE .. COMMIT; any exception rolls everything back. Nested use in
        the same thread becomes a savepoint of the outer transaction.
        """
        with self._write():
            txn = Txn(self)
            try:
                yield txn
            finally:
                txn._active = False

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self._lock:
            self._check_writable()
            if self._conn.in_transaction:
                with self._savepoint():
                    yield
                return
            self._execute_control("BEGIN IMMEDIATE")
            self._ring_after_commit = False
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            try:
                self._execute_control("COMMIT")
            except CatalogueError:
                self._rollback()
                raise
            if self._ring_after_commit:
                ring_outbox_bell(self.path)

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        """A nested unit inside the outer transaction (sqlite.org/lang_savepoint.html)."""
        name = _quote(f"nested_{secrets.token_hex(8)}")
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            # A RAISE(ROLLBACK) can end the whole transaction, savepoint included.
            if self._conn.in_transaction:
                self._conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self._conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        self._conn.execute(f"RELEASE SAVEPOINT {name}")

    def _execute_control(self, statement: str) -> None:
        try:
            self._conn.execute(statement)
        except sqlite3.Error as exc:
            raise CatalogueError(f"catalogue {self.path}: {statement} failed ({exc})") from exc

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise ReadOnlyError(f"catalogue {self.path}: closed")
            try:
                yield
            except sqlite3.Error as exc:
                raise CatalogueError(f"catalogue {self.path}: read failed ({exc})") from exc

    def _check_writable(self) -> None:
        if self._closed:
            raise ReadOnlyError(f"catalogue {self.path}: closed")
        if self.read_only_mode:
            raise ReadOnlyError(f"catalogue {self.path}: opened read-only")

    # --- audit chain (inside a write transaction) ----------------------------------
    def _append_audit(self, kind: str, subject: str, data: Mapping[str, Any]) -> AuditEntry:
        try:
            entry = make_entry(self._head(), self.clock.wall(), self.clock.wall_synced(),
                               kind, subject, data)
        except AuditError as exc:
            raise CatalogueError(f"catalogue {self.path}: {exc}") from exc
        row = {"seq": entry.seq, "wall": entry.wall, "wall_synced": int(entry.synced),
               "kind": kind, "subject": subject, "data": entry.data_json,
               "prev_hash": entry.prev_hash, "hash": entry.hash}
        self._insert_row("audit", row, f"entry {entry.seq}")
        return entry

    def _head(self) -> ChainHead:
        row = self._conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        last = row.fetchone()
        return GENESIS_HEAD if last is None else ChainHead(int(last[0]), str(last[1]))

    def _check_columns(self, table: str, names: Iterable[str]) -> None:
        known = self._columns.get(table)
        if known is None:
            raise CatalogueError(f"catalogue {self.path}: no table {table!r}")
        unknown = sorted(set(names) - known)
        if unknown:
            raise CatalogueError(f"catalogue {self.path}: {table} has no column(s) "
                                 f"{', '.join(unknown)}")

    def _insert_row(self, table: str, row: Mapping[str, Any], what: str) -> None:
        self._check_columns(table, row)
        columns = ", ".join(_quote(name) for name in row)
        marks = ", ".join("?" for _ in row)
        # Names were checked against the schema just above; values are bound.
        sql = f"INSERT INTO {_quote(table)} ({columns}) VALUES ({marks})"  # noqa: S608
        try:
            self._conn.execute(sql, [_sql_value(value) for value in row.values()])
        except sqlite3.Error as exc:
            raise CatalogueError(f"catalogue {self.path}: {table} {what}: {exc}") from exc

    def _update_row(self, table: str, row_id: str, fields: Mapping[str, Any]) -> None:
        """UPDATE one row by ``id``; :class:`NotFound` if there is none."""
        self._check_columns(table, fields)  # the names below are the schema's own
        name = _quote(table)
        try:
            if self._conn.execute(f"SELECT 1 FROM {name} WHERE id = ?",  # noqa: S608
                                  (row_id,)).fetchone() is None:
                raise NotFound(f"catalogue {self.path}: {table} has no row {row_id}")
            if not fields:
                return
            sets = ", ".join(f"{_quote(column)} = ?" for column in fields)
            self._conn.execute(f"UPDATE {name} SET {sets} WHERE id = ?",  # noqa: S608
                               [*(_sql_value(value) for value in fields.values()), row_id])
        except sqlite3.Error as exc:
            raise CatalogueError(f"catalogue {self.path}: {table} {row_id}: {exc}") from exc

    def checkpoint(self, key: Ed25519PrivateKey) -> Checkpoint | None:
        """Sign the chain head; None (nothing written) if nothing happened since the last.

        Also appends a ``checkpoint`` entry recording it, in the same transaction.
        """
        with self._write():
            head = self._head()
            last_kind = self._conn.execute(
                "SELECT kind FROM audit WHERE seq = ?", (head.count,)).fetchone()
            if last_kind is None or last_kind[0] == CHECKPOINT_KIND:
                return None
            cp = sign_checkpoint(key, self.device_id, head, int(self.clock.wall()))
            self._insert_row("checkpoints", {
                "count": cp.count, "head_hash": cp.head_hash, "wall": cp.time,
                "key_id": cp.key_id, "signature": cp.signature, "body": cp.body},
                f"checkpoint {cp.count}")
            self._append_audit(CHECKPOINT_KIND, self.device_id, {
                "count": cp.count, "head": cp.head_hash, "key_id": cp.key_id})
        log.info("catalogue %s: checkpoint %d signed by key %s", self.path, cp.count, cp.key_id)
        return cp

    # --- reads ---------------------------------------------------------------------
    def get_call(self, call_id: str) -> dict[str, Any] | None:
        return self._get("calls", call_id)

    def get_recording(self, recording_id: str) -> dict[str, Any] | None:
        return self._get("recordings", recording_id)

    def _get(self, table: str, row_id: str) -> dict[str, Any] | None:
        sql = f"SELECT * FROM {_quote(table)} WHERE id = ?"  # noqa: S608 (calls or recordings)
        with self._reading():
            rows = _dict_rows(self._conn.execute(sql, (row_id,)))
            return rows[0] if rows else None

    def recordings(self, state: str | None = None,
                   limit: int | None = None) -> list[dict[str, Any]]:
        """Recordings newest first, with their call's direction, numbers and times.

        The call's own state is returned as ``call_state``.
        """
        where, params = ("WHERE r.state = ?", [state]) if state is not None else ("", [])
        sql = (f"{_RECORDING_LIST_SQL} {where} ORDER BY r.created_at DESC, r.id DESC "
               "LIMIT ?")
        with self._reading():
            return _dict_rows(self._conn.execute(
                sql, [*params, -1 if limit is None else limit]))

    def calls(self) -> list[dict[str, Any]]:
        """Every call, oldest first."""
        with self._reading():
            return _dict_rows(self._conn.execute(
                "SELECT * FROM calls ORDER BY started_at, id"))

    def recordings_of_call(self, call_id: str) -> list[dict[str, Any]]:
        """Every recording (segment) of one call, in segment order."""
        with self._reading():
            return _dict_rows(self._conn.execute(
                "SELECT * FROM recordings WHERE call_id = ? ORDER BY segment", (call_id,)))

    def expired_recordings(self, now_iso: str) -> list[dict[str, Any]]:
        """Recordings past their retention date, not yet deleted (synced or not)."""
        with self._reading():
            return _dict_rows(self._conn.execute(
                "SELECT * FROM recordings WHERE retention_until IS NOT NULL "
                "AND retention_until < ? AND deleted_at IS NULL ORDER BY retention_until",
                (now_iso,)))

    def open_recordings(self) -> list[dict[str, Any]]:
        """Recordings still in state 'recording' (left open by a crash, at start-up)."""
        return self.recordings(state="recording")

    def active_calls(self) -> list[dict[str, Any]]:
        with self._reading():
            return _dict_rows(self._conn.execute(
                "SELECT * FROM calls WHERE state = 'active' ORDER BY started_at, id"))

    def outbox_pending(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Outbox items still to send, oldest first."""
        with self._reading():
            return _dict_rows(self._conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' ORDER BY id LIMIT ?",
                [-1 if limit is None else limit]))

    def outbox_item(self, kind: str, ref: str) -> dict[str, Any] | None:
        """The outbox item of ``(kind, ref)`` in any state, None if none was queued."""
        with self._reading():
            rows = _dict_rows(self._conn.execute(
                "SELECT * FROM outbox WHERE kind = ? AND ref = ?", (kind, ref)))
            return rows[0] if rows else None

    def receipt_count(self) -> int:
        """Entries the central store has countersigned: the highest receipt's count, 0
        without any."""
        with self._reading():
            row = self._conn.execute("SELECT MAX(count) FROM audit_receipts").fetchone()
            return int(row[0] or 0)

    def latest_receipt(self) -> dict[str, Any] | None:
        """The receipt with the highest count (count, head_hash, central_key_id,
        signature, received_at), None without any."""
        with self._reading():
            rows = _dict_rows(self._conn.execute(
                "SELECT * FROM audit_receipts ORDER BY count DESC LIMIT 1"))
            return rows[0] if rows else None

    def audit_entries(self, after_seq: int = 0, limit: int | None = None) -> list[AuditEntry]:
        """Entries with seq > ``after_seq`` in order (an upload batch)."""
        with self._reading():
            return list(read_entries(self._conn, after_seq, limit))

    def checkpoints(self, after_count: int = 0) -> list[Checkpoint]:
        with self._reading():
            return read_checkpoints(self._conn, after_count)

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._reading():
            row = self._conn.execute("SELECT MAX(count) FROM checkpoints").fetchone()
            if row[0] is None:
                return None
            return read_checkpoints(self._conn, int(row[0]) - 1)[0]

    def head(self) -> ChainHead:
        """(entry count, head hash hex); (0, 64 zeros) for an empty trail."""
        with self._reading():
            return self._head()


# --- the transaction handle ---------------------------------------------------------

class Txn:
    """Writes inside one :meth:`Catalogue.transaction`; unusable once the block ends."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._cat = catalogue
        self._active = True

    def insert_call(self, **fields: Any) -> str:
        """Insert a call; ``id``, ``started_wall``/``started_at`` and ``wall_synced``
        default to a new UUIDv7 and the clock. Returns the id."""
        clock = self._cat.clock
        row = {"id": self._cat.new_id(), "direction": "unknown", "state": "active",
               "wall_synced": int(clock.wall_synced()), **fields}
        row.setdefault("started_wall", clock.wall())
        row.setdefault("started_at", iso_utc_ms(row["started_wall"]))
        self._insert("calls", row)
        return str(row["id"])

    def update_call(self, call_id: str, **fields: Any) -> None:
        self._update("calls", call_id, fields)

    def insert_recording(self, **fields: Any) -> str:
        """Insert a recording; ``line_id`` defaults to its call's. Returns the id."""
        row = {"id": self._cat.new_id(), "segment": 0, "state": "recording",
               "sample_rate": SAMPLE_RATE, "started_offset_s": 0.0,
               "created_at": iso_utc_ms(self._cat.clock.wall()), **fields}
        if "line_id" not in row and "call_id" in row:
            call = self._cat._conn.execute("SELECT line_id FROM calls WHERE id = ?",
                                           (row["call_id"],)).fetchone()
            row["line_id"] = None if call is None else call[0]
        self._insert("recordings", row)
        return str(row["id"])

    def update_recording(self, recording_id: str, **fields: Any) -> None:
        self._update("recordings", recording_id, fields)

    def enqueue(self, kind: str, ref: str) -> int | None:
        """Queue an item for the sync agent; None if (kind, ref) is already queued."""
        self._check_active()
        if kind not in OUTBOX_KINDS:
            raise CatalogueError(f"catalogue {self._cat.path}: outbox kind {kind!r} not one "
                                 f"of {sorted(OUTBOX_KINDS)}")
        cursor = self._execute(
            "INSERT OR IGNORE INTO outbox (kind, ref, created_at, state, attempts) "
            "VALUES (?, ?, ?, 'pending', 0)",
            (kind, ref, iso_utc_ms(self._cat.clock.wall())), f"outbox {kind} {ref}")
        if cursor.rowcount == 1:
            self._cat._ring_after_commit = True
        return cursor.lastrowid if cursor.rowcount == 1 else None

    def update_outbox(self, outbox_id: int, *, state: str, error: str | None = None) -> None:
        """Record one delivery attempt of an outbox item (the sync agent)."""
        self._check_active()
        if state not in OUTBOX_STATES:
            raise CatalogueError(f"catalogue {self._cat.path}: outbox state {state!r} not one "
                                 f"of {sorted(OUTBOX_STATES)}")
        cursor = self._execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
            (state, error, outbox_id), f"outbox {outbox_id}")
        if cursor.rowcount != 1:
            raise NotFound(f"catalogue {self._cat.path}: outbox has no item {outbox_id}")

    def requeue_sent(self) -> int:
        """Every item sent but not confirmed stored goes back to pending, so the sync
        agent sends it again (the ``resync`` command). Returns how many."""
        self._check_active()
        cursor = self._execute(
            "UPDATE outbox SET state = 'pending', last_error = 'resync requested' "
            "WHERE state = 'sent'", (), "outbox requeue")
        return cursor.rowcount

    def insert_audit_receipt(self, count: int, head_hash: str, central_key_id: str,
                             signature: str, received_at: str) -> None:
        """Store the central store's countersignature of the chain head ``count``.

        A receipt is evidence in itself and gets no audit entry (that entry would need a
        receipt of its own). The table is append-only and keyed by count: a second
        receipt for the same count is a :class:`CatalogueError`."""
        self._check_active()
        self._cat._insert_row("audit_receipts", {
            "count": count, "head_hash": head_hash, "central_key_id": central_key_id,
            "signature": signature, "received_at": received_at}, f"receipt {count}")

    def audit(self, kind: str, subject: str, **data: Any) -> AuditEntry:
        """Append an audit entry in this transaction (``checkpoint`` is reserved)."""
        self._check_active()
        if kind == CHECKPOINT_KIND:
            raise CatalogueError(f"catalogue {self._cat.path}: audit kind {kind!r} is written "
                                 f"only by Catalogue.checkpoint()")
        return self._cat._append_audit(kind, subject, data)

    # --- helpers -------------------------------------------------------------------
    def _check_active(self) -> None:
        if not self._active:
            raise CatalogueError(f"catalogue {self._cat.path}: transaction already ended")

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        self._check_active()
        self._cat._insert_row(table, row, str(row["id"]))

    def _update(self, table: str, row_id: str, fields: dict[str, Any]) -> None:
        self._check_active()
        self._cat._check_columns(table, fields)
        if "id" in fields:
            raise CatalogueError(f"catalogue {self._cat.path}: {table} {row_id}: id is fixed")
        self._cat._update_row(table, row_id, fields)

    def _execute(self, sql: str, params: Sequence[Any], what: str) -> sqlite3.Cursor:
        try:
            return self._cat._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise CatalogueError(f"catalogue {self._cat.path}: {what}: {exc}") from exc
