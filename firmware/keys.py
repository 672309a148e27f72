"""The device signing key (Ed25519) that signs audit checkpoints.

The key is provisioned, or generated on the device on first start. The private key is a
PEM PKCS#8 file readable by its owner only (0600, in a 0700 directory); the public key
is written next to it as ``<key>.pub`` (PEM SubjectPublicKeyInfo, 0644) for the
provisioning tool and for anyone who verifies the audit trail.
"""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware.fsutil import atomic_write, create_new, make_dirs

log = logging.getLogger(__name__)

PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
KEY_DIR_MODE = 0o700
PUB_SUFFIX = ".pub"
KEY_ID_BYTES = 8  # key id = first 8 bytes of SHA-256 of the raw 32-byte key (RFC 8032 5.1.5)


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or unsafe (message names the file)."""


class KeyPermissionError(KeyFileError):
    """A private key file is accessible to group or others."""


class KeyFormatError(KeyFileError):
    """A key file is not a PEM Ed25519 key of the expected kind."""


def public_key_path(path: Path) -> Path:
    """Where the public half of the private key at ``path`` is written."""
    return path.with_name(path.name + PUB_SUFFIX)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short hex id of a public key: SHA-256 of the raw key, first 8 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES].hex()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The device key at ``path``; generated (and ``.pub`` written) if there is none.

    Refuses a key file that group or others may access. Rewrites a missing or stale
    ``.pub`` so it always matches the private key.
    """
    key = _load_private_key(path) if path.exists() else _create_private_key(path)
    _ensure_public_file(path, key.public_key())
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM SubjectPublicKeyInfo file."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFormatError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    """A new key, unless another process created one first: then that one (every process
    of a device or a central store must sign with the same key)."""
    make_dirs(path.parent, KEY_DIR_MODE)
    key = Ed25519PrivateKey.generate()
    if not create_new(path, private_key_pem(key), PRIVATE_KEY_MODE):
        return _load_private_key(path)
    log.info("generated device key %s at %s", key_id(key.public_key()), path)
    return key


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    _check_private_mode(path)
    return decode_private_key(_read(path), path)


def decode_private_key(data: bytes, source: Path | str) -> Ed25519PrivateKey:
    """An unencrypted PEM (PKCS#8) Ed25519 private key; errors name ``source``."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{source}: not an Ed25519 private key ({type(key).__name__})")
    return key


def _check_private_mode(path: Path) -> None:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyPermissionError(
            f"{path}: private key has mode {mode:04o}, group/others may access it; "
            f"chmod 600 it (and check it has not leaked)")


def _ensure_public_file(path: Path, public_key: Ed25519PublicKey) -> None:
    pub_path = public_key_path(path)
    pem = public_key_pem(public_key)
    try:
        current = pub_path.read_bytes()
    except FileNotFoundError:
        current = None
    if current == pem:
        return
    if current is None and (create_new(pub_path, pem, PUBLIC_KEY_MODE)
                            or pub_path.read_bytes() == pem):
        return  # written here, or by a process that started at the same time
    log.warning("%s does not match %s; rewriting it", pub_path, path)
    atomic_write(pub_path, pem, PUBLIC_KEY_MODE)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from exc
