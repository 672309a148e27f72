"""Benchmark of the central store (`bench/run.py --only central`).

Heartbeats: N simulated devices' heartbeat messages (as sync/status.py builds them)
handled by one worker's CentralStore, including the batched write of fleet status to
the SQLite catalogue, without the broker. Target: 10,000 devices at a 60 s heartbeat
= 167 messages/s on one worker.

Not measured yet: ingest throughput with 1, 2 and 4 workers against one broker.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync.central import CentralStore
from sync.status import Health, Identity, heartbeat_payload

DEVICES = 10_000
HEARTBEAT_S = 60.0
TARGET_PER_S = DEVICES / HEARTBEAT_S  # 167/s: 10,000 devices at a 60 s heartbeat


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


def bench_central() -> dict[str, float]:
    return bench_heartbeats()
