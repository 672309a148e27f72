"""Crash-safe file writes for small state files (keys, manifests, markers).

A new version of a file is written to ``<name>.part``, flushed to the device, renamed
over the old one and the directory entry is flushed too, so after a power cut the path
holds either the old or the new content, never a torn mix.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to the device."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically; the file gets exactly ``mode``.

    The ``.part`` file is created with O_EXCL and at most ``mode`` (the umask can only
    narrow it), then set to ``mode`` exactly, so a secret is never readable more widely
    than asked, not even for a moment.
    """
    part = path.with_name(path.name + PART_SUFFIX)
    part.unlink(missing_ok=True)  # a leftover from a crash; its mode is not ours
    try:
        _write_synced(part, data, mode)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    log.debug("wrote %s (%d bytes, mode %04o)", path, len(data), mode)


def atomic_symlink(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, replacing whatever is there in one rename
    (a file or an older link); nothing to do when it already points there."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    part = link.with_name(link.name + PART_SUFFIX)
    part.unlink(missing_ok=True)
    try:
        os.symlink(target, part)
        os.replace(part, link)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    log.debug("linked %s -> %s", link, target)


def _write_synced(part: Path, data: bytes, mode: int) -> None:
    """A new file (O_EXCL, never wider than ``mode``, then exactly ``mode``), fsynced."""
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def create_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` only if no file is there; False if one already is.

    For files several processes may try to create at once (a key on first start): the
    data goes to a private temporary file, which is then hard-linked into place, so the
    file appears complete or not at all, and exactly one creator wins.
    """
    part = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{PART_SUFFIX}")
    try:
        _write_synced(part, data, mode)
        try:
            os.link(part, path)
        except FileExistsError:
            return False
    finally:
        part.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` and missing parents; the ones created get exactly ``mode``.

    Existing directories are left as they are. Each new entry is flushed to the device.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=mode, exist_ok=True)
        os.chmod(directory, mode)
        fsync_dir(directory.parent)


_FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h


@functools.cache
def _libc_fallocate() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve blocks past the end of a file without changing its size (Linux
    ``fallocate(FALLOC_FL_KEEP_SIZE)``), so appending to it and fdatasync'ing does not
    journal block-allocation metadata every time. Best effort: False where unsupported.
    Blocks left past EOF are released by any ``ftruncate`` (ext4 truncates preallocated
    blocks even when the size does not change).
    """
    func = _libc_fallocate()
    if func is None:
        return False
    return func(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0
