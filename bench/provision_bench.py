"""Benchmark of field provisioning (`bench/run.py --only provision`). Target < 20 s.

A blank box provisioned end to end over a pty pair whose termios speed is 115200 baud;
a pty does not pace itself, so both ends write through :class:`PacedPort` at 115200 baud
8N1 (11520 bytes/s) and the figure reflects the link. Included: HELLO, SPAKE2, settings
upload, key generation on the device and the CSR read back, local-CA signing, certificate
and chain upload, all four self-tests (line on the simulated line, MQTT with the new
certificate against a real mosquitto, clock, disk) and the lock.
"""

from __future__ import annotations

import os
import termios
import threading
import time
import tty
from pathlib import Path

from provisioning.agent import Agent, AgentPaths, DeviceIdentity
from provisioning.cliargs import DEFAULT_BAUD
from provisioning.tool import Client, InstallPlan, PkiPlan, Plan, Reporter, provision
from provisioning.transport import FdPort, PacedPort, open_port
from sync.broker import start_local
from sync.pki import make_pki
from tests.provisioning.conftest import SECRET, SERIAL, SpyPort
from tests.provisioning.test_selftests import short_line_settings

TARGET_S = 20.0


class TimingReporter(Reporter):
    """Seconds from the previous step to each step's report."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.steps: dict[str, float] = {}

    def step(self, name: str, detail: str) -> None:
        now = time.monotonic()
        self.steps[name] = round(now - self.last, 3)
        self.last = now


def _pty_at_baud(baud: int) -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    speed = getattr(termios, f"B{baud}")
    attrs[4], attrs[5] = speed, speed  # ispeed, ospeed
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def _serve(agent: Agent, port: PacedPort, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=agent.serve, args=(port, stop, "pty"), daemon=True)
    thread.start()
    return thread


def bench_provision(work: Path) -> dict[str, object]:
    pki = make_pki(work / "pki", ["er-test-0001"])
    broker = start_local(pki, work / "broker")
    master, slave = _pty_at_baud(DEFAULT_BAUD)
    stop = threading.Event()
    paths = AgentPaths(data_dir=work / "data", config_path=work / "etc" / "config.toml")
    agent = Agent(paths, DeviceIdentity(SERIAL, SECRET))
    thread = _serve(agent, PacedPort(FdPort(master), DEFAULT_BAUD), stop)
    plan = Plan(secret=SECRET.decode(), settings_file=str(short_line_settings(work)),
                selftests=["line", "mqtt", "clock", "disk"], lock=True,
                pki=PkiPlan(ca_cert=str(pki.ca_cert), ca_key=str(pki.ca_key)),
                install=InstallPlan(broker_host="127.0.0.1", broker_port=broker.port,
                                    ops_public_key=pki.ops_signing_pub_b64))
    spy = SpyPort(PacedPort(open_port(os.ttyname(slave), DEFAULT_BAUD), DEFAULT_BAUD))
    reporter = TimingReporter()
    try:
        start = time.monotonic()
        outcome = provision(Client(spy, name="pty"), plan, reporter)
        total_s = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5)
        spy.close()
        os.close(slave)
        broker.stop()
    wire_bytes = len(spy.sent) + len(spy.received)
    return {"total_s": round(total_s, 2), "target_s": TARGET_S, "state": outcome.state,
            "baud": DEFAULT_BAUD, "wire_bytes": wire_bytes,
            "wire_time_s": round(wire_bytes * 10 / DEFAULT_BAUD, 2), "steps_s": reporter.steps}
