"""`edge-recorder demo` end to end: a real mosquitto, the central store, the recorder and the
sync agent; every recording confirmed with the same sha256 on both sides, and nothing left
running afterwards, also when the tour is interrupted."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from firmware.catalogue import Catalogue

REPO = Path(__file__).resolve().parents[2]
DEVICE = "demo-0001"  # firmware/demo.py
DEMO_TIMEOUT_S = 120
WAIT_S = 60.0


def demo_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "firmware.cli", "demo", "--out", str(out)]


def processes_naming(path: Path) -> list[str]:
    """Command lines of running processes that mention ``path`` (mosquitto's config, a
    central or agent process): what the demo started and left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if str(path) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def central_copy(out: Path, rid: str) -> Path:
    copies = list((out / "sync" / "central").rglob(f"{rid}.rec"))
    assert len(copies) == 1, f"central copies of {rid}: {copies}"
    return copies[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_syncs_every_recording_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(demo_command(out), cwd=REPO, capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Traceback" not in done.stderr
    assert processes_naming(out) == []
    with Catalogue.read_only(out / "data" / "catalogue.db") as catalogue:
        rows = catalogue.recordings()
        assert rows, "the dealer's day recorded nothing"
        for row in rows:
            rid = str(row["id"])
            item = catalogue.outbox_item("recording", rid)
            assert item is not None and item["state"] == "stored", (rid, item)
            assert row["synced_at"], rid
            assert sha256(central_copy(out, rid)) == row["sha256"] == sha256(Path(row["path"]))
        assert catalogue.receipt_count() == catalogue.head().count
    assert "audit trail intact" in done.stdout
    assert f"ops sees {DEVICE} online" in done.stdout


def test_interrupted_demo_leaves_nothing_running(tmp_path: Path) -> None:
    """Ctrl-C while the day runs and the agent is connected: broker, central, agent and
    recorder all stop, and the exit says interrupted."""
    out = tmp_path / "demo"
    broker_log = out / "sync" / "broker" / "mosquitto.log"
    process = subprocess.Popen(demo_command(out), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (broker_log.is_file() and f" as {DEVICE} " in broker_log.read_text()):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the sync agent never connected"
            time.sleep(0.02)
        assert processes_naming(out), "mosquitto is not running while the demo runs"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert processes_naming(out) == []
