"""Benchmark of the central store (`bench/run.py --only central`).

Heartbeats: N simulated devices' heartbeat messages (as sync/status.py builds them)
handled by one worker's CentralStore, including the batched write of fleet status to
the SQLite catalogue, without the broker. Target: 10,000 devices at a 60 s heartbeat
= 167 messages/s on one worker.

Ingest scaling: 1, 2 and 4 ingest workers (each `python -m sync.central` in its own
process, sharing `$share/ingest/er/v1/+/up/#`, one SQLite catalogue and object folder)
against one local mosquitto (TLS, the repository's ACL plus the workers' blocks), measured
two ways. Every run has a fresh broker, devices and store; each worker count runs its
rounds on the same processes and the median round is reported. Figures: recordings/s,
MB/s (10^6 bytes of recording data), the scaling ratios, and the CPU seconds used.

Concurrent (end to end): INGEST_DEVICES devices (`edge-recorder sync`, each its own
process) upload INGEST_RECORDINGS recordings of INGEST_BYTES each at once. The clock
starts when every device's birth status is in the catalogue (all connected, all workers
subscribed), before the recordings (random bytes made beforehand) are written and put in
the outboxes (that is counted: ``ingest_setup_s`` says how long it took; the agents start
on the first at once), and stops when every device has committed "stored" for every
recording. Workers, agents and broker share this machine's cores: INGEST_ROUNDS rounds.

Drain (what the workers take): the same devices' traffic, DRAIN_RECORDINGS recordings
each, is put into the broker before the clock starts by the load generator of
bench/drain_load.py (one paho client per device, in this process): every init (the
agent's signed manifest) first, answered by the running workers, each answer naming the
worker that took the upload (docs/PROTOCOL.md, "Routing"; the inits' work is outside the
clock), then every chunk to that worker's routed topic, QoS 1, without waiting for
central. Meanwhile the workers are connected and subscribed but stopped (SIGSTOP): the
broker hands each its in-flight window (20 messages) and queues the rest in its session
(``max_queued_messages`` raised to DRAIN_MAX_QUEUED; the broker log must show no drop and
no keepalive timeout). Dirty pages are flushed (sync), then the clock starts as every
worker resumes (SIGCONT) and stops at the last "stored" ack. Each fin is sent as the agent
sends it, once the acks say central holds every byte (DRAIN_QUEUE_FINS puts them in the
backlog instead); whatever the acks leave open is sent again as the agent would (counted
in ``resent_*``). Stopped workers resume at one instant with nothing left to start up;
worker processes started together against persistent sessions connect up to 0.2 s apart,
and a late one leaves the inits it was handed unhandled while the others meet their
chunks (``no_init``). The rows and objects are then checked against what was sent.
Reported for the drain: the CPU seconds of the workers, the broker, this process, the
rest of the machine (other jobs, the kernel's own threads) and the idle CPU of all cores,
so a figure taken on a busy machine says so. DRAIN_ROUNDS rounds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.drain_load import LoadGenerator
from bench.sync_bench import CLK_TCK, _cpu_s
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
DRAIN_RECORDINGS = 10  # per device: 192 MB, a drain of more than 2 s
DRAIN_ROUNDS = 5  # per worker count, on the same processes; the median is reported
DRAIN_COUNT = INGEST_DEVICES * DRAIN_RECORDINGS
DRAIN_WAIT_S = 120.0
# Fins in the backlog behind every chunk (True), or each sent once the acks say central
# holds every byte of its recording, as the agent does (False; they join the queue's
# tail). With True a fin can reach one worker while another has the recording's chunks
# written but not yet synced: that worker's commit then fails (the part is gone), its
# whole batch is dropped, and other workers keep counting the dropped ranges as held.
DRAIN_QUEUE_FINS = False
# The drain's broker holds the whole backlog in the worker sessions' queues (mosquitto
# would drop past its default of 1000 per client): at most one init, fin and every chunk
# of every recording, with room for resends.
DRAIN_MAX_QUEUED = 20_000


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


class _Site:
    """One broker (the repository's ACL plus the workers' blocks), the central folder and
    SQLite catalogue, INGEST_DEVICES devices (catalogue, key, recordings) and ``workers``
    ingest processes in one share group."""

    def __init__(self, work: Path, pki: Pki, workers: int, *,
                 max_queued_messages: int | None = None) -> None:
        self.work, self.pki = work, pki
        self.broker: Broker = shared_broker(pki, work, WORKER_NAMES)
        if max_queued_messages is not None:  # the same broker, its queues raised
            self.broker.stop()
            self.broker.config = dataclasses.replace(self.broker.config,
                                                     max_queued_messages=max_queued_messages)
            self.broker.start()
        self.store_dir = work / "central"
        self.devices_dir = self.store_dir / "devices"
        self.devices_dir.mkdir(parents=True)
        self.url = f"sqlite://{self.store_dir / 'catalogue.db'}"
        self.devices = [self._device(n) for n in range(INGEST_DEVICES)]
        # made once here: workers starting together would each create it (a race of
        # firmware/keys.py's create-if-absent)
        load_or_create_signing_key(self.store_dir / "central_ed25519.pem")
        self.workers = [self._worker(name) for name in WORKER_NAMES[:workers]]

    def _device(self, index: int) -> Device:
        name = f"dev-{index:02d}"
        device = Device(self.work / name, self.pki, self.broker, device_id=name)
        shutil.copy(device.public_key, self.devices_dir / f"{name}.pub")
        return device

    def _worker(self, name: str) -> subprocess.Popen[bytes]:
        cred = self.pki.clients[name]
        argv = [sys.executable, "-m", "sync.central", "--dir", str(self.store_dir),
                "--host", self.broker.host, "--port", str(self.broker.port),
                "--ca", str(self.pki.ca_cert), "--cert", str(cred.cert), "--key",
                str(cred.key), "--devices", str(self.devices_dir), "--signing-key",
                str(self.store_dir / "central_ed25519.pem"), "--catalogue", self.url,
                "--worker-id", name, "--share-group", "ingest"]
        with (self.work / f"{name}.log").open("ab") as log_file:
            return subprocess.Popen(argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)

    def wait_workers(self) -> None:
        """Every worker connected (and so subscribed: it subscribes on connect)."""
        for index, worker in enumerate(self.workers):
            log_path = self.work / f"{WORKER_NAMES[index]}.log"
            wait_until(lambda p=log_path, w=worker: "connected" in p.read_text()
                       or w.poll() is not None, 60.0, f"{log_path.name}: worker connected")
            if worker.poll() is not None:
                raise RuntimeError(f"{log_path.name}: worker exited: "
                                   f"{log_path.read_text()[-2000:]}")

    def workers_cpu_s(self) -> float:
        return sum(_cpu_s(w.pid) for w in self.workers)

    def stored_per_worker(self) -> list[int]:
        return [len(re.findall(r"recording \S+ stored",
                               (self.work / f"{WORKER_NAMES[i]}.log").read_text()))
                for i in range(len(self.workers))]

    def close(self) -> None:
        for device in self.devices:
            device.close()
        for worker in self.workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)  # in case a drain stopped it
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.broker.stop()


class IngestRun(_Site):
    """The concurrent measurement: INGEST_DEVICES agent processes upload while the workers
    ingest, all on this machine's cores."""

    def __init__(self, work: Path, pki: Pki, workers: int) -> None:
        super().__init__(work, pki, workers)
        for device in self.devices:
            device.start_process(work / f"{device.device_id}.log")

    def wait_ready(self) -> None:
        """Every worker subscribed and every device's status in the catalogue."""
        self.wait_workers()
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
        return self.workers_cpu_s(), sum(_cpu_s(pid) for pid in agents)


