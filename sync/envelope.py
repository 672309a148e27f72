"""Signed envelopes for configuration, policy updates and commands (pure: bytes in, typed
values out, no I/O).

Wire form (docs/PROTOCOL.md, "Signed configuration and commands"): one UTF-8 JSON object

    {"format": "er-signed/1", "body": "<canonical JSON text>", "key_id": "<hex>",
     "signature": "<base64 Ed25519 signature>"}

The body travels as a string, so the device verifies the exact bytes that were signed and
never re-serialises anything before the signature is checked. The signature covers
``SIGNING_CONTEXT + body`` (a domain prefix, so a signature made with the same key over a
policy file or anything else can never pass as an envelope). The body must be canonical:
keys sorted, no insignificant whitespace, integers only (no floats), UTF-8 -- which is the
output of ``canonical_json``, so every body has exactly one byte form and one digest.

Verification order (:func:`verify`): parse -> signature -> device -> validity window ->
version / job de-duplication. Each refusal raises :class:`Rejected` with a reason code; a
caller acts only on a returned :class:`Accepted`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

FORMAT = "er-signed/1"
SIGNING_CONTEXT = b"edge-recorder signed envelope v1\n"
# Below the portable MQTT payload size (docs/PROTOCOL.md; AWS IoT caps messages at 128 KB).
MAX_ENVELOPE_BYTES = 120 * 1024
SIGNATURE_BYTES = 64  # RFC 8032 section 5.1.6
KEY_ID_BYTES = 8  # same key id rule as firmware.keys.key_id: SHA-256 of the raw key, 8 bytes
# Clocks of devices and the ops workstation may disagree by this much (both are NTP-synced
# in normal operation; five minutes is the Kerberos default tolerance, RFC 4120 section 1.6).
CLOCK_SKEW_S = 300
MAX_VALIDITY_S = 366 * 86_400  # a window longer than a year is a mistake, not a policy
WILDCARD_DEVICE = "*"

Kind = Literal["config", "policy", "command"]
KINDS: tuple[Kind, ...] = ("config", "policy", "command")
COMMANDS = frozenset({"status", "resync", "rotate_recipients", "fetch_logs", "reboot"})
# A job id is one MQTT topic level: no '/', '+', '#'. "config" names the topic that
# carries configuration results, so no job may take it.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_JOB_IDS = frozenset({"config"})
DEVICE_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")  # firmware.config.DeviceId

JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_RE.pattern)]
Device = Annotated[str, msgspec.Meta(pattern=DEVICE_RE.pattern)]
UnixS = Annotated[int, msgspec.Meta(ge=0, le=2**40)]


class Reason(StrEnum):
    """Why an envelope was refused (docs/PROTOCOL.md, "Reason codes")."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    WRONG_DEVICE = "wrong_device"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED = "replayed"
    OLDER_VERSION = "older_version"
    MALFORMED = "malformed"
    UNKNOWN_COMMAND = "unknown_command"


