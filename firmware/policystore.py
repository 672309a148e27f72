"""Which compliance policy is in force, and installing signed policy updates (the I/O side
of `firmware.policyfile`).

Candidates: the policy built into the firmware (``firmware/data/policy.toml``, trusted as
part of the image) -- or, if the config names one in ``policy.file``, that file, which must
carry a valid ``.sig`` by one of ``policy.signers`` -- and the update installed under
``<data_dir>/policy/``, which must too. The active policy is the valid candidate with the
highest version. A malformed, unsigned or older file is reported and ignored; the previous
policy stays in force.

Files are written with :func:`firmware.fsutil.atomic_write` (write, fsync, rename). The
policy and its signature are two files: a power cut between the two renames leaves a pair
that does not verify, which is then ignored like any other bad update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware.config import Config
from firmware.fsutil import atomic_write, make_dirs
from firmware.keys import KeyFileError, decode_private_key, private_key_pem
from firmware.policyfile import (
    PolicyError,
    PolicySet,
    parse_policy,
    parse_public_key,
    verify_policy,
)

log = logging.getLogger(__name__)

BUILTIN_PATH = Path(__file__).resolve().parent / "data" / "policy.toml"
INSTALLED_NAME = "policy.toml"
SIG_SUFFIX = ".sig"
POLICY_FILE_MODE = 0o644
POLICY_DIR_MODE = 0o700
SIGNING_KEY_MODE = 0o600


def signature_path(path: Path) -> Path:
    """Where the detached signature of the policy file at ``path`` lives."""
    return path.with_name(path.name + SIG_SUFFIX)


def installed_path(config: Config) -> Path:
    return config.policy_dir / INSTALLED_NAME


def signer_keys(config: Config) -> list[Ed25519PublicKey]:
    """``policy.signers`` as keys (the config loader has already validated them)."""
    return [parse_public_key(text) for text in config.policy.signers]


def read_policy(path: Path, signers: list[Ed25519PublicKey] | None = None) -> PolicySet:
    """The policy file at ``path``; with ``signers``, its ``.sig`` must verify first."""
    data = _read(path)
    if signers is not None:
        sig = signature_path(path)
        verify_policy(data, _read(sig), signers, source=str(sig))
    return parse_policy(data, str(path))


def load_active_policy(config: Config) -> tuple[PolicySet | None, list[str]]:
    """The policy in force and the problems found on the way (one line each).

    (None, problems) means there is no valid policy at all: the appliance must not
    record and should raise an alert.
    """
    signers = signer_keys(config)
    candidates: list[PolicySet] = []
    problems: list[str] = []
    base = config.policy_file_path
    _try(lambda: read_policy(BUILTIN_PATH) if base is None else read_policy(base, signers),
         candidates, problems)
    update = installed_path(config)
    if update.exists() or signature_path(update).exists():
        _try(lambda: read_policy(update, signers), candidates, problems)
    for problem in problems:
        log.warning("policy ignored: %s", problem)
    if not candidates:
        return None, problems
    return max(candidates, key=lambda p: p.version), problems


def install_policy(config: Config, data: bytes, signature: bytes,
                   source: str = "policy update") -> PolicySet:
    """Validate, verify and install an update; refuses one not newer than the active policy.

    Nothing is written unless every check passes, so a refused update leaves the policy
    in force as it was.
    """
    signers = signer_keys(config)
    if not signers:
        raise PolicyError(f"{config.source}: policy.signers: no signer keys configured, "
                          "so no policy update can be installed")
    verify_policy(data, signature, signers, source=source)
    update = parse_policy(data, source)
    active, _ = load_active_policy(config)
    if active is not None and update.version <= active.version:
        raise PolicyError(f"{source}: version {update.version} is not newer than the "
                          f"policy in force (version {active.version}, {active.source})")
    path = installed_path(config)
    make_dirs(path.parent, POLICY_DIR_MODE)
    atomic_write(path, data, POLICY_FILE_MODE)
    atomic_write(signature_path(path), signature, POLICY_FILE_MODE)
    log.info("installed policy %s version %d (%s)", update.id, update.version,
             update.sha256[:16])
    return parse_policy(data, str(path))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An ops-side policy signing key: PEM PKCS#8 Ed25519, unencrypted."""
    return decode_private_key(_read_key(path), path)


def create_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new signing key written to ``path`` (0600); refuses to overwrite a file."""
    if path.exists():
        raise KeyFileError(f"{path}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    atomic_write(path, private_key_pem(key), SIGNING_KEY_MODE)
    return key


def _try(load: Callable[[], PolicySet], candidates: list[PolicySet],
         problems: list[str]) -> None:
    try:
        candidates.append(load())
    except PolicyError as exc:
        problems.append(str(exc))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