@dataclass
class DrainRound:
    drain_s: float
    queue_s: float  # putting the backlog into the broker (before the clock)
    messages: int
    workers_cpu_s: float
    broker_cpu_s: float
    load_cpu_s: float  # this process (the load generator's acks) during the drain
    others_cpu_s: float  # the rest of the machine (other jobs, kernel threads)
    idle_cpu_s: float  # the machine's idle CPU during the drain
    resent_chunks: int
    resent_fins: int
    resent_inits: int


class DrainRun(_Site):
    """The drain: the backlog of INGEST_DEVICES simulated devices (bench/drain_load.py, in
    this process) is queued in the broker while the workers are stopped, then the workers
    run until every recording is stored."""

    def __init__(self, work: Path, pki: Pki, workers: int) -> None:
        super().__init__(work, pki, workers, max_queued_messages=DRAIN_MAX_QUEUED)
        self.load = LoadGenerator(self.devices, pki, self.broker.host, self.broker.port)

    def ready(self) -> None:
        self.wait_workers()
        self.load.connect()

    def drain(self) -> DrainRound:
        data = [os.urandom(INGEST_BYTES) for _ in range(DRAIN_RECORDINGS)]
        uploads = []
        for n in range(DRAIN_RECORDINGS):
            for index, device in enumerate(self.devices):
                body = data[n][1:] + bytes([index])
                rid, _ = device.add_recording(INGEST_BYTES, data=body)
                uploads.append(self.load.add(device, rid, body))
        log_start = len(self.broker.log_text())
        inits = self.load.begin(uploads, DRAIN_WAIT_S)  # each upload learns its worker
        for worker in self.workers:  # connected, subscribed, but handling nothing
            os.kill(worker.pid, signal.SIGSTOP)
        try:
            queue_start = time.monotonic()
            messages = inits + self.load.queue(uploads, fins=DRAIN_QUEUE_FINS)
            queue_s = time.monotonic() - queue_start
            self._check_broker(log_start)
            os.sync()  # the recordings just written are not flushed during the drain
        finally:
            before = (self.workers_cpu_s(), self.broker_cpu_s(), time.process_time(),
                      *_machine_cpu_s())
            start = time.monotonic()
            for worker in self.workers:
                os.kill(worker.pid, signal.SIGCONT)
        end = self.load.wait_stored(uploads, DRAIN_WAIT_S)
        after = (self.workers_cpu_s(), self.broker_cpu_s(), time.process_time(),
                 *_machine_cpu_s())
        self._check_broker(log_start)
        self.load.verify(uploads, self.url, self.store_dir)
        used = [a - b for a, b in zip(after, before, strict=True)]
        return DrainRound(end - start, queue_s, messages, *used[:3],
                          used[3] - sum(used[:3]), used[4],
                          sum(u.resent_chunks for u in uploads),
                          sum(u.resent_fins for u in uploads),
                          sum(u.resent_inits for u in uploads))

    def broker_cpu_s(self) -> float:
        """mosquitto's CPU seconds so far."""
        if self.broker.pid is None:
            raise RuntimeError(f"broker on port {self.broker.port}: not running")
        return _cpu_s(self.broker.pid)

    def _check_broker(self, log_start: int) -> None:
        """Nothing dropped from a queue, no stopped worker timed out."""
        text = self.broker.log_text()[log_start:]
        for needle in ("being dropped", "exceeded timeout"):
            if needle in text:
                line = next(x for x in text.splitlines() if needle in x)
                raise RuntimeError(f"broker: {line}")

    def close(self) -> None:
        self.load.close()
        super().close()


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all cores (proc(5), /proc/stat:
    user nice system idle iowait irq softirq steal)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / CLK_TCK, idle / CLK_TCK


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


