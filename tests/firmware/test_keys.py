from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from firmware.fsutil import atomic_write, make_dirs
from firmware.keys import (
    KeyFormatError,
    KeyPermissionError,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    public_key_path,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_key_dir_and_pub_with_safe_modes(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "device_ed25519.pem"
    key = load_or_create_signing_key(path)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert mode_of(path.parent.parent) == 0o700
    pub = public_key_path(path)
    assert pub.name == "device_ed25519.pem.pub"
    assert mode_of(pub) == 0o644
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded_pub = load_public_key(pub)
    assert loaded_pub.public_bytes_raw() == key.public_key().public_bytes_raw()
    assert not list(path.parent.glob("*.part"))


def test_reload_gives_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = load_or_create_signing_key(path)
    second = load_or_create_signing_key(path)
    assert first.private_bytes_raw() == second.private_bytes_raw()


def test_openssl_reads_the_key_and_derives_the_same_public_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    load_or_create_signing_key(path)
    out = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout"],
                         capture_output=True, check=True).stdout
    assert out == public_key_path(path).read_bytes()
    text = subprocess.run(["openssl", "pkey", "-in", str(path), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "ED25519 Private-Key" in text


def test_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyPermissionError, match=r"k\.pem.*0644"):
        load_or_create_signing_key(path)


def test_refuses_a_key_group_can_read(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    load_or_create_signing_key(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyPermissionError):
        load_or_create_signing_key(path)


def test_missing_or_stale_pub_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = load_or_create_signing_key(path)
    pub = public_key_path(path)
    pub.unlink()
    load_or_create_signing_key(path)
    assert load_public_key(pub).public_bytes_raw() == key.public_key().public_bytes_raw()
    other = tmp_path / "other.pem"
    load_or_create_signing_key(other)
    pub.write_bytes(public_key_path(other).read_bytes())
    load_or_create_signing_key(path)
    assert load_public_key(pub).public_bytes_raw() == key.public_key().public_bytes_raw()


def test_provisioned_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(path)], check=True,
                   capture_output=True)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFormatError, match="not an Ed25519 private key"):
        load_or_create_signing_key(path)


def test_load_public_key_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x.pub"
    path.write_text("not a key\n")
    with pytest.raises(KeyFormatError, match=r"x\.pub"):
        load_public_key(path)


def test_key_id_is_first_8_bytes_of_sha256_of_raw_key(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.pem").public_key()
    assert key_id(key) == hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


def test_atomic_write_sets_exact_mode_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    old_umask = os.umask(0o077)
    try:
        atomic_write(target, b"one", 0o644)
    finally:
        os.umask(old_umask)
    assert mode_of(target) == 0o644
    part = tmp_path / "state.json.part"
    part.write_bytes(b"leftover from a crash")
    os.chmod(part, 0o666)
    atomic_write(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert mode_of(target) == 0o600
    assert not part.exists()


def test_make_dirs_sets_mode_only_on_new_directories(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    make_dirs(tmp_path / "a" / "b", 0o700)
    assert mode_of(tmp_path) == 0o755
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700


def test_processes_starting_together_end_up_with_one_key(tmp_path: Path) -> None:
    """Several workers on a fresh folder: exactly one key is created, all sign with it."""
    import multiprocessing

    path = tmp_path / "keys" / "central.pem"
    context = multiprocessing.get_context("fork")
    with context.Pool(6) as pool:
        ids = pool.map(_key_id_of, [path] * 12)
    assert len(set(ids)) == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]


def _key_id_of(path: Path) -> str:
    from firmware.keys import key_id, load_or_create_signing_key

    return key_id(load_or_create_signing_key(path).public_key())
