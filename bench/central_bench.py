"""Benchmark of the central store (`bench/run.py --only central`).

Heartbeats: N simulated devices' heartbeat messages (as sync/status.py builds them)
handled by one worker's CentralStore, including the batched write of fleet status to
the SQLite catalogue, without the broker. Target: 10,000 devices at a 60 s heartbeat
= 167 messages/s on one worker.

Ingest scaling: 1, 2 and 4 ingest workers (each `python -m sync.central` in its own
process, sharing `$share/ingest/er/v1/+/up/#`, one SQLite catalogue and object folder)
against one local mosquitto (TLS, the repository's ACL plus the workers' blocks), while
INGEST_DEVICES devices (`edge-recorder sync`, each its own process) upload
INGEST_RECORDINGS recordings of INGEST_BYTES each at once. Every run has a fresh broker,
devices and store. The clock starts when every device's birth status is in the
catalogue (all connected, all workers subscribed), before the recordings (random bytes
made beforehand) are written and put in the outboxes (that is counted:
``ingest_setup_s`` says how long it took; the agents start on the first at once), and stops
when every device has committed "stored" for every recording. Figures: recordings/s,
MB/s (10^6 bytes of recording data), and the scaling ratio 4-worker / 1-worker.
Each worker count runs INGEST_ROUNDS rounds on the same processes; the median round is
reported, with the CPU seconds the workers and the agents used in it. Workers, agents
and broker share this machine's cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.sync_bench import _cpu_s
from firmware.keys import load_or_create_signing_key
from sync.broker import Broker
from sync.central import CentralStore
from sync.central.catalogue import open_catalogue
from sync.pki import Pki, make_pki
from sync.status import Health, Identity, heartbeat_payload
from tests.sync.uploadkit import REPO, Device, shared_broker, wait_until

DEVICES = 10_000
HEARTBEAT_S = 60.0
TARGET_PER_S = DEVICES / HEARTBEAT_S  # 167/s: 10,000 devices at a 60 s heartbeat

INGEST_DEVICES = 8
INGEST_RECORDINGS = 5  # per device
INGEST_BYTES = 2_400_000  # 5 min of A-law at 8 kHz is 2.4 MB
WORKER_COUNTS = (1, 2, 4)
WORKER_NAMES = tuple(f"ingest-{n}" for n in range(1, max(WORKER_COUNTS) + 1))
INGEST_WAIT_S = 600.0
INGEST_ROUNDS = 3  # per worker count, on the same processes; the median is reported


def _payloads(count: int) -> list[tuple[str, bytes]]:
    health = Health(backlog_count=2, backlog_bytes=10_000, oldest_unsynced_age_s=30,
                    disk_free_bytes=10**10, cert_expiry_days=300, clock_synced=True,
                    lines=[], last_call_at=None, config_sha256="00" * 32, config_version=1,
                    policy_version=1, last_error=None)
    out = []
    for n in range(count):
        who = Identity(f"dev-{n:05d}", 1, "1.0")
        out.append((f"er/v1/dev-{n:05d}/up/status",
                    heartbeat_payload(who, health, now_s=time.time(), uptime_s=100)))
    return out


def bench_heartbeats(devices: int = DEVICES) -> dict[str, float]:
    """Messages/s one worker handles, two rounds of every device, flushes included."""
    messages = _payloads(devices)
    with tempfile.TemporaryDirectory(prefix="edge-bench-central-") as tmp:
        root = Path(tmp)
        (root / "devices").mkdir()
        store = CentralStore(root / "store", root / "devices", Ed25519PrivateKey.generate())
        try:
            start = time.monotonic()
            for _ in range(2):
                for topic, payload in messages:
                    store.handle(topic, payload)
                store.flush_statuses()
            elapsed_s = time.monotonic() - start
        finally:
            store.close()
    per_s = 2 * devices / elapsed_s
    return {"heartbeat_devices": devices, "heartbeats_per_s": round(per_s),
            "heartbeat_target_per_s": round(TARGET_PER_S),
            "heartbeat_headroom": round(per_s / TARGET_PER_S, 1)}


class IngestRun:
    """One broker, ``workers`` ingest processes and INGEST_DEVICES agent processes."""

    def __init__(self, work: Path, pki: Pki, workers: int) -> None:
        self.work, self.pki = work, pki
        self.broker: Broker = shared_broker(pki, work, WORKER_NAMES)
        self.devices_dir = work / "central" / "devices"
        self.devices_dir.mkdir(parents=True)
        self.url = f"sqlite://{work / 'central' / 'catalogue.db'}"
        self.devices = [self._device(n) for n in range(INGEST_DEVICES)]
        # made once here: workers starting together would each create it (a race of
        # firmware/keys.py's create-if-absent)
        load_or_create_signing_key(work / "central" / "central_ed25519.pem")
        self.workers = [self._worker(name) for name in WORKER_NAMES[:workers]]
        for device in self.devices:
            device.start_process(work / f"{device.device_id}.log")

    def _device(self, index: int) -> Device:
        name = f"dev-{index:02d}"
        device = Device(self.work / name, self.pki, self.broker, device_id=name)
        shutil.copy(device.public_key, self.devices_dir / f"{name}.pub")
        return device

    def _worker(self, name: str) -> subprocess.Popen[bytes]:
        cred = self.pki.clients[name]
        argv = [sys.executable, "-m", "sync.central", "--dir", str(self.work / "central"),
                "--host", self.broker.host, "--port", str(self.broker.port),
                "--ca", str(self.pki.ca_cert), "--cert", str(cred.cert), "--key",
                str(cred.key), "--devices", str(self.devices_dir), "--signing-key",
                str(self.work / "central" / "central_ed25519.pem"), "--catalogue", self.url,
                "--worker-id", name, "--share-group", "ingest"]
        with (self.work / f"{name}.log").open("ab") as log_file:
            return subprocess.Popen(argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Every worker subscribed and every device's status in the catalogue."""
        for index, worker in enumerate(self.workers):
            log_path = self.work / f"{WORKER_NAMES[index]}.log"
            wait_until(lambda p=log_path, w=worker: "connected" in p.read_text()
                       or w.poll() is not None, 60.0, f"{log_path.name}: worker connected")
            if worker.poll() is not None:
                raise RuntimeError(f"{log_path.name}: worker exited: "
                                   f"{log_path.read_text()[-2000:]}")
        catalogue = open_catalogue(self.url)
        try:
            wait_until(lambda: len(catalogue.statuses()) == INGEST_DEVICES, 60.0,
                       "every device's status in the catalogue")
        finally:
            catalogue.close()

    def upload(self) -> tuple[float, float, float, float]:
        """(setup s, total s, workers' CPU s, agents' CPU s) of putting every recording
        in the outboxes and waiting for "stored" on every device."""
        data = [os.urandom(INGEST_BYTES) for _ in range(INGEST_RECORDINGS)]
        before = self.cpu_s()
        start = time.monotonic()
        made = [(device, device.add_recording(INGEST_BYTES, data=data[n][1:] + bytes([index]))[0])
                for n in range(INGEST_RECORDINGS) for index, device in enumerate(self.devices)]
        setup_s = time.monotonic() - start
        for device, rid in made:
            wait_until(lambda d=device, r=rid: d.outbox_state(r) == "stored",
                       INGEST_WAIT_S, f"{device.device_id} {rid} stored")
        total_s = time.monotonic() - start
        after = self.cpu_s()
        return setup_s, total_s, after[0] - before[0], after[1] - before[1]

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds so far of (the workers, the agents)."""
        agents = [d.process.pid for d in self.devices if d.process is not None]
        return (sum(_cpu_s(w.pid) for w in self.workers), sum(_cpu_s(pid) for pid in agents))

    def stored_per_worker(self) -> list[int]:
        return [len(re.findall(r"recording \S+ stored",
                               (self.work / f"{WORKER_NAMES[i]}.log").read_text()))
                for i in range(len(self.workers))]

    def close(self) -> None:
        for device in self.devices:
            device.close()
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.broker.stop()


def _ingest_run(work: Path, pki: Pki, workers: int) -> dict[str, object]:
    """The median of INGEST_ROUNDS rounds (by total time) on one set of processes."""
    run = IngestRun(work, pki, workers)
    try:
        run.wait_ready()
        rounds = sorted((run.upload() for _ in range(INGEST_ROUNDS)), key=lambda r: r[1])
        spread = run.stored_per_worker()
    finally:
        run.close()
    setup_s, total_s, workers_cpu_s, agents_cpu_s = rounds[len(rounds) // 2]
    count = INGEST_DEVICES * INGEST_RECORDINGS
    return {"recordings_per_s": round(count / total_s, 2),
            "mb_per_s": round(count * INGEST_BYTES / total_s / 1e6, 1),
            "total_s": round(total_s, 2), "rounds_total_s": [round(r[1], 2) for r in rounds],
            "ingest_setup_s": round(setup_s, 2),
            "workers_cpu_s": round(workers_cpu_s, 2), "agents_cpu_s": round(agents_cpu_s, 2),
            "stored_per_worker_all_rounds": spread}


def bench_ingest() -> dict[str, object]:
    """Ingest throughput with 1, 2 and 4 workers (module docstring)."""
    out: dict[str, object] = {"ingest_devices": INGEST_DEVICES,
                              "ingest_recordings": INGEST_DEVICES * INGEST_RECORDINGS,
                              "ingest_recording_bytes": INGEST_BYTES}
    with tempfile.TemporaryDirectory(prefix="edge-bench-ingest-") as tmp:
        root = Path(tmp)
        names = [f"dev-{n:02d}" for n in range(INGEST_DEVICES)]
        pki = make_pki(root / "pki", [*names, *WORKER_NAMES])
        runs = {n: _ingest_run(root / f"workers-{n}", pki, n) for n in WORKER_COUNTS}
    for n, figures in runs.items():
        out[f"ingest_{n}_workers"] = figures
    one, four = runs[1]["mb_per_s"], runs[max(WORKER_COUNTS)]["mb_per_s"]
    out["ingest_scaling_4_vs_1"] = round(float(four) / float(one), 2)  # type: ignore[arg-type]
    return out


def bench_central() -> dict[str, object]:
    return {**bench_heartbeats(), **bench_ingest()}
