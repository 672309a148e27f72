"""The network half of `edge-recorder demo` (firmware/demo.py): the sync path, end to end,
on loopback.

:class:`SyncStack` makes a test PKI (sync/pki.py), starts mosquitto with mutual TLS on a
free loopback port (sync/broker.py), runs the central store in this process
(sync/central.py), an ops-side subscriber that watches fleet status, and the device's
sync agent (sync/agent.py) in a thread. It is a context manager: leaving it stops the
agent, the subscriber, central and the broker, in that order, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich import box
from rich.table import Table

from firmware.catalogue import Catalogue
from firmware.config import Config
from firmware.keys import load_or_create_signing_key
from firmware.policyfile import public_key_text
from sync import protocol as p
from sync.agent import SyncAgent
from sync.broker import Broker, start_local
from sync.central import CentralClient, CentralStore
from sync.pki import Pki, make_pki
from sync.status import newer_status

log = logging.getLogger(__name__)

# The smallest sync.heartbeat_s (firmware/config.py): ops sees a heartbeat within the demo.
HEARTBEAT_S = 5.0
ACK_TIMEOUT_S = 2.0  # central is one loopback hop away
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 2.0
CONNECT_TIMEOUT_S = 10.0
POLL_S = 0.05
OPS_CLIENT_ID = "ops"  # the broker takes the certificate CN as username and client id
STATUS_TOPIC = f"{p.TOPIC_ROOT}/+/up/status"

SYNC_TABLES = """
[sync]
host = "{host}"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
heartbeat_s = {heartbeat_s}
ack_timeout_s = {ack_timeout_s}
reconnect_min_s = {reconnect_min_s}
reconnect_max_s = {reconnect_max_s}
central_public_key = "{central_key}"

[trust]
ops_public_key = "{ops_key}"
"""


class DemoSyncError(Exception):
    """The demo's sync path did not do what it should (one-line message)."""


@dataclass(frozen=True)
class Arrival:
    """One recording as the device and central see it after the sync."""

    recording_id: str
    size: int
    device_sha256: str
    central_sha256: str | None  # None: central holds no copy
    outbox_state: str
    latency_s: float | None  # closed (queued) to confirmed stored

    @property
    def matches(self) -> bool:
        return self.central_sha256 == self.device_sha256


