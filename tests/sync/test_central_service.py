"""The central store as it is run: an ingest worker from its config file against a real
mosquitto, the fleet monitor's live table, and search by the numbers a device signs."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.catalogue import iso_utc_ms
from firmware.cli import main as cli_main
from firmware.keys import load_public_key
from firmware.recorder import commitment
from sync import protocol as p
from sync.broker import Broker
from sync.central.catalogue import StatusRow, open_catalogue
from sync.central.config import Fleet
from sync.central.fleet import rows, watch
from sync.central.search import search
from sync.pki import Pki
from tests.sync.uploadkit import DEVICE, REPO, Central, Device, sha256_file, wait_until

CALLER = "+498912345678"
DIALED = "022198765"
STOP_S = 10.0  # bound on a worker's orderly stop


# --- an ingest worker from its config file -----------------------------------------------
def _central_toml(directory: Path, pki: Pki, broker: Broker) -> Path:
    credential = pki.central
    (directory / "devices").mkdir(parents=True)
    path = directory / "central.toml"
    path.write_text(f"""
[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{pki.ca_cert}"
cert = "{credential.cert}"
key = "{credential.key}"
[store]
objects_dir = "store"
devices_dir = "devices"
signing_key = "central_ed25519.pem"
[worker]
id = "central"
retention_interval_s = 3600
""", encoding="utf-8")
    return path


@pytest.fixture
def config_worker(tmp_path: Path, pki: Pki,
                  broker: Broker) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """`edge-recorder central ingest --config FILE` in its own process, connected."""
    central = tmp_path / "central"
    config = _central_toml(central, pki, broker)
    log_path = tmp_path / "ingest.log"
    with log_path.open("ab") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "firmware.cli", "central", "ingest",
                                   "--config", str(config)], cwd=REPO, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ingest central connected" in log_path.read_text(),
                   what=f"worker connected ({log_path})")
        yield central, worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_worker_from_config_file_stores_an_upload_and_stops(
        tmp_path: Path, pki: Pki, broker: Broker,
        config_worker: tuple[Path, subprocess.Popen[bytes]]) -> None:
    central, worker = config_worker
    device = Device(tmp_path / "device", pki, broker)
    (central / "devices" / f"{DEVICE}.pub").write_bytes(device.public_key.read_bytes())
    try:
        rid, digest = device.add_recording(300_000)
        device.start_agent()
        wait_until(lambda: device.outbox_state(rid) == "stored", what=f"{rid} stored")
    finally:
        device.close()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(STOP_S) == 0
    log_text = (tmp_path / "ingest.log").read_text()
    assert "Traceback" not in log_text, log_text
    catalogue = open_catalogue(f"sqlite://{central / 'store' / 'catalogue.db'}")
    try:
        row = catalogue.get_recording(rid)
    finally:
        catalogue.close()
    assert row is not None and row.sha256 == digest
    assert sha256_file(central / "store" / row.object_path) == digest


# --- fleet --watch -----------------------------------------------------------------------
def _status_row(now_s: float, **status: Any) -> StatusRow:
    received = iso_utc_ms(now_s)
    healthy = {"backlog_count": 0, "oldest_unsynced_age_s": 0, "disk_free_bytes": 10**10,
               "cert_expiry_days": 300, "clock_synced": True, "last_call_at": None}
    return StatusRow(DEVICE, 1, "online", received, received, healthy | status)


def test_fleet_watch_refreshes_the_table_with_device_and_alert(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first table is healthy; the refresh shows the disk alert that came since."""
    monkeypatch.setenv("COLUMNS", "300")  # every column whole in the captured output
    now_s = 1_800_000_000.0
    reads: list[int] = []

    def read() -> list[dict[str, Any]]:
        disk = 10**10 if not reads else 200 * 10**6
        reads.append(disk)
        return rows([_status_row(now_s, disk_free_bytes=disk)], {DEVICE: 2}, now_s=now_s,
                    limits=Fleet())

    waits: list[float] = []

    def stop(interval_s: float) -> bool:
        waits.append(interval_s)
        return len(waits) > 1  # one refresh, then stop

    watch(read, 0.5, stop)
    shown = capsys.readouterr().out
    assert len(reads) == 2 and waits == [0.5, 0.5]
    assert "1 devices" in shown and "1 with alerts" in shown
    assert DEVICE in shown and "disk free 200 MB" in shown


# --- numbers in the signed manifest, and search ------------------------------------------
@pytest.mark.parametrize("audit_numbers", ["clear", "commitment"])
def test_manifest_carries_numbers_and_search_finds_them(
        tmp_path: Path, pki: Pki, broker: Broker, audit_numbers: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    salt = os.urandom(16).hex()
    device = Device(tmp_path / "device", pki, broker)
    central = Central(tmp_path / "central", pki, broker, device.public_key).start()
    try:
        rid, _ = device.add_recording(
            50_000, caller_number=CALLER, dialed_number=DIALED, salt=salt,
            decision=json.dumps({"mode": "log_basis", "audit_numbers": audit_numbers}))
        device.start_agent()
        wait_until(lambda: device.outbox_state(rid) == "stored", what=f"{rid} stored")
        row = central.store.catalogue.get_recording(rid)
        assert row is not None
        load_public_key(device.public_key).verify(base64.b64decode(row.manifest_sig),
                                                  p.manifest_bytes(row.manifest))
        numbers = row.manifest["numbers"]
        if audit_numbers == "clear":
            assert numbers == {"audit_numbers": "clear", "caller": CALLER, "dialed": DIALED}
        else:
            assert numbers == {"audit_numbers": "commitment", "salt": salt,
                               "caller": commitment(salt, CALLER),
                               "dialed": commitment(salt, DIALED)}
            assert CALLER not in json.dumps(row.manifest)
        catalogue = central.store.catalogue
        assert [r.recording_id for r in search(catalogue, number=CALLER)] == [rid]
        assert [r.recording_id for r in search(catalogue, number=DIALED)] == [rid]
        assert search(catalogue, number="+498912345679") == []
    finally:
        device.close()
        central.stop()
        central.store.close()
    # `edge-recorder central search --number` finds it too
    capsys.readouterr()
    assert cli_main(["central", "search", "--catalogue",
                     f"sqlite://{central.store.directory / 'catalogue.db'}", "--number", CALLER,
                     "--json"]) == 0
    found = [json.loads(line)["recording_id"] for line in capsys.readouterr().out.splitlines()]
    assert found == [rid]
