"""Where the central store keeps bytes: staged uploads and stored objects.

    <root>/staging/<device_id>/<recording_id>/init.json     the verified init (atomic)
    <root>/staging/<device_id>/<recording_id>/<worker>.log  chunk records this worker took
    <root>/objects/<device_id>/<recording_id>.rec           the stored ciphertext
    <root>/objects/<device_id>/<recording_id>.manifest.json manifest + device signature

A chunk record is a 16-byte header (offset u64, length u32, CRC-32 u32, big-endian) and the
data, appended with one write; one fdatasync makes a run of chunks durable (group commit,
`append(sync=False)` then `commit()`), and only then are they held. Each worker
appends to its own log, so workers sharing one folder (a shared filesystem) never write
the same file; the ranges held are the union of every log's complete, CRC-valid records.

Per chunk nothing is read back that this worker already knows: its own records count once
their fdatasync returns, other workers' logs are read from where they were last read, and
the init is parsed again only when its file was replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.fsutil import atomic_write, fsync_dir, make_dirs
from sync import protocol as p

RECORD = struct.Struct(">QII")  # offset, length, CRC-32 (zlib.crc32, as the chunk header)
DIR_MODE, FILE_MODE = 0o700, 0o600
HASH_BLOCK_BYTES = 1024 * 1024
LOG_SUFFIX = ".log"


@dataclass
class _LogView:
    """What one log held when last read: its complete records up to ``pos``."""

    pos: int = 0
    ranges: list[p.Range] = field(default_factory=list)


LOG_LIST_S = 0.5  # how long a listing of a staging folder's logs is used
_FileId = tuple[int, int, int]  # st_ino, st_mtime_ns, st_size: a replaced file differs


class ObjectStore:
    """Files only; the catalogue decides what is stored."""

    def __init__(self, root: Path, worker_id: str) -> None:
        self.root = root
        self.worker_id = worker_id
        self._views: dict[Path, _LogView] = {}
        self._own: set[Path] = set()
        self._inits: dict[Path, tuple[_FileId, dict[str, Any]]] = {}
        # records written but not yet fdatasync'ed (group commit): (path, start, length, range)
        self._unsynced: list[tuple[Path, int, int, p.Range]] = []
        self._listings: dict[Path, tuple[float, list[Path]]] = {}  # folder: (when, logs)
        make_dirs(root / "staging", DIR_MODE)
        make_dirs(root / "objects", DIR_MODE)

    # --- staging -----------------------------------------------------------------------
    def staging(self, device: str, rid: str) -> Path:
        return self.root / "staging" / device / rid

    def load_init(self, device: str, rid: str) -> dict[str, Any] | None:
        """The staged init (treat as read-only); parsed again only when its file changed
        (``begin`` by any worker writes a new file)."""
        path = self.staging(device, rid) / "init.json"
        try:
            info = path.stat()
            file_id = (info.st_ino, info.st_mtime_ns, info.st_size)
            cached = self._inits.get(path)
            if cached is not None and cached[0] == file_id:
                return cached[1]
            raw: dict[str, Any] = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            self._inits.pop(path, None)
            return None
        self._inits[path] = (file_id, raw)
        return raw

    def begin(self, device: str, rid: str, init: dict[str, Any]) -> None:
        """A fresh staging folder for this init (any older attempt's logs removed)."""
        folder = self.staging(device, rid)
        self.discard(device, rid)
        make_dirs(folder, DIR_MODE)
        atomic_write(folder / "init.json", json.dumps(init).encode(), FILE_MODE)
        fsync_dir(folder.parent)

    def discard(self, device: str, rid: str) -> None:
        folder = self.staging(device, rid)
        for path in [k for k in self._views if k.parent == folder]:
            del self._views[path]
        self._own = {k for k in self._own if k.parent != folder}
        self._inits.pop(folder / "init.json", None)
        self._listings.pop(folder, None)
        shutil.rmtree(folder, ignore_errors=True)

    def append(self, device: str, rid: str, offset: int, data: bytes, *,
               sync: bool = True, crc32: int | None = None) -> None:
        """One record, durable when this returns (one fdatasync); with ``sync=False`` it
        is durable, and counted as held, only after the next :meth:`commit` (group
        commit: one fdatasync for every record written since)."""
        path = self.staging(device, rid) / f"{self.worker_id}{LOG_SUFFIX}"
        if path not in self._own:
            _cut_torn_tail(path)  # left by a crash of this worker: later records must count
            self._own.add(path)
        crc = zlib.crc32(data) if crc32 is None else crc32  # a chunk's CRC was just checked
        record = RECORD.pack(offset, len(data), crc) + data
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            written = os.write(fd, record)
            if written != len(record):
                os.ftruncate(fd, start)  # no torn record that would hide later ones
                raise OSError(f"{path}: short write ({written} of {len(record)} bytes)")
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if sync:
            self._count_own(path, start, len(record), (offset, offset + len(data)))
        else:
            self._unsynced.append((path, start, len(record), (offset, offset + len(data))))

    def commit(self) -> None:
        """Make the records written with ``sync=False`` durable, then count them held."""
        pending, self._unsynced = self._unsynced, []
        for path in dict.fromkeys(path for path, *_ in pending):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        for path, start, length, held in pending:
            self._count_own(path, start, length, held)

    def _count_own(self, path: Path, start: int, length: int, held: p.Range) -> None:
        """A record of ours, durable now: held without reading it back, if the view has
        read everything before it (else ``held`` reads on from the view's position)."""
        view = self._views.setdefault(path, _LogView())
        if view.pos == start:
            view.pos = start + length
            view.ranges = p.add_range(view.ranges, held)

    def held(self, device: str, rid: str, *, fresh: bool = False) -> list[p.Range]:
        """The ranges every worker's log holds (read incrementally); ``fresh`` lists the
        staging folder now instead of using a listing up to LOG_LIST_S old."""
        if fresh:
            self._listings.pop(self.staging(device, rid), None)
        ranges: list[p.Range] = []
        for path in self._logs(device, rid):
            view = self._views.setdefault(path, _LogView())
            if any(pending == path for pending, *_ in self._unsynced):
                ranges.extend(view.ranges)  # never read on into our own unsynced records
                continue
            for offset, data in _records(path, view.pos):
                view.ranges = p.add_range(view.ranges, (offset, offset + len(data)))
                view.pos += RECORD.size + len(data)
            ranges.extend(view.ranges)
        return p.merge_ranges(ranges)

    def _logs(self, device: str, rid: str) -> list[Path]:
        """The logs in the staging folder, listed at most every LOG_LIST_S (a listing per
        chunk cost more than the chunk's write). A log another worker started since is
        seen at the next listing: until then `have` claims less, never more."""
        folder = self.staging(device, rid)
        now = time.monotonic()
        listed = self._listings.get(folder)
        if listed is not None and now - listed[0] < LOG_LIST_S:
            own = folder / f"{self.worker_id}{LOG_SUFFIX}"
            return listed[1] if own in listed[1] or own not in self._own else sorted(
                {*listed[1], own})
        try:
            logs = sorted(folder.glob(f"*{LOG_SUFFIX}"))
        except FileNotFoundError:
            logs = []
        self._listings[folder] = (now, logs)
        return logs

    # --- objects -----------------------------------------------------------------------
    def object_path(self, device: str, rid: str) -> Path:
        return self.root / "objects" / device / f"{rid}.rec"

    def manifest_path(self, device: str, rid: str) -> Path:
        return self.root / "objects" / device / f"{rid}.manifest.json"

    def assemble(self, device: str, rid: str, size: int) -> tuple[Path, str]:
        """Write the staged records into a temporary file; fsynced; its sha256."""
        folder = self.root / "objects" / device
        make_dirs(folder, DIR_MODE)
        tmp = folder / f".{rid}.{self.worker_id}.part"
        digest, hashed = hashlib.sha256(), 0  # while the records come in file order
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.ftruncate(fd, size)
            for path in self._logs(device, rid):
                for offset, data in _records(path, 0):
                    os.pwrite(fd, data, offset)
                    if offset == hashed >= 0:
                        digest.update(data)
                        hashed += len(data)
                    else:
                        hashed = -1  # out of order or overlapping: hash the file instead
            os.fsync(fd)
        finally:
            os.close(fd)
        if hashed == size:
            return tmp, digest.hexdigest()
        return tmp, file_sha256(tmp)

    def publish(self, device: str, rid: str, tmp: Path, manifest: dict[str, Any]) -> Path:
        """Rename the assembled file into place with its manifest; both durable."""
        final = self.object_path(device, rid)
        os.replace(tmp, final)
        atomic_write(self.manifest_path(device, rid), json.dumps(manifest).encode(), FILE_MODE)
        fsync_dir(final.parent)
        return final

    def delete(self, device: str, rid: str) -> None:
        for path in (self.object_path(device, rid), self.manifest_path(device, rid)):
            path.unlink(missing_ok=True)
        self.discard(device, rid)
        folder = self.root / "objects" / device
        if folder.is_dir():
            fsync_dir(folder)


def _records(path: Path, start: int) -> Iterator[tuple[int, bytes]]:
    """Complete, CRC-valid records from ``start``; stops at a torn or damaged one."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        handle.seek(start)
        while len(header := handle.read(RECORD.size)) == RECORD.size:
            offset, length, crc = RECORD.unpack(header)
            data = handle.read(length)
            if len(data) != length or zlib.crc32(data) != crc:
                return
            yield offset, data


def _cut_torn_tail(path: Path) -> None:
    end = sum(RECORD.size + len(data) for _, data in _records(path, 0))
    try:
        if path.stat().st_size > end:
            os.truncate(path, end)
    except FileNotFoundError:
        pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