class StatusWatcher:
    """What ops sees: the newest status message of each device (birth, heartbeat, will),
    with the ops certificate, which may read ``up/status`` and nothing else of a device's."""

    def __init__(self, broker: Broker, pki: Pki) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, dict[str, Any]] = {}
        self._kinds: dict[str, set[str]] = {}
        self.connected = threading.Event()
        self._broker = broker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=OPS_CLIENT_ID,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(pki.ops.cert),
                            keyfile=str(pki.ops.key))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self._broker.host, self._broker.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def latest(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._latest.get(device_id)

    def kinds(self, device_id: str) -> set[str]:
        """The message types seen from ``device_id`` (birth, heartbeat, will)."""
        with self._lock:
            return set(self._kinds.get(device_id, ()))

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(STATUS_TOPIC, qos=1)
            self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            status = json.loads(message.payload)
            device = str(status["device"])
        except (ValueError, KeyError, TypeError):
            log.warning("status on %s: not a status message", message.topic[:120])
            return
        with self._lock:
            last = self._latest.get(device)
            if newer_status(None if last is None else int(last["session"]),
                            bytes(message.payload)):
                self._latest[device] = status
                self._kinds.setdefault(device, set()).add(str(status.get("type")))


class SyncStack:
    """PKI, broker, central, ops watcher and sync agent for one demo device."""

    def __init__(self, directory: Path, device_id: str) -> None:
        self.directory = directory
        self.device_id = device_id
        self.pki: Pki | None = None
        self.broker: Broker | None = None
        self.store: CentralStore | None = None
        self.watcher: StatusWatcher | None = None
        self._central: CentralClient | None = None
        self._agent: SyncAgent | None = None
        self._agent_thread: threading.Thread | None = None
        self._agent_error: BaseException | None = None

    # --- life cycle ------------------------------------------------------------------
    def start_network(self) -> None:
        """The PKI, central's receipt key and its store, and a running broker."""
        self.pki = make_pki(self.directory / "pki", [self.device_id])
        central_dir = self.directory / "central"
        (central_dir / "devices").mkdir(parents=True, exist_ok=True)
        key = load_or_create_signing_key(central_dir / "central_ed25519.pem")
        self.store = CentralStore(central_dir / "store", central_dir / "devices", key)
        self.broker = start_local(self.pki, self.directory / "broker")

    def config_tables(self) -> str:
        """The device's ``[sync]`` and ``[trust]`` tables (TOML) for this stack."""
        pki, broker, store = self._parts()
        credential = pki.clients[self.device_id]
        return SYNC_TABLES.format(
            host=broker.host, port=broker.port, ca=pki.ca_cert, cert=credential.cert,
            key=credential.key, heartbeat_s=HEARTBEAT_S, ack_timeout_s=ACK_TIMEOUT_S,
            reconnect_min_s=RECONNECT_MIN_S, reconnect_max_s=RECONNECT_MAX_S,
            central_key=public_key_text(store.key.public_key()),
            ops_key=pki.ops_signing_pub_b64)

    def register_device(self, public_key: Path) -> None:
        """Central learns the device's Ed25519 public key (manifests, checkpoints)."""
        _, _, store = self._parts()
        shutil.copy(public_key, store.devices_dir / f"{self.device_id}.pub")

    def start_sync(self, config: Config) -> None:
        """Central and the ops watcher connected, then the device's sync agent."""
        pki, broker, store = self._parts()
        self._central = CentralClient(store, broker.host, broker.port, pki.ca_cert,
                                      pki.central.cert, pki.central.key)
        self._central.start()
        self.watcher = StatusWatcher(broker, pki)
        self.watcher.start()
        for what, event in (("central", self._central.connected),
                            ("ops status watcher", self.watcher.connected)):
            if not event.wait(CONNECT_TIMEOUT_S):
                raise DemoSyncError(f"{what}: not connected to the broker on port "
                                    f"{broker.port} within {CONNECT_TIMEOUT_S:g} s")
        self._agent = SyncAgent(config)
        self._agent_thread = threading.Thread(target=self._run_agent, name="sync-agent")
        self._agent_thread.start()

    def _run_agent(self) -> None:
        assert self._agent is not None
        try:
            self._agent.run()
        except Exception as exc:  # reported by check_agent() on the main thread
            self._agent_error = exc

    def close(self) -> None:
        """Stop everything that runs; idempotent."""
        if self._agent is not None and self._agent_thread is not None:
            self._agent.stop()
            self._agent_thread.join(CONNECT_TIMEOUT_S)
        self._agent = self._agent_thread = None
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self._central is not None:
            self._central.stop()
            self._central = None
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> SyncStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _parts(self) -> tuple[Pki, Broker, CentralStore]:
        if self.pki is None or self.broker is None or self.store is None:
            raise DemoSyncError("the sync network is not started")
        return self.pki, self.broker, self.store

    # --- what happened ---------------------------------------------------------------
    def check_agent(self) -> None:
        if self._agent_error is not None:
            raise DemoSyncError(f"sync agent stopped: {self._agent_error}")

    def stored_count(self) -> int:
        return 0 if self.store is None else self.store.stats.stored

    def central_copy(self, recording_id: str) -> Path:
        """Where central keeps a stored recording."""
        _, _, store = self._parts()
        return store.stored_file(self.device_id, recording_id)

    def wait_synced(self, catalogue: Catalogue, timeout_s: float) -> None:
        """Until central confirmed every recording and countersigned the whole trail."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_agent()
            waiting = unsynced(catalogue)
            receipt, head = catalogue.receipt_count(), catalogue.head().count
            if not waiting and receipt >= head:
                return
            if time.monotonic() > deadline:
                what = (f"{len(waiting)} recording(s) not confirmed stored" if waiting
                        else f"audit receipt covers {receipt} of {head} entries")
                raise DemoSyncError(f"sync not done within {timeout_s:g} s: {what}")
            time.sleep(POLL_S)

    def wait_status(self, kind: str, timeout_s: float) -> bool:
        """Whether the ops watcher saw a ``kind`` status of the device within timeout_s."""
        return _wait(lambda: self.watcher is not None
                     and kind in self.watcher.kinds(self.device_id), timeout_s)

    def arrivals(self, catalogue: Catalogue) -> list[Arrival]:
        out = []
        for row in reversed(catalogue.recordings()):
            if row["deleted_at"]:
                continue
            item = catalogue.outbox_item("recording", str(row["id"])) or {}
            copy = self.central_copy(str(row["id"]))
            out.append(Arrival(
                str(row["id"]), int(row["size"] or 0), str(row["sha256"]),
                _file_sha256(copy) if copy.is_file() else None,
                str(item.get("state", "not queued")),
                _seconds_between(item.get("created_at"), row["synced_at"])))
        return out


# --- helpers -------------------------------------------------------------------------
def unsynced(catalogue: Catalogue) -> list[str]:
    """Recordings (not erased) that central has not confirmed stored."""
    waiting = []
    for row in catalogue.recordings():
        item = catalogue.outbox_item("recording", str(row["id"]))
        if not row["deleted_at"] and (item is None or item["state"] != "stored"
                                      or not row["synced_at"]):
            waiting.append(str(row["id"]))
    return waiting


def arrivals_table(arrivals: list[Arrival], title: str) -> Table:
    """One row per recording: id, size, sha256 on both sides, state, latency (80 columns)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True, show_edge=False)
    for name, justify in (("recording", "left"), ("KiB", "right"),
                          ("device sha256", "left"), ("central", "left"),
                          ("state", "left"), ("latency", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for item in arrivals:
        central = "[red]no copy" if item.central_sha256 is None else (
            "[green]== same" if item.matches else f"[red]{item.central_sha256[:12]}")
        table.add_row(item.recording_id[-12:], f"{item.size / 1024:.0f}",
                      item.device_sha256[:16], central, item.outbox_state,
                      "-" if item.latency_s is None else f"{item.latency_s:.2f} s")
    return table


def status_line(status: dict[str, Any] | None, kinds: set[str]) -> str:
    """The ops view of a device in one line."""
    if status is None:
        return "ops sees no status from the device"
    text = (f"ops sees {status['device']} {status['state']} (session {status['session']}, "
            f"firmware {status['firmware_version']}; seen: {', '.join(sorted(kinds))})")
    if status.get("type") == "heartbeat":
        text += (f": backlog {status['backlog_count']}, disk free "
                 f"{int(status['disk_free_bytes']) // 2**20} MiB, certificate "
                 f"{status['cert_expiry_days']} days, clock synced {status['clock_synced']}")
    return text


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _seconds_between(start_iso: Any, end_iso: Any) -> float | None:
    if not start_iso or not end_iso:
        return None
    start, end = datetime.fromisoformat(str(start_iso)), datetime.fromisoformat(str(end_iso))
    return (end - start).total_seconds()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