class Rejected(Exception):
    """An envelope was refused. ``body`` is set once the signature has verified (the
    content can then be attributed to the ops key), else None."""

    def __init__(self, reason: Reason, detail: str, body: Body | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.body = body


class Payload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """``config``: ``toml`` is the whole configuration file. ``policy``: ``policy`` is the
    policy file and ``signature`` its detached ``.sig`` (firmware.policyfile)."""

    toml: str | None = None
    policy: str | None = None
    signature: str | None = None


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    kind: Kind
    device: Device
    version: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    issued_at: UnixS
    not_before: UnixS
    not_after: UnixS
    job_id: JobId | None = None
    command: str | None = None
    args: dict[str, Any] | None = None
    payload: Payload | None = None


class Envelope(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: str
    body: str
    key_id: str | None = None
    signature: str | None = None


@dataclass(frozen=True)
class Accepted:
    """A verified envelope. ``duplicate``: a command whose job was handled before (answer
    from the stored result, do not execute again)."""

    body: Body
    digest: str  # SHA-256 hex of the canonical body bytes
    duplicate: bool = False


# --- canonical form and signing ------------------------------------------------------------

def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not \\u-escaped); floats are refused."""
    _refuse_floats(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError("floats are not allowed in a signed body (use integers)")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_floats(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_floats(item)


def body_digest(body_bytes: bytes) -> str:
    return hashlib.sha256(body_bytes).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES].hex()


def encode_body(body: Body) -> bytes:
    return canonical_json(msgspec.to_builtins(body))


def sign(body: Body, private_key: Ed25519PrivateKey) -> bytes:
    """The envelope bytes for ``body`` signed with the ops key. The body goes through the
    device's own decoding first, so nothing is signed that a device would refuse as
    malformed."""
    text = encode_body(body)
    decode_body(text)
    signature = private_key.sign(SIGNING_CONTEXT + text)
    envelope = {"format": FORMAT, "body": text.decode("utf-8"),
                "key_id": key_id(private_key.public_key()),
                "signature": base64.b64encode(signature).decode("ascii")}
    return canonical_json(envelope)


# --- decoding ------------------------------------------------------------------------------

def decode_envelope(data: bytes) -> Envelope:
    """The outer object: size, JSON, format, presence of a signature."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise Rejected(Reason.MALFORMED,
                       f"oversize: {len(data)} bytes, at most {MAX_ENVELOPE_BYTES}")
    try:
        envelope = msgspec.json.decode(data, type=Envelope, strict=True)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Rejected(Reason.MALFORMED, f"not a signed envelope ({exc})") from None
    if envelope.format != FORMAT:
        raise Rejected(Reason.MALFORMED, f"format {envelope.format!r}, expected {FORMAT!r}")
    if not envelope.signature:
        raise Rejected(Reason.UNSIGNED, "the envelope carries no signature")
    return envelope


def verify_signature(envelope: Envelope, public_key: Ed25519PublicKey | None) -> bytes:
    """The signed body bytes, once the signature verifies with the pinned ops key."""
    if public_key is None:
        raise Rejected(Reason.BAD_SIGNATURE, "no ops public key is pinned on this device "
                       "(trust.ops_public_key)")
    try:
        signature = base64.b64decode(envelope.signature or "", validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(Reason.BAD_SIGNATURE, "signature is not base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise Rejected(Reason.BAD_SIGNATURE, f"signature is {len(signature)} bytes, "
                       f"expected {SIGNATURE_BYTES}")
    body_bytes = envelope.body.encode("utf-8")
    try:
        public_key.verify(signature, SIGNING_CONTEXT + body_bytes)
    except InvalidSignature:
        raise Rejected(Reason.BAD_SIGNATURE, "signature does not verify with the pinned "
                       f"ops key {key_id(public_key)}") from None
    return body_bytes


def decode_body(body_bytes: bytes) -> Body:
    """The signed body: canonical JSON of a valid :class:`Body`."""
    try:
        raw = json.loads(body_bytes, parse_float=_no_float, parse_constant=_no_float)
        canonical = canonical_json(raw)
    except (ValueError, RecursionError) as exc:
        raise Rejected(Reason.MALFORMED, f"body is not JSON with integers only ({exc})") \
            from None
    if canonical != body_bytes:
        raise Rejected(Reason.MALFORMED, "body is not in canonical form")
    try:
        body = msgspec.convert(raw, Body, strict=True)
    except msgspec.ValidationError as exc:
        raise Rejected(Reason.MALFORMED, f"body: {exc}") from None
    check_body_shape(body)
    return body


def _no_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text}")


def check_body_shape(body: Body) -> None:
    """Fields that belong together: a command has a job id and a known command name;
    config and policy have their payload."""
    if body.not_after <= body.not_before:
        _malformed(body, "not_after must be later than not_before")
    if body.not_after - body.not_before > MAX_VALIDITY_S:
        _malformed(body, f"validity window longer than {MAX_VALIDITY_S} s")
    if body.job_id in RESERVED_JOB_IDS:
        _malformed(body, f"job_id {body.job_id!r} is reserved")
    if body.kind == "command":
        _check_command(body)
    else:
        _check_update(body)


def _check_command(body: Body) -> None:
    if body.job_id is None or body.command is None:
        _malformed(body, "a command needs job_id and command")
    if body.payload is not None:
        _malformed(body, "a command carries args, not a payload")
    if body.command not in COMMANDS:
        raise Rejected(Reason.UNKNOWN_COMMAND, f"command {body.command!r} is not one of "
                       f"{sorted(COMMANDS)}", body)


