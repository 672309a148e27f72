"""The compliance policy file: schema, validation, inheritance, signatures, emergency numbers.

Pure: bytes in, typed values out, no file or network I/O (`firmware.policystore` reads and
writes the files). A policy file is TOML (``firmware/data/policy.toml`` is the one shipped
with the firmware and documents the format in its header). Every rule of every
jurisdiction is resolved when the file is parsed -- sub-jurisdiction, then its parent, then
``[defaults]`` -- so a file that parses can answer every ``rule()`` question, and a file
that cannot is rejected as a whole with one line naming the key.

Updates are signed: a detached Ed25519 signature (RFC 8032) over the exact file bytes,
stored next to the file as ``<file>.sig``, one line of base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DIRECTIONS = ("inbound", "outbound")
# Disclosure modes, strictest first (see docs/COMPLIANCE.md, "Disclosure modes"):
# not recording at all is stricter than asking, asking is stricter than a person deciding,
# which is stricter than telling (with a beep, then without), which is stricter than only
# logging the legal basis.
MODES = ("none", "consent_gate", "manual", "notice_beep", "notice", "log_basis")
AUDIT_NUMBERS = ("commitment", "clear")
ALIASES = {"GB": "UK"}  # ISO 3166-1 says GB; the policy file and the config say UK.

SIGNATURE_BYTES = 64  # RFC 8032 section 5.1.6: an Ed25519 signature is 64 bytes
PUBLIC_KEY_BYTES = 32  # RFC 8032 section 5.1.5: an Ed25519 public key is 32 bytes

CODE_RE = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")  # ISO 3166-1 alpha-2 [-subdivision]
EMERGENCY_PATTERN = r"^[0-9*#]+[x0-9]*$"  # dialled digits; 'x' = any one digit
_SEPARATORS = str.maketrans("", "", " -./()")

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
Days = Annotated[int, msgspec.Meta(ge=1, le=3650)]
Language = Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$")]  # BCP 47 subset
EmergencyPattern = Annotated[str, msgspec.Meta(pattern=EMERGENCY_PATTERN, max_length=20)]
Digits = Annotated[str, msgspec.Meta(pattern=r"^[0-9*#]{1,12}$")]
ConsentTimeout = Annotated[float, msgspec.Meta(ge=3.0, le=60.0)]
AuditNumbers = Literal["commitment", "clear"]


class PolicyError(Exception):
    """A policy file or signature is invalid, or a rule does not exist (one-line message)."""


# --- the file's schema ---------------------------------------------------------------------
class BeepSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Telephone voice band is 300-3400 Hz (ITU-T G.711 / G.712).
    freq_hz: Annotated[float, msgspec.Meta(ge=300.0, le=3400.0)]
    duration_s: Annotated[float, msgspec.Meta(gt=0.0, le=5.0)]
    period_s: Annotated[float, msgspec.Meta(ge=1.0, le=600.0)]


class MetaSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    version: Annotated[int, msgspec.Meta(ge=1)]
    published: Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]


class DefaultsSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    beep: BeepSpec
    consent_timeout_s: ConsentTimeout
    consent_digits: Digits
    emergency_record: bool = False
    audit_numbers: AuditNumbers = "commitment"


class DirectionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    record: bool | None = None
    mode: str | None = None
    basis: Text | None = None
    retention_days: Days | None = None
    sources: Annotated[list[Text], msgspec.Meta(min_length=1)] | None = None
    reviewed: bool | None = None
    notes: Text | None = None


class JurisdictionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Text | None = None
    parent: str | None = None
    languages: Annotated[list[Language], msgspec.Meta(min_length=1)] | None = None
    emergency: Annotated[list[EmergencyPattern], msgspec.Meta(min_length=1)] | None = None
    audit_numbers: AuditNumbers | None = None
    emergency_record: bool | None = None
    consent_timeout_s: ConsentTimeout | None = None
    consent_digits: Digits | None = None
    beep: BeepSpec | None = None
    inbound: DirectionSpec | None = None
    outbound: DirectionSpec | None = None


class PolicyFileSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    meta: MetaSpec
    defaults: DefaultsSpec
    # Converted one by one (`_decode`) so that errors name the jurisdiction's code.
    jurisdictions: Annotated[dict[str, Any], msgspec.Meta(min_length=1)]


# --- resolved values -----------------------------------------------------------------------
class Beep(NamedTuple):
    freq_hz: float
    duration_s: float
    period_s: float


@dataclass(frozen=True, slots=True)
class Rule:
    """One jurisdiction and direction with every field resolved."""

    jurisdiction: str
    direction: str
    name: str
    record: bool
    mode: str
    basis: str
    retention_days: int
    sources: tuple[str, ...]
    reviewed: bool
    notes: str
    emergency: tuple[str, ...]
    beep: Beep
    consent_timeout_s: float
    consent_digits: str
    languages: tuple[str, ...]
    audit_numbers: str
    emergency_record: bool


class PolicySet:
    """A validated policy file: every rule resolved, plus the file's identity."""

    def __init__(self, meta: MetaSpec, rules: dict[tuple[str, str], Rule], sha256: str,
                 source: str) -> None:
        self.id = meta.id
        self.version = meta.version
        self.published = meta.published
        self.sha256 = sha256
        self.source = source
        self._rules = rules

    def __repr__(self) -> str:
        return f"<PolicySet {self.id} v{self.version} {self.sha256[:12]}>"

    def jurisdictions(self) -> tuple[str, ...]:
        """The jurisdiction codes, in the file's order."""
        return tuple(dict.fromkeys(code for code, _ in self._rules))

    def resolve_code(self, jurisdiction: str) -> str | None:
        """The file's code for ``jurisdiction`` ("gb" -> "UK"), or None if it has none."""
        code = jurisdiction.strip().upper()
        for candidate in (code, ALIASES.get(code, code)):
            if (candidate, DIRECTIONS[0]) in self._rules:
                return candidate
        return None

    def rule(self, jurisdiction: str, direction: str) -> Rule:
        """The resolved rule; PolicyError for an unknown jurisdiction or direction."""
        if direction not in DIRECTIONS:
            raise PolicyError(f"{self.source}: unknown direction {direction!r} "
                              f"(expected {' or '.join(DIRECTIONS)})")
        code = self.resolve_code(jurisdiction)
        if code is None:
            raise PolicyError(f"{self.source}: no rules for jurisdiction {jurisdiction!r}")
        return self._rules[(code, direction)]

    def rules(self) -> Iterator[Rule]:
        """Every rule, jurisdictions in the file's order, inbound before outbound."""
        return iter(self._rules.values())


