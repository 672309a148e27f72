"""The appliance configuration: one TOML file, one typed schema.

Unknown keys, wrong types and out-of-range values are rejected with one line that names
the file, the key and what was expected. The file is parsed, never executed.
"""

from __future__ import annotations

import re
import threading
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

DEFAULT_PATH = Path("/etc/edge-recorder/config.toml")

# ISO 3166-1 alpha-2, optionally a subdivision ("US-CA").
Jurisdiction = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
# Certificate identities of the central side (sync/mosquitto/acl): never a device's.
RESERVED_IDS = frozenset({"central", "ops"})
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
LineId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")]
AgeRecipient = Annotated[str, msgspec.Meta(pattern=r"^age1[02-9ac-hj-np-z]{58}$")]


class ConfigError(Exception):
    """A configuration file is unreadable or invalid (message is one line)."""


class Storage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "/var/lib/edge-recorder"
    # Both default to paths under data_dir.
    recordings_dir: str | None = None
    catalogue: str | None = None
    min_free_mb: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 200


class Keys(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Ed25519 key that signs audit checkpoints; generated on first start when absent.
    device_key: str | None = None
    # age X25519 recipients (central store, optional escrow); the device never holds
    # the matching identities.
    recipients: Annotated[list[AgeRecipient], msgspec.Meta(min_length=1, max_length=8)]


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A call longer than this continues in a new recording segment.
    max_segment_s: Annotated[float, msgspec.Meta(ge=60, le=86_400)] = 3600.0
    # No ring for this long while ringing -> the caller gave up (ring-no-answer).
    ring_timeout_s: Annotated[float, msgspec.Meta(ge=4, le=30)] = 8.0
    # Ring and off-hook this close together are glare: treated as an answered inbound call.
    glare_window_s: Annotated[float, msgspec.Meta(ge=0, le=5)] = 1.0
    # Audio buffered before it is sealed, written and fdatasync'ed; bounds what a power
    # loss can take (<= 2 s required) against SD-card write amplification.
    flush_interval_s: Annotated[float, msgspec.Meta(ge=0.2, le=2.0)] = 2.0
    # Signed audit checkpoint period.
    checkpoint_interval_s: Annotated[float, msgspec.Meta(ge=10, le=86_400)] = 300.0


class Line(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: LineId
    backend: str
    country: Country | None = None  # defaults to the jurisdiction's country
    options: dict[str, Any] = msgspec.field(default_factory=dict)


Mode = Literal["notice", "notice_beep", "consent_gate", "manual", "log_basis", "none"]
DialCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9*#]{1,8}$")]
# A phone number as people write it: digits, an optional leading +, spaces and - . / ( ).
PhoneNumber = Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9(][0-9 ()./-]{1,30}[0-9]$")]


class PolicyOverride(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    record: bool | None = None
    mode: Mode | None = None
    basis: Annotated[str, msgspec.Meta(min_length=1, max_length=500)] | None = None
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None


class PolicyOverrides(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    inbound: PolicyOverride | None = None
    outbound: PolicyOverride | None = None


class PolicySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A signed policy file to use instead of the one built into the firmware.
    file: str | None = None
    # Base64 Ed25519 public keys (32 bytes) allowed to sign policy files and updates.
    signers: Annotated[list[str], msgspec.Meta(max_length=8)] = msgspec.field(
        default_factory=list)
    # Prompt language (default: the jurisdiction's first language).
    language: Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}(-[A-Z]{2})?$")] | None = None
    # E.164 country calling code of the site's line, without "+": "49".
    country_code: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{0,2}$")] | None = None
    # Outside-line prefixes dialled before numbers ("0", "9").
    dial_prefixes: Annotated[list[DialCode], msgspec.Meta(max_length=4)] = msgspec.field(
        default_factory=list)
    # Dialling this code first makes a private, unrecorded call.
    private_prefix: DialCode | None = None
    do_not_record: Annotated[list[PhoneNumber], msgspec.Meta(max_length=1000)] = (
        msgspec.field(default_factory=list))
    overrides: PolicyOverrides = msgspec.field(default_factory=PolicyOverrides)


InCallCode = Annotated[str, msgspec.Meta(pattern=r"^[*#][0-9]{1,3}$")]


class Codes(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """DTMF codes the dealer keys during a call ("*" or "#" and 1-3 digits)."""

    start: InCallCode = "*1"  # manual mode: start recording
    pause: InCallCode = "*2"  # stop storing audio (card details)
    resume: InCallCode = "*3"
    objection: InCallCode = "*9"  # the customer objects: stop and erase the recording
    max_gap_s: Annotated[float, msgspec.Meta(ge=0.5, le=10.0)] = 3.0


class SyncTrust(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys pinned at provisioning that the sync side trusts (docs/PROTOCOL.md, "Signed
    configuration and commands")."""

    # Base64 Ed25519 public key (32 bytes) of the ops key that signs configuration and
    # commands; without it every signed configuration and command is refused.
    ops_public_key: str | None = None


class Sync(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The sync agent (`edge-recorder sync`): MQTT 5 over TLS to the central store."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8883
    # CA of the broker, and this device's client certificate and key (CN = device_id).
    ca_file: str
    cert_file: str
    key_file: str
    # Upload chunk size; lowered to fit the broker's Maximum Packet Size (sync/protocol.py).
    # 120 KiB fits every common broker (AWS IoT Core: 128 KB per message).
    chunk_kib: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 120
    # Chunks sent that central has not yet reported holding.
    window: Annotated[int, msgspec.Meta(ge=1, le=64)] = 20
    heartbeat_s: Annotated[float, msgspec.Meta(ge=5, le=3600)] = 60.0
    # Reconnect back-off: doubles from min to max, with random jitter.
    reconnect_min_s: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 1.0
    reconnect_max_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 120.0
    # No answer from central for this long: send init again (doubling up to 32x).
    ack_timeout_s: Annotated[float, msgspec.Meta(ge=0.2, le=600)] = 10.0
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    # Base64 Ed25519 public key (32 bytes) of the central store's receipt key: when set,
    # an audit receipt is stored only if its signature verifies with it
    # (docs/PROTOCOL.md, "Audit upload").
    central_public_key: str | None = None


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device_id: DeviceId
    site: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    jurisdiction: Jurisdiction
    storage: Storage = msgspec.field(default_factory=Storage)
    keys: Keys
    limits: Limits = msgspec.field(default_factory=Limits)
    lines: Annotated[list[Line], msgspec.Meta(min_length=1, max_length=8)]
    policy: PolicySettings = msgspec.field(default_factory=PolicySettings)
    codes: Codes = msgspec.field(default_factory=Codes)
    trust: SyncTrust = msgspec.field(default_factory=SyncTrust)
    sync: Sync | None = None
    # Where the file came from (relative paths in it are resolved against its folder).
    source: str = ""

    @property
    def data_dir(self) -> Path:
        return self._path(self.storage.data_dir)

    @property
    def recordings_dir(self) -> Path:
        return self._path(self.storage.recordings_dir or str(self.data_dir / "recordings"))

    @property
    def catalogue_path(self) -> Path:
        return self._path(self.storage.catalogue or str(self.data_dir / "catalogue.db"))

    @property
    def device_key_path(self) -> Path:
        default = self.data_dir / "keys" / "device_ed25519.pem"
        return self._path(self.keys.device_key or str(default))

    @property
    def policy_file_path(self) -> Path | None:
        """The configured policy file (``policy.file``), if any."""
        return self._path(self.policy.file) if self.policy.file else None

    @property
    def policy_dir(self) -> Path:
        """Where installed policy updates live."""
        return self.data_dir / "policy"

    @property
    def prompts_dir(self) -> Path:
        """Site-installed recorded prompts: ``<lang>/<name>.wav`` (before the built ones)."""
        return self.data_dir / "prompts"

    def resolve_path(self, value: str) -> Path:
        """A path from the file, relative ones against the file's folder."""
        return self._path(value)

    def line_country(self, line: Line) -> str:
        return line.country or self.jurisdiction[:2]

    def _path(self, value: str) -> Path:
        path = Path(value)
        if not path.is_absolute() and self.source:
            path = Path(self.source).parent / path
        return path


_PATH_RE = re.compile(r"`\$\.?([^`]*)`")


def msgspec_error_key(message: str) -> tuple[str, str]:
    """Split msgspec's "what - at `$.a.b[0]`" into (key, what) for a one-line error."""
    match = _PATH_RE.search(message)
    key = match.group(1) if match else ""
    what = message.split(" - at ", maxsplit=1)[0] if " - at " in message else message
    if what.startswith("Object contains unknown field"):
        field = what.split("`")[1]
        return (f"{key}.{field}" if key else field), "unknown key"
    if what.startswith("Object missing required field"):
        field = what.split("`")[1]
        return (f"{key}.{field}" if key else field), "required key is missing"
    return key or "(top level)", what[0].lower() + what[1:]


T = TypeVar("T")


# msgspec builds a type's conversion info on its first use; two threads doing that for
# the same types at once (the recorder and the sync agent loading the policy file in the
# demo) crashed the process with SIGSEGV under load. Conversions are rare (files loaded at
# start and on updates), so they take turns.
_CONVERT_LOCK = threading.Lock()


def convert_checked(raw: Any, kind: type[T], source: str, *,
                    error: type[Exception] = ConfigError, prefix: str = "") -> T:
    """``msgspec.convert`` (strict) with a one-line ``SOURCE: key: what`` error of type
    ``error``; ``prefix`` is the key path of ``raw`` inside its file."""
    try:
        with _CONVERT_LOCK:
            return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        key, what = msgspec_error_key(str(exc))
        if prefix:
            key = prefix if key == "(top level)" else f"{prefix}.{key}"
        raise error(f"{source}: {key}: {what}") from None


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML ``text``; errors name ``source``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    raw["source"] = source
    config = convert_checked(raw, Config, source)
    _check_recipients(config)
    _check_lines(config)
    _check_policy(config)
    _check_codes(config)
    _check_trust(config)
    _check_sync(config)
    if config.device_id.lower() in RESERVED_IDS:
        raise ConfigError(f"{config.source}: device_id: {config.device_id!r} is reserved for "
                          "the central side's certificates; choose another")
    return config


def _check_recipients(config: Config) -> None:
    from firmware.agecrypt import AgeError, Recipient

    for index, text in enumerate(config.keys.recipients):
        try:
            Recipient.parse(text)
        except AgeError as exc:
            raise ConfigError(f"{config.source}: keys.recipients[{index}]: "
                              f"not a valid age recipient ({exc})") from None


def _check_codes(config: Config) -> None:
    codes = config.codes
    named = {"start": codes.start, "pause": codes.pause, "resume": codes.resume,
             "objection": codes.objection}
    for name, code in named.items():
        clash = [other for other, value in named.items()
                 if other != name and (value.startswith(code) or code.startswith(value))]
        if clash:
            raise ConfigError(f"{config.source}: codes.{name}: {code!r} clashes with codes."
                              f"{clash[0]} {named[clash[0]]!r} (one is a prefix of the other)")


def _check_trust(config: Config) -> None:
    from firmware.policyfile import PolicyError, parse_public_key

    if config.trust.ops_public_key is None:
        return
    try:
        parse_public_key(config.trust.ops_public_key)
    except PolicyError as exc:
        raise ConfigError(f"{config.source}: trust.ops_public_key: {exc}") from None


def _check_sync(config: Config) -> None:
    from firmware.policyfile import PolicyError, parse_public_key

    sync = config.sync
    if sync is None:
        return
    if sync.reconnect_min_s > sync.reconnect_max_s:
        raise ConfigError(f"{config.source}: sync.reconnect_min_s: {sync.reconnect_min_s:g} "
                          f"is above sync.reconnect_max_s {sync.reconnect_max_s:g}")
    if sync.central_public_key is not None:
        try:
            parse_public_key(sync.central_public_key)
        except PolicyError as exc:
            raise ConfigError(f"{config.source}: sync.central_public_key: {exc}") from None


def _check_policy(config: Config) -> None:
    from firmware.policyfile import PolicyError, parse_public_key

    policy, source = config.policy, config.source
    for index, text in enumerate(policy.signers):
        try:
            parse_public_key(text)
        except PolicyError as exc:
            raise ConfigError(f"{source}: policy.signers[{index}]: {exc}") from None
    if policy.file and not policy.signers:
        raise ConfigError(f"{source}: policy.signers: needed when policy.file is set "
                          "(the file must be signed by one of them)")
    for direction in ("inbound", "outbound"):
        override = getattr(policy.overrides, direction)
        if override is None:
            continue
        key = f"{source}: policy.overrides.{direction}"
        if override.record is False and override.mode not in (None, "none"):
            raise ConfigError(f"{key}: record = false needs mode \"none\" (or no mode)")
        if override.record is True and override.mode == "none":
            raise ConfigError(f"{key}: mode \"none\" needs record = false")


def _check_lines(config: Config) -> None:
    from drivers.line import LineError
    from drivers.registry import parse_options

    seen: set[str] = set()
    for index, line in enumerate(config.lines):
        if line.id in seen:
            raise ConfigError(f"{config.source}: lines[{index}].id: duplicate line id {line.id!r}")
        seen.add(line.id)
        try:
            parse_options(line.backend, line.options)
        except LineError as exc:
            raise ConfigError(f"{config.source}: lines[{index}]: {exc}") from None


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, str(path))
