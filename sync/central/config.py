"""The central store's configuration file (TOML): broker, store, worker, fleet thresholds.

``examples/central.toml`` is a commented example; docs/CENTRAL.md lists every key.
Unknown keys, wrong types and out-of-range values are one-line errors naming the file and
the key (``FILE: key: what``), as for the device's config (firmware/config.py).
Relative paths are taken from the file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

from firmware.config import ConfigError, convert_checked

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveS = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Broker(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8883
    ca: str
    cert: str
    key: str


class Store(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    objects_dir: str
    devices_dir: str
    signing_key: str
    catalogue: str = ""  # default: sqlite://<objects_dir>/catalogue.db


class Worker(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Name = "central"
    share_group: Name | None = None
    retention_interval_s: PositiveS = 3600.0  # how often this worker applies retention


class Fleet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Alert thresholds of `edge-recorder fleet` (docs/CENTRAL.md, "Fleet monitor")."""

    heartbeat_s: PositiveS = 60.0  # the devices' sync.heartbeat_s
    missed_heartbeats: Annotated[int, msgspec.Meta(ge=1)] = 3  # silent this long = offline
    backlog_count: Annotated[int, msgspec.Meta(ge=0)] = 100
    oldest_unsynced_hours: NonNegative = 24.0
    disk_free_mb: NonNegative = 500.0
    cert_expiry_days: NonNegative = 30.0
    clock_unsynced: bool = True  # alert when a device's clock is not synchronised


class CentralConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    broker: Broker | None = None  # required by `central ingest`, not by `fleet`
    store: Store
    worker: Worker = msgspec.field(default_factory=Worker)
    fleet: Fleet = msgspec.field(default_factory=Fleet)
    source: str = ""

    @property
    def catalogue_url(self) -> str:
        return self.store.catalogue or f"sqlite://{Path(self.store.objects_dir) / 'catalogue.db'}"


def parse_central_config(text: str, source: str, base: Path | None = None) -> CentralConfig:
    """Parse and validate ``text``; relative paths are resolved against ``base``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    raw["source"] = source
    config = convert_checked(raw, CentralConfig, source)
    return _resolved(config, base) if base is not None else config


def load_central_config(path: Path) -> CentralConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") \
            from None
    return parse_central_config(text, str(path), path.parent)


def check_files(config: CentralConfig) -> None:
    """What `central ingest` needs on disk before it connects."""
    if config.broker is None:
        raise ConfigError(f"{config.source}: broker: required key is missing")
    for key in ("ca", "cert", "key"):
        if not Path(getattr(config.broker, key)).is_file():
            raise ConfigError(f"{config.source}: broker.{key}: "
                              f"{getattr(config.broker, key)}: no such file")
    if not Path(config.store.devices_dir).is_dir():
        raise ConfigError(f"{config.source}: store.devices_dir: {config.store.devices_dir}: "
                          "not a folder")


def _resolved(config: CentralConfig, base: Path) -> CentralConfig:
    def at(value: str) -> str:
        return value if not value or Path(value).is_absolute() else str(base / value)

    store = msgspec.structs.replace(
        config.store, objects_dir=at(config.store.objects_dir),
        devices_dir=at(config.store.devices_dir), signing_key=at(config.store.signing_key))
    broker = config.broker and msgspec.structs.replace(
        config.broker, ca=at(config.broker.ca), cert=at(config.broker.cert),
        key=at(config.broker.key))
    return msgspec.structs.replace(config, store=store, broker=broker)