# --- parsing -------------------------------------------------------------------------------
def parse_policy(data: bytes, source: str = "<policy>") -> PolicySet:
    """Parse and validate a policy file's exact bytes; PolicyError names ``source``."""
    spec = _decode(data, source)
    _check_codes_and_modes(spec, source)
    _check_parents(spec, source)
    rules: dict[tuple[str, str], Rule] = {}
    for code in spec.jurisdictions:
        for direction in DIRECTIONS:
            rules[(code, direction)] = _resolve(spec, code, direction, source)
    return PolicySet(spec.meta, rules, hashlib.sha256(data).hexdigest(), source)


def _decode(data: bytes, source: str) -> PolicyFileSpec:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    spec = _convert(raw, PolicyFileSpec, "", source)
    spec.jurisdictions = {code: _convert(value, JurisdictionSpec, f"jurisdictions.{code}",
                                         source)
                          for code, value in spec.jurisdictions.items()}
    return spec


def _convert(raw: Any, kind: type[Any], key_prefix: str, source: str) -> Any:
    from firmware.config import convert_checked

    return convert_checked(raw, kind, source, error=PolicyError, prefix=key_prefix)


def _check_codes_and_modes(spec: PolicyFileSpec, source: str) -> None:
    for code, jur in spec.jurisdictions.items():
        if not CODE_RE.match(code):
            raise PolicyError(f"{source}: jurisdictions.{code}: not a jurisdiction code "
                              "(ISO 3166-1 alpha-2, optionally -SUBDIVISION: DE, US-CA)")
        for direction in DIRECTIONS:
            mode = getattr(jur, direction).mode if getattr(jur, direction) else None
            if mode is not None and mode not in MODES:
                raise PolicyError(f"{source}: jurisdictions.{code}.{direction}.mode: "
                                  f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")


def _check_parents(spec: PolicyFileSpec, source: str) -> None:
    for code in spec.jurisdictions:
        seen = [code]
        parent = spec.jurisdictions[code].parent
        while parent is not None:
            if parent not in spec.jurisdictions:
                raise PolicyError(f"{source}: jurisdictions.{seen[-1]}.parent: "
                                  f"no jurisdiction {parent!r} in this file")
            if parent in seen:
                cycle = " -> ".join([*seen, parent])
                raise PolicyError(f"{source}: jurisdictions.{code}.parent: cycle {cycle}")
            seen.append(parent)
            parent = spec.jurisdictions[parent].parent


_MISSING: Any = object()


def _chain(spec: PolicyFileSpec, code: str) -> list[JurisdictionSpec]:
    """The jurisdiction, its parent, the parent's parent... (cycles already refused)."""
    chain = [spec.jurisdictions[code]]
    while chain[-1].parent is not None:
        chain.append(spec.jurisdictions[chain[-1].parent])
    return chain


def _first(values: Sequence[Any], default: Any = _MISSING) -> Any:
    return next((value for value in values if value is not None), default)


def _resolve(spec: PolicyFileSpec, code: str, direction: str, source: str) -> Rule:
    chain = _chain(spec, code)
    here = f"{source}: jurisdictions.{code}"

    def jur(field: str, default: Any = _MISSING) -> Any:
        value = _first([getattr(j, field) for j in chain], default)
        if value is _MISSING:
            raise PolicyError(f"{here}.{field}: not set here or in a parent jurisdiction")
        return value

    def rule(field: str, default: Any = _MISSING) -> Any:
        specs = [getattr(j, direction) for j in chain]
        value = _first([getattr(d, field) for d in specs if d is not None], default)
        if value is _MISSING:
            raise PolicyError(f"{here}.{direction}.{field}: "
                              "not set here or in a parent jurisdiction")
        return value

    defaults = spec.defaults
    beep = jur("beep", defaults.beep)
    resolved = Rule(
        jurisdiction=code, direction=direction, name=jur("name"),
        record=rule("record"), mode=rule("mode"), basis=rule("basis"),
        retention_days=rule("retention_days"), sources=tuple(rule("sources")),
        reviewed=bool(_own(chain[0], direction, "reviewed")),
        notes=_own(chain[0], direction, "notes") or "",
        emergency=tuple(jur("emergency")),
        beep=Beep(beep.freq_hz, beep.duration_s, beep.period_s),
        consent_timeout_s=jur("consent_timeout_s", defaults.consent_timeout_s),
        consent_digits=jur("consent_digits", defaults.consent_digits),
        languages=tuple(jur("languages")),
        audit_numbers=jur("audit_numbers", defaults.audit_numbers),
        emergency_record=jur("emergency_record", defaults.emergency_record))
    _check_rule(resolved, f"{here}.{direction}")
    return resolved


def _own(jur: JurisdictionSpec, direction: str, field: str) -> Any:
    """Sign-off and notes speak of this jurisdiction's own rule: they are never inherited."""
    spec: DirectionSpec | None = getattr(jur, direction)
    return getattr(spec, field) if spec is not None else None


def _check_rule(rule: Rule, where: str) -> None:
    if not rule.record and rule.mode != "none":
        raise PolicyError(f"{where}: record = false needs mode \"none\" (got {rule.mode!r})")
    if rule.record and rule.mode == "none":
        raise PolicyError(f"{where}: mode \"none\" needs record = false")
    if rule.beep.period_s <= rule.beep.duration_s:
        raise PolicyError(f"{where}: beep period_s must be longer than duration_s")


# --- signatures ----------------------------------------------------------------------------
def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes (as in ``policy.signers``)."""
    raw = _b64(text, PUBLIC_KEY_BYTES, "not base64 of a 32-byte Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key: the form ``policy.signers`` takes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def sign_policy(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The ``.sig`` file for ``data``: base64 of the 64-byte Ed25519 signature, one line."""
    return base64.b64encode(private_key.sign(data)) + b"\n"


def verify_policy(data: bytes, signature: bytes, public_keys: Sequence[Ed25519PublicKey],
                  source: str = "") -> None:
    """Check the ``.sig`` file's bytes against ``data`` and any one of ``public_keys``."""
    prefix = f"{source}: " if source else ""
    try:
        text = signature.decode("ascii")
    except UnicodeDecodeError:
        text = "?"
    raw = _b64(text, SIGNATURE_BYTES,
               f"{prefix}signature file is not base64 of a 64-byte Ed25519 signature")
    if not public_keys:
        raise PolicyError(f"{prefix}no signer keys to verify the signature with")
    for key in public_keys:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return
    raise PolicyError(f"{prefix}signature does not verify with any of the "
                      f"{len(public_keys)} allowed signer key(s)")


def _b64(text: str, size: int, message: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PolicyError(message) from None
    if len(raw) != size:
        raise PolicyError(message)
    return raw


# --- emergency numbers ---------------------------------------------------------------------
def normalise_dialled(number: str) -> str:
    """Drop the separators people write in numbers (spaces, dashes, dots, brackets)."""
    return number.translate(_SEPARATORS)


def is_emergency(number: str | None, patterns: Sequence[str],
                 dial_prefixes: Sequence[str] = ()) -> bool:
    """True if ``number`` is exactly one of ``patterns`` ('x' = any one digit), as dialled
    or after one of the site's outside-line ``dial_prefixes`` ("0", "9").

    Exact match only, never "starts with": short codes are prefixes of ordinary numbers
    in many numbering plans (FR 15/17/18, IN 100-108, JP 110/119), so a prefix match would
    treat ordinary calls as emergency calls and drop them from recording without a rule
    saying so. The decision is taken on the complete number; the call engine asks once
    dialling has finished.
    """
    if not number:
        return False
    dialled = normalise_dialled(number)
    candidates = {dialled} | {dialled[len(prefix):] for prefix in dial_prefixes
                              if prefix and dialled.startswith(prefix)}
    return any(_matches(candidate, pattern) for candidate in candidates
               for pattern in patterns)


def _matches(number: str, pattern: str) -> bool:
    if len(number) != len(pattern):
        return False
    return all(p == n or (p == "x" and n.isdigit()) for p, n in zip(pattern, number,
                                                                     strict=True))
