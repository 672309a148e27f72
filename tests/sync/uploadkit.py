"""A device (config, catalogue, key, recordings in the outbox), the sync agent in a thread
or a process, and the minimal central store, for the upload tests and the bench."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drivers.clock import SystemClock
from firmware.catalogue import Catalogue
from firmware.config import Config, load_config
from firmware.keys import load_or_create_signing_key, public_key_path
from sync.agent import SyncAgent
from sync.broker import Broker, free_port, local_config
from sync.central import CentralClient, CentralStore
from sync.pki import Pki
from tests.configtext import REPO, device_config

DEVICE = "dev-a"
WAIT_S = 20.0


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s")
        time.sleep(0.02)


def write_config(directory: Path, pki: Pki, broker: Broker, *, chunk_kib: int = 120,
                 window: int | None = None, ack_timeout_s: float = 1.0,
                 central_public_key: str | None = None, device_id: str = DEVICE) -> Path:
    credential = pki.clients[device_id]
    central_key = "" if central_public_key is None else \
        f'central_public_key = "{central_public_key}"\n'
    text = device_config(device_id=device_id, data_dir="data", tail=f"""[sync]
host = "{broker.host}"
port = {broker.port}
ca_file = "{pki.ca_cert}"
cert_file = "{credential.cert}"
key_file = "{credential.key}"
chunk_kib = {chunk_kib}
{'' if window is None else f'window = {window}'}
reconnect_min_s = 0.2
reconnect_max_s = 1.0
ack_timeout_s = {ack_timeout_s}
{central_key}""")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Device:
    """The appliance's side: its catalogue and recordings, and the sync agent."""

    def __init__(self, directory: Path, pki: Pki, broker: Broker, *,
                 central_public_key: str | None = None, device_id: str = DEVICE,
                 **options: float) -> None:
        self.device_id = device_id
        self.config_path = write_config(directory, pki, broker,  # type: ignore[arg-type]
                                        central_public_key=central_public_key,
                                        device_id=device_id, **options)
        self.config: Config = load_config(self.config_path)
        self.key = load_or_create_signing_key(self.config.device_key_path)
        self.catalogue = Catalogue(self.config.catalogue_path, clock=SystemClock(),
                                   device_id=device_id)
        self.config.recordings_dir.mkdir(parents=True, exist_ok=True)
        self._agent: SyncAgent | None = None
        self._thread: threading.Thread | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def public_key(self) -> Path:
        return public_key_path(self.config.device_key_path)

    def add_recording(self, size: int, seed: int = 0, *, data: bytes | None = None,
                      **call: Any) -> tuple[str, str]:
        """A closed recording of ``size`` encrypted-looking bytes (or ``data``), queued for
        upload; ``call`` adds columns of its call row (caller_number, salt, decision...)."""
        if data is None:
            data = os.urandom(size) if seed == 0 else _pseudo_random(size, seed)
        size = len(data)
        with self.catalogue.transaction() as tx:
            call_id = tx.insert_call(line_id="line1", direction="inbound", **call)
            rid = tx.insert_recording(call_id=call_id, path="", codec="alaw",
                                      retention_until="2099-01-01T00:00:00.000Z")
            path = self.config.recordings_dir / f"{rid}.rec"
            path.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            tx.update_recording(rid, path=str(path), state="complete", size=size,
                                sha256=digest, audio_s=size / 8000)
            tx.enqueue("recording", rid)
            tx.audit("recording.closed", rid, call_id=call_id, size=size, sha256=digest)
        return rid, digest

    def recording(self, rid: str) -> dict[str, object]:
        row = self.catalogue.get_recording(rid)
        assert row is not None
        return row

    def outbox_state(self, rid: str, kind: str = "recording") -> str:
        item = self.catalogue.outbox_item(kind, rid)
        assert item is not None, f"no {kind} {rid} in the outbox"
        return str(item["state"])

    def start_agent(self) -> SyncAgent:
        self._agent = SyncAgent(self.config)
        self._thread = threading.Thread(target=self._agent.run, name="sync-agent")
        self._thread.start()
        return self._agent

    def stop_agent(self) -> None:
        if self._agent is not None and self._thread is not None:
            self._agent.stop()
            self._thread.join(10)
            assert not self._thread.is_alive(), "sync agent did not stop"
        self._agent = self._thread = None

    def start_process(self, log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "firmware.cli", "sync", "--config",
                 str(self.config_path)], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        return self.process

    def close(self) -> None:
        self.stop_agent()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.catalogue.close()


class Central:
    """One central ingest worker (SQLite catalogue) in this process."""

    def __init__(self, directory: Path, pki: Pki, broker: Broker, device_pub: Path) -> None:
        devices = directory / "devices"
        devices.mkdir(parents=True, exist_ok=True)
        shutil.copy(device_pub, devices / f"{DEVICE}.pub")
        key = load_or_create_signing_key(directory / "central_ed25519.pem")
        self.store = CentralStore(directory / "store", devices, key)
        credential = pki.central
        self.client = CentralClient(self.store, broker.host, broker.port, pki.ca_cert,
                                    credential.cert, credential.key)
        self.started = False

    def start(self) -> Central:
        self.client.start()
        wait_until(self.client.connected.is_set, what="central connected")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            self.client.stop()
            self.started = False

    def stored_file(self, rid: str) -> Path:
        return self.store.stored_file(DEVICE, rid)


def shared_broker(pki: Pki, directory: Path, workers: Sequence[str], *,
                  routed: bool = True) -> Broker:
    """A started loopback broker whose ACL is the repository's plus one ``user`` block per
    ingest worker (docs/CENTRAL.md, "Deployment"), for workers sharing a subscription;
    ``routed=False`` leaves out each worker's own ``to/`` topics (a forgotten line)."""
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "acl"
    to = "topic read er/v1/+/to/{}/#\n" if routed else ""
    blocks = "".join(f"user {w}\ntopic read er/v1/+/up/#\n{to.format(w)}"
                     f"topic write er/v1/+/down/#\n\n" for w in workers)
    acl.write_text(blocks + (REPO / "sync" / "mosquitto" / "acl").read_text())
    config = dataclasses.replace(local_config(pki, directory / "broker", free_port()),
                                 acl_file=acl)
    broker = Broker(directory / "broker", config, probe=pki.central)
    broker.start()
    return broker


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pseudo_random(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