def _check_update(body: Body) -> None:
    if body.command is not None or body.args is not None:
        _malformed(body, f"a {body.kind} update carries no command or args")
    payload = body.payload
    if body.kind == "config" and (payload is None or payload.toml is None
                                  or payload.policy or payload.signature):
        _malformed(body, "a config update needs payload.toml (and nothing else)")
    if body.kind == "policy" and (payload is None or payload.policy is None
                                  or payload.signature is None or payload.toml):
        _malformed(body, "a policy update needs payload.policy and payload.signature")


def _malformed(body: Body, detail: str) -> None:
    raise Rejected(Reason.MALFORMED, detail, body)


# --- checks against the device's state --------------------------------------------------

def check_device(body: Body, device_id: str) -> None:
    if body.device not in (device_id, WILDCARD_DEVICE):
        raise Rejected(Reason.WRONG_DEVICE, f"addressed to {body.device!r}, this device is "
                       f"{device_id!r}", body)


def check_window(body: Body, now_s: float, clock_synced: bool) -> None:
    """Validity window with ``CLOCK_SKEW_S`` of tolerance either side. An unsynchronised
    clock is usually behind (a Pi without RTC restores the last saved time), so
    ``not_before`` is not enforced then -- a slow clock would refuse every message and the
    device could not be reached; ``not_after`` still is, and replays stay refused by the
    version rule."""
    if now_s > body.not_after + CLOCK_SKEW_S:
        raise Rejected(Reason.EXPIRED, f"not_after {body.not_after} has passed "
                       f"(device time {int(now_s)})", body)
    if clock_synced and now_s < body.not_before - CLOCK_SKEW_S:
        raise Rejected(Reason.NOT_YET_VALID, f"not_before {body.not_before} is in the "
                       f"future (device time {int(now_s)})", body)


def check_version(body: Body, last_version: int) -> None:
    if body.version == last_version:
        raise Rejected(Reason.REPLAYED, f"{body.kind} version {body.version} was already "
                       "applied", body)
    if body.version < last_version:
        raise Rejected(Reason.OLDER_VERSION, f"{body.kind} version {body.version} is older "
                       f"than the applied version {last_version}", body)


def check_duplicate(body: Body, digest: str, known: Mapping[str, str]) -> bool:
    """True if this exact envelope was handled before (a redelivery): ``known`` maps a job
    id -- or, for updates, the kind -- to the digest of the last body handled under it.
    A command reusing a known job id with other content is a replay and refused; an
    update with other content is simply a new update."""
    key = body.job_id if body.kind == "command" else body.kind
    if key is None or key not in known:
        return False
    if known[key] == digest:
        return True
    if body.kind == "command":
        raise Rejected(Reason.REPLAYED, f"job {body.job_id} was already used by another "
                       "command", body)
    return False


def verify(data: bytes, *, public_key: Ed25519PublicKey | None, device_id: str,
           now_s: float, clock_synced: bool, last_versions: Mapping[str, int],
           known_jobs: Mapping[str, str]) -> Accepted:
    """All checks in order; :class:`Rejected` for the first that fails.

    ``known_jobs``: see :func:`check_duplicate`. A redelivered envelope (a retained update
    on every reconnect, a command delivered twice) is recognised before the version rule
    -- its version is no longer newer -- so it is answered from its stored result instead
    of being refused as replayed, and never executed twice.
    """
    body_bytes = verify_signature(decode_envelope(data), public_key)
    body = decode_body(body_bytes)
    digest = body_digest(body_bytes)
    check_device(body, device_id)
    check_window(body, now_s, clock_synced)
    if check_duplicate(body, digest, known_jobs):
        return Accepted(body, digest, duplicate=True)
    check_version(body, last_versions.get(body.kind, 0))
    return Accepted(body, digest)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Base64 of a raw 32-byte Ed25519 key (``trust.ops_public_key``)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 of a 32-byte Ed25519 public key") from None


def make_body(kind: Kind, *, device: str, version: int, issued_at: int, valid_s: int,
              job_id: str | None = None, command: str | None = None,
              args: dict[str, Any] | None = None, payload: Payload | None = None) -> Body:
    """A body valid from ``issued_at`` for ``valid_s`` seconds (ops side)."""
    return Body(kind=kind, device=device, version=version, issued_at=issued_at,
                not_before=issued_at, not_after=issued_at + valid_s, job_id=job_id,
                command=command, args=args, payload=payload)
