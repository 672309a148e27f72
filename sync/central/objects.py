"""Where the central store keeps bytes: staged uploads and stored objects.

    <root>/staging/<device_id>/<recording_id>/init.json     the verified init (atomic)
    <root>/staging/<device_id>/<recording_id>/<worker>.part the chunks this worker took
    <root>/objects/<device_id>/<recording_id>.rec           the stored ciphertext
    <root>/objects/<device_id>/<recording_id>.manifest.json manifest + device signature

A part file is the recording's ciphertext in place (``size`` bytes from the init, chunks
written at their offsets, holes where none arrived) followed by one 16-byte record per chunk
(offset u64, length u32, CRC-32 of the chunk's bytes u32, big-endian). A chunk is its data
written at its offset, then its record after the last one; one fdatasync makes a run of
chunks durable (group commit, `append(sync=False)` then `commit()`), and only then are they
held. Each worker writes its own part, so workers sharing one folder (a shared filesystem)
never write the same file; the ranges held are the union of every part's records whose
bytes match their CRC (a record whose bytes did not survive a crash is skipped).

When the last byte is held, the finishing worker copies into its own part whatever only
other workers hold, cuts the records off (the file is now exactly the ciphertext), fsyncs
it and renames it into objects/: the bytes are written once. Its sha256 is computed while
the chunks arrive in order, so an upload sent in order is never read back.

Per chunk nothing is read back that this worker already knows: its own records count once
their fdatasync returns, other workers' parts are read from where they were last read, and
the init is parsed again only when its file was replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import threading
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
PART_SUFFIX = ".part"


@dataclass
class _PartView:
    """What one part held when last read: records up to file position ``pos``."""

    pos: int
    ino: int = -1  # the file read (a part replaced by a new upload starts again)
    ranges: list[p.Range] = field(default_factory=list)


@dataclass
class _Own:
    """This worker's part of one upload: where its next record goes, and the sha256 of
    the bytes written from offset 0 in order (``hashed`` = -1: not usable)."""

    size: int
    end: int
    digest: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0


LOG_LIST_S = 0.5  # how long a listing of a staging folder's parts is used
PATH_CACHE = 4096  # uploads whose staging paths are kept built
_FileId = tuple[int, int, int]  # st_ino, st_mtime_ns, st_size: a replaced file differs


class ObjectStore:
    """Files only; the catalogue decides what is stored.

    Thread-safe for one writer and one committer: a worker's handler thread appends while
    its commit thread runs the fdatasync of the chunks written before (docs/CENTRAL.md).
    """

    def __init__(self, root: Path, worker_id: str) -> None:
        self.root = root
        self.worker_id = worker_id
        self._views: dict[Path, _PartView] = {}
        self._own: dict[Path, _Own] = {}
        self._inits: dict[Path, tuple[_FileId, dict[str, Any]]] = {}
        # chunks written but not yet fdatasync'ed (group commit): (part, record position,
        # range)
        self._unsynced: list[tuple[Path, int, p.Range]] = []
        self._listings: dict[Path, tuple[float, list[Path]]] = {}  # folder: (when, parts)
        self._paths: dict[tuple[str, str], tuple[Path, Path, Path]] = {}
        self._lock = threading.RLock()  # the state above; never held across an fdatasync
        self._commit_lock = threading.Lock()  # one commit at a time: counted in order
        make_dirs(root / "staging", DIR_MODE)
        make_dirs(root / "objects", DIR_MODE)

    # --- staging -----------------------------------------------------------------------
    def _upload_paths(self, device: str, rid: str) -> tuple[Path, Path, Path]:
        """(staging folder, its init.json, this worker's part) of an upload: built once
        (three Path joins per chunk, several times each, showed in the profile)."""
        paths = self._paths.get((device, rid))
        if paths is None:
            if len(self._paths) >= PATH_CACHE:
                self._paths.clear()
            folder = self.root / "staging" / device / rid
            paths = folder, folder / "init.json", folder / f"{self.worker_id}{PART_SUFFIX}"
            self._paths[device, rid] = paths
        return paths

    def staging(self, device: str, rid: str) -> Path:
        return self._upload_paths(device, rid)[0]

    def own_part(self, device: str, rid: str) -> Path:
        return self._upload_paths(device, rid)[2]

    def load_init(self, device: str, rid: str) -> dict[str, Any] | None:
        """The staged init (treat as read-only); parsed again only when its file changed
        (``begin`` by any worker writes a new file)."""
        path = self._upload_paths(device, rid)[1]
        with self._lock:
            return self._load_init(path)

    def _load_init(self, path: Path) -> dict[str, Any] | None:
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
        """A fresh staging folder for this init (any older attempt's parts removed)."""
        folder = self.staging(device, rid)
        self.discard(device, rid)
        make_dirs(folder, DIR_MODE)
        atomic_write(folder / "init.json", json.dumps(init).encode(), FILE_MODE)
        fsync_dir(folder.parent)

    def discard(self, device: str, rid: str) -> None:
        folder = self.staging(device, rid)
        with self._lock:
            self._forget(folder)
        shutil.rmtree(folder, ignore_errors=True)

    def _forget(self, folder: Path) -> None:
        for path in [k for k in self._views if k.parent == folder]:
            del self._views[path]
        for path in [k for k in self._own if k.parent == folder]:
            del self._own[path]
        self._unsynced = [entry for entry in self._unsynced if entry[0].parent != folder]
        self._inits.pop(folder / "init.json", None)
        self._listings.pop(folder, None)

    def _size(self, device: str, rid: str) -> int:
        init = self._load_init(self._upload_paths(device, rid)[1])
        if init is None:
            raise FileNotFoundError(f"{self.staging(device, rid)}: no staged init")
        return int(init["size"])

    def append(self, device: str, rid: str, offset: int, data: bytes, *,
               sync: bool = True, crc32: int | None = None) -> None:
        """One chunk, durable when this returns (one fdatasync); with ``sync=False`` it
        is durable, and counted as held, only after the next :meth:`commit` (group
        commit: one fdatasync for every chunk written since)."""
        path = self.own_part(device, rid)
        crc = zlib.crc32(data) if crc32 is None else crc32  # a chunk's CRC was just checked
        with self._lock:  # written and listed as unsynced at once: never read on into
            own = self._own.get(path)  # by `held` on the commit thread before its sync
            if own is not None:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # another worker began the upload again
                    self._forget(path.parent)
                    own = None
            if own is None:
                own, self._views[path] = _open_part(path, self._size(device, rid))
                self._own[path] = own
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if offset + len(data) > own.size:
                    raise ValueError(f"{path}: chunk at {offset} ends after {own.size}")
                _pwrite_all(fd, data, offset)
                _pwrite_all(fd, RECORD.pack(offset, len(data), crc), own.end)
            except OSError:
                os.ftruncate(fd, own.end)  # no torn record that would end the others
                raise
            finally:
                os.close(fd)
            if own.hashed == offset:
                own.digest.update(data)
                own.hashed += len(data)
            elif offset < own.hashed:
                own.hashed = -1  # bytes already hashed written again: hash the file
            self._unsynced.append((path, own.end, (offset, offset + len(data))))
            own.end += RECORD.size
        if sync:
            self.commit()

    def commit(self) -> None:
        """Make the chunks written so far durable, then count them held. May run on
        another thread than :meth:`append` (one commit at a time); chunks appended
        meanwhile wait for the next commit. A part that is gone (another worker stored the
        recording or began it again) loses its unsynced records and nothing else; a failed
        fdatasync drops every unsynced record of its part (cut off: never held, the device
        sends them again) and is raised after the other parts are counted."""
        with self._commit_lock:
            with self._lock:
                pending = list(self._unsynced)
            failed: set[Path] = set()
            error: OSError | None = None
            for path in dict.fromkeys(path for path, *_ in pending):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    failed.add(path)
                    continue
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    failed.add(path)
                    error = exc
                finally:
                    os.close(fd)
            with self._lock:  # appends only add at the end: the first len(pending) are ours
                del self._unsynced[:len(pending)]
                for path, at, held in pending:
                    view = self._views.get(path)
                    if path in failed or view is None or view.pos != at:
                        continue  # else `held` reads it back
                    view.pos = at + RECORD.size
                    view.ranges = p.add_range(view.ranges, held)
                if failed:
                    self._drop_unsynced(failed, [e for e in pending if e[0] in failed])
        if error is not None:
            raise error

    def _drop_unsynced(self, paths: set[Path],
                       synced: list[tuple[Path, int, p.Range]]) -> None:
        """Cut the parts ``paths`` back to before their first record of ``synced`` (the
        failed commit's) and forget their later unsynced records too."""
        entries = synced + [entry for entry in self._unsynced if entry[0] in paths]
        for path in paths:
            first = min(at for where, at, _ in entries if where == path)
            with contextlib.suppress(OSError):
                os.truncate(path, first)
            own = self._own.get(path)
            if own is not None:
                own.end, own.hashed = first, -1
        self._unsynced = [entry for entry in self._unsynced if entry[0] not in paths]

    def held(self, device: str, rid: str, *, fresh: bool = False,
             size: int | None = None) -> list[p.Range]:
        """The ranges every worker's part holds (read incrementally); ``fresh`` lists the
        staging folder now instead of using a listing up to LOG_LIST_S old; ``size``: the
        upload's, from an init the caller has just loaded (else it is loaded here)."""
        with self._lock:
            if fresh:
                self._listings.pop(self.staging(device, rid), None)
            return p.merge_ranges([r for _, view in self._read_parts(device, rid, size)
                                   for r in view.ranges])

    def _read_parts(self, device: str, rid: str,
                    size: int | None = None) -> list[tuple[Path, _PartView]]:
        """Every part's view, read on where no unsynced chunk of ours waits in it."""
        if size is None:
            try:
                size = self._size(device, rid)
            except FileNotFoundError:
                return []
        out: list[tuple[Path, _PartView]] = []
        for path in self._parts(device, rid):
            view = self._views.get(path)
            if view is None:
                view = self._views[path] = _PartView(size)
            if not any(pending == path for pending, *_ in self._unsynced):
                _read_on(path, size, view)
            out.append((path, view))
        return out

    def _parts(self, device: str, rid: str) -> list[Path]:
        """The parts in the staging folder, listed at most every LOG_LIST_S (a listing per
        chunk cost more than the chunk's write). A part another worker started since is
        seen at the next listing: until then `have` claims less, never more."""
        folder = self.staging(device, rid)
        now = time.monotonic()
        listed = self._listings.get(folder)
        own = self.own_part(device, rid)
        if listed is not None and now - listed[0] < LOG_LIST_S:
            return listed[1] if own in listed[1] or own not in self._own else sorted(
                {*listed[1], own})
        try:
            parts = sorted(folder.glob(f"*{PART_SUFFIX}"))
        except FileNotFoundError:
            parts = []
        self._listings[folder] = (now, parts)
        return parts

    # --- objects -----------------------------------------------------------------------
    def object_path(self, device: str, rid: str) -> Path:
        return self.root / "objects" / device / f"{rid}.rec"

    def manifest_path(self, device: str, rid: str) -> Path:
        return self.root / "objects" / device / f"{rid}.manifest.json"

    def assemble(self, device: str, rid: str, size: int) -> tuple[Path, str] | None:
        """This worker's part made the whole ciphertext: what only other workers hold
        copied in, the records cut off, fsynced; its path and sha256 (call after
        ``held(fresh=True)`` covered every byte). None when bytes that another worker
        held are gone meanwhile (it stored the recording, or the upload began again)."""
        path = self.own_part(device, rid)
        with self._lock:
            own = self._own.get(path)
            if own is None:
                own, self._views[path] = _open_part(path, size)
                self._own[path] = own
            parts = self._read_parts(device, rid)
            mine = next((view.ranges for where, view in parts if where == path), [])
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                gaps = p.missing_ranges(size, mine)
                for where, _view in parts if gaps else []:
                    if where != path:
                        gaps = _copy_into(fd, where, size, gaps)
                if gaps:
                    return None  # records stay: this part is still a staging part
                if own.hashed == size and not p.missing_ranges(size, mine):
                    digest = own.digest.hexdigest()
                else:  # bytes from other parts, or out of order: hash the file
                    digest = _sha256(fd, size)
                os.ftruncate(fd, size)  # the records go only once the object is whole
                os.fsync(fd)
            finally:
                os.close(fd)
            self._forget(path.parent)  # this part is no longer a staging part
        return path, digest

    def publish(self, device: str, rid: str, tmp: Path, manifest: dict[str, Any]) -> Path:
        """Rename the assembled file into place with its manifest; both durable."""
        final = self.object_path(device, rid)
        make_dirs(final.parent, DIR_MODE)
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


def _open_part(path: Path, size: int) -> tuple[_Own, _PartView]:
    """This worker's part for an upload of ``size`` bytes and a view of it: created at
    its full size, or, left by an earlier run, with a torn last record cut off (its
    records are then read back, and the sha256 is computed from the file)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        info = os.fstat(fd)
        end = size + max(info.st_size - size, 0) // RECORD.size * RECORD.size
        if info.st_size != end:
            os.ftruncate(fd, end)
    finally:
        os.close(fd)
    return _Own(size, end, hashed=0 if end == size else -1), _PartView(size, info.st_ino)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _records(fd: int, size: int, start: int) -> Iterator[tuple[int, int, int, bool]]:
    """(record position, chunk offset, length, valid) of the complete records from file
    position ``start``; valid: in bounds and the bytes match the CRC."""
    length = os.fstat(fd).st_size
    count = max(length - start, 0) // RECORD.size
    table = os.pread(fd, count * RECORD.size, start)
    for i in range(len(table) // RECORD.size):
        offset, chunk_len, crc = RECORD.unpack_from(table, i * RECORD.size)
        valid = offset + chunk_len <= size and zlib.crc32(
            os.pread(fd, chunk_len, offset)) == crc
        yield start + i * RECORD.size, offset, chunk_len, valid


def _read_on(path: Path, size: int, view: _PartView) -> None:
    """Read the part's records after ``view.pos``; a replaced file is read from its start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # gone (stored, or the upload began again): holds nothing
        view.pos, view.ino, view.ranges = size, -1, []
        return
    try:
        info = os.fstat(fd)
        if info.st_ino != view.ino or info.st_size < view.pos:  # replaced, or cut off
            view.pos, view.ino, view.ranges = size, info.st_ino, []
        for at, offset, length, valid in _records(fd, size, view.pos):
            if valid:
                view.ranges = p.add_range(view.ranges, (offset, offset + length))
            view.pos = at + RECORD.size
    finally:
        os.close(fd)


def _copy_into(fd: int, source: Path, size: int, gaps: list[p.Range]) -> list[p.Range]:
    """Copy the bytes that ``source``'s valid records hold inside ``gaps`` into ``fd``;
    the gaps left."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return gaps
    try:
        for _at, offset, length, valid in _records(src, size, size):
            for a, b in gaps if valid else []:
                lo, hi = max(a, offset), min(b, offset + length)
                if lo < hi:
                    _pwrite_all(fd, os.pread(src, hi - lo, lo), lo)
            if valid:
                held = p.add_range(p.missing_ranges(size, gaps), (offset, offset + length))
                gaps = p.missing_ranges(size, held)
    finally:
        os.close(src)
    return gaps


def _sha256(fd: int, size: int) -> str:
    """sha256 of the first ``size`` bytes of ``fd``."""
    digest, done = hashlib.sha256(), 0
    while done < size:
        block = os.pread(fd, min(HASH_BLOCK_BYTES, size - done), done)
        if not block:
            break
        digest.update(block)
        done += len(block)
    return digest.hexdigest()