def _drain_run(work: Path, pki: Pki, workers: int) -> dict[str, object]:
    """The median of DRAIN_ROUNDS drains (by drain time) on one set of processes."""
    run = DrainRun(work, pki, workers)
    try:
        run.ready()
        rounds = sorted((run.drain() for _ in range(DRAIN_ROUNDS)), key=lambda r: r.drain_s)
        spread = run.stored_per_worker()
    finally:
        run.close()
    median = rounds[len(rounds) // 2]
    # other jobs on a shared machine take CPU the workers would have used: the round they
    # disturbed least is reported beside the median
    quiet = min(rounds, key=lambda r: r.others_cpu_s)
    return {"recordings_per_s": round(DRAIN_COUNT / median.drain_s, 2),
            "mb_per_s": _mb_per_s(median.drain_s),
            "drain_s": round(median.drain_s, 2),
            "quietest_round": {"mb_per_s": _mb_per_s(quiet.drain_s),
                               "drain_s": round(quiet.drain_s, 2),
                               "others_cpu_s": round(quiet.others_cpu_s, 2),
                               "workers_cpu_s": round(quiet.workers_cpu_s, 2),
                               "idle_cpu_s": round(quiet.idle_cpu_s, 2)},
            "rounds_drain_s": [round(r.drain_s, 2) for r in rounds],
            "rounds_others_cpu_s": [round(r.others_cpu_s, 2) for r in rounds],
            "queue_s": round(median.queue_s, 2), "messages": median.messages,
            "workers_cpu_s": round(median.workers_cpu_s, 2),
            "broker_cpu_s": round(median.broker_cpu_s, 2),
            "load_cpu_s": round(median.load_cpu_s, 2),
            "others_cpu_s": round(median.others_cpu_s, 2),
            "idle_cpu_s": round(median.idle_cpu_s, 2),
            "resent_chunks_all_rounds": sum(r.resent_chunks for r in rounds),
            "resent_fins_all_rounds": sum(r.resent_fins for r in rounds),
            "resent_inits_all_rounds": sum(r.resent_inits for r in rounds),
            "stored_per_worker_all_rounds": spread}


def _mb_per_s(drain_s: float) -> float:
    return round(DRAIN_COUNT * INGEST_BYTES / drain_s / 1e6, 1)


def bench_ingest() -> dict[str, object]:
    """Ingest throughput with 1, 2 and 4 workers, concurrent and drain (module docstring)."""
    out: dict[str, object] = {"ingest_devices": INGEST_DEVICES,
                              "ingest_recordings": INGEST_DEVICES * INGEST_RECORDINGS,
                              "ingest_recording_bytes": INGEST_BYTES,
                              "drain_recordings": DRAIN_COUNT,
                              "load_average_1min_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="edge-bench-ingest-") as tmp:
        root = Path(tmp)
        names = [f"dev-{n:02d}" for n in range(INGEST_DEVICES)]
        pki = make_pki(root / "pki", [*names, *WORKER_NAMES])
        runs = {n: _ingest_run(root / f"workers-{n}", pki, n) for n in WORKER_COUNTS}
        drains = {n: _drain_run(root / f"drain-{n}", pki, n) for n in WORKER_COUNTS}
    for n, figures in runs.items():
        out[f"ingest_{n}_workers"] = figures
    out["ingest_scaling_4_vs_1"] = _ratio(runs, max(WORKER_COUNTS), 1)
    for n, figures in drains.items():
        out[f"drain_{n}_workers"] = figures
    for n in WORKER_COUNTS[1:]:
        out[f"drain_scaling_{n}_vs_1"] = _ratio(drains, n, 1)
        out[f"drain_scaling_{n}_vs_1_quietest"] = _ratio(
            {k: v["quietest_round"] for k, v in drains.items()}, n, 1)
    return out


def _ratio(runs: dict[int, Any], more: int, fewer: int) -> float:
    return round(float(runs[more]["mb_per_s"]) / float(runs[fewer]["mb_per_s"]), 2)


def bench_central() -> dict[str, object]:
    return {**bench_heartbeats(), **bench_ingest()}
