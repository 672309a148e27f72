"""The real daemon killed mid-call: SIGKILL at random points, SIGTERM, and tampering.

After SIGKILL and a restart the interrupted recording is recovered with all but at most
2 s (the flush interval) of the audio the daemon had received, the catalogue is
consistent, and the audit chain and file hashes verify.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario
from firmware.agecrypt import Identity
from firmware.catalogue import Catalogue
from firmware.codec import alaw_decode, alaw_encode
from firmware.recfile import decrypt_recording

REPO = Path(__file__).resolve().parents[2]
SPEED = 4.0
FLUSH_S = 2.0
LONG_CALL = """country = "DE"
seed = 5
tail_s = 1.0
[[calls]]
gap_s = 0.5
direction = "inbound"
caller = "022112345"
rings = 1
talk_s = 120.0
"""
EMPTY = 'country = "DE"\ntail_s = 0.2\ncalls = []\n'


def config_for(tmp: Path, scenario: Path, recipient: str) -> Path:
    path = tmp / f"{scenario.stem}.config.toml"
    path.write_text(
        f'device_id = "crash-1"\nsite = "t"\njurisdiction = "DE"\n'
        f'[storage]\ndata_dir = "{tmp / "data"}"\n[keys]\nrecipients = ["{recipient}"]\n'
        f'[limits]\nflush_interval_s = {FLUSH_S}\n'
        f'[policy.overrides.inbound]\nmode = "log_basis"\n'  # keep the whole call
        f'[[lines]]\nid = "line1"\nbackend = "sim"\n[lines.options]\n'
        f'scenario = "{scenario}"\nspeed = {SPEED}\n')
    return path


def start_daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "firmware.cli", "run", "--config",
                             str(config), "--until-lines-end"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_recording(db: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> float:
    """Poll the catalogue until a recording is open; return the monotonic time seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        if db.exists():
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                row = con.execute("SELECT 1 FROM recordings WHERE state='recording'").fetchone()
                con.close()
                if row:
                    return time.monotonic()
            except sqlite3.OperationalError:
                pass
        time.sleep(0.01)
    raise AssertionError("no recording started")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Identity]:
    central = Identity.generate()
    long_call = tmp_path / "long.toml"
    long_call.write_text(LONG_CALL)
    empty = tmp_path / "empty.toml"
    empty.write_text(EMPTY)
    return (config_for(tmp_path, long_call, str(central.recipient)),
            config_for(tmp_path, empty, str(central.recipient)), central)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_call_then_restart_recovers(setup: tuple[Path, Path, Identity],
                                                tmp_path: Path, seed: int) -> None:
    busy, idle, central = setup
    db = tmp_path / "data" / "catalogue.db"
    proc = start_daemon(busy)
    seen = wait_for_recording(db, proc)
    time.sleep(random.Random(seed).uniform(0.5, 4.0))
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # line time the daemon had certainly received since the call started
    received_s = (killed - seen) * SPEED

    restart = cli("run", "--config", str(idle), "--until-lines-end")
    assert restart.returncode == 0, restart.stderr

    cat = Catalogue.read_only(db)
    (row,) = cat.recordings()
    assert row["state"] == "interrupted" and row["size"] > 0
    assert cat.get_call(row["call_id"])["end_reason"] == "interrupted"
    assert not list((tmp_path / "data" / "recordings").glob("*.part"))
    rec = decrypt_recording(Path(row["path"]), [central])
    assert not rec.complete and rec.error is None
    assert len(rec.pcm) / 8000 >= received_s - FLUSH_S, (len(rec.pcm) / 8000, received_s)
    # and what was kept is exactly the line's audio
    line_pcm, _, _ = render(load_scenario(tmp_path / "long.toml"))
    start = rec.start_sample
    assert np.array_equal(rec.pcm, alaw_decode(alaw_encode(line_pcm[start:start + len(rec.pcm)])))
    kinds = [e.kind for e in cat.audit_entries()]
    assert "recording.recovered" in kinds and kinds.count("device.started") == 2
    verify = cli("audit", "verify", "--config", str(idle), "--recordings")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigterm_closes_the_recording_cleanly(setup: tuple[Path, Path, Identity],
                                              tmp_path: Path) -> None:
    busy, _idle, central = setup
    proc = start_daemon(busy)
    wait_for_recording(tmp_path / "data" / "catalogue.db", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    cat = Catalogue.read_only(tmp_path / "data" / "catalogue.db")
    (row,) = cat.recordings()
    assert row["state"] == "complete" and row["end_reason"] == "shutdown"
    rec = decrypt_recording(Path(row["path"]), [central])
    assert rec.complete and rec.end_reason == "shutdown"
    assert [e.kind for e in cat.audit_entries()][-2:] == ["device.stopped", "checkpoint"]
    verify = cli("audit", "verify", "--config", str(busy), "--recordings")
    assert verify.returncode == 0, verify.stdout


def test_tampering_is_detected(setup: tuple[Path, Path, Identity], tmp_path: Path) -> None:
    busy, _idle, central = setup
    proc = start_daemon(busy)
    wait_for_recording(tmp_path / "data" / "catalogue.db", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    (row,) = Catalogue.read_only(tmp_path / "data" / "catalogue.db").recordings()
    path = Path(row["path"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    verify = cli("audit", "verify", "--config", str(busy), "--recordings")
    assert verify.returncode == 1 and row["id"] in verify.stdout
    decrypt = cli("decrypt", "--identity", str(write_identity(tmp_path, central)), str(path),
                  "-o", str(tmp_path / "x.wav"), "--strict")
    assert decrypt.returncode != 0
    # one audit row changed behind the triggers' back
    con = sqlite3.connect(tmp_path / "data" / "catalogue.db")
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger' "
                               "AND tbl_name='audit'").fetchall():
        con.execute(f"DROP TRIGGER {name}")
    (seq,) = con.execute("SELECT seq FROM audit WHERE kind = 'call.started'").fetchone()
    con.execute("UPDATE audit SET data = replace(data, 'inbound', 'outbound') WHERE seq = ?",
                (seq,))
    con.commit()
    con.close()
    verify = cli("audit", "verify", "--config", str(busy))
    assert verify.returncode == 1 and f"entry {seq}:" in verify.stdout, verify.stdout


def write_identity(tmp: Path, identity: Identity) -> Path:
    path = tmp / "central.key"
    path.write_text(f"{identity}\n")
    return path
