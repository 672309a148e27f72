"""A device agent on one end of a pty pair, in a thread; the engineer's tool on the other."""

from __future__ import annotations

import os
import random
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware.agecrypt import Identity
from provisioning.agent import Agent, AgentPaths, DeviceIdentity
from provisioning.selftest import SELFTESTS
from provisioning.tool import InstallPlan, PkiPlan, Plan
from provisioning.transport import FdPort, Link, open_port
from sync.pki import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
SECRET = b"K7QX-2MFD-9PLT"
SERIAL = "10000000c0ffee01"


class SpyPort:
    """Records what passes through a port; can be cut (a pulled cable) after N writes."""

    def __init__(self, inner, cut_after_writes: int | None = None) -> None:
        self.inner = inner
        self.sent = bytearray()
        self.received = bytearray()
        self.cut_after_writes = cut_after_writes
        self.writes = 0

    @property
    def in_waiting(self) -> int:
        return int(getattr(self.inner, "in_waiting", 0))

    def read(self, size: int = 1) -> bytes:
        data = self.inner.read(size)
        self.received += data
        return data

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.cut_after_writes is not None and self.writes > self.cut_after_writes:
            raise OSError(5, "cable pulled")
        self.sent += data
        return self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


class FaultyPort(SpyPort):
    """Drops, flips, splits, duplicates and delays what the tool writes (seeded)."""

    def __init__(self, inner, seed: int, rate: float = 0.08) -> None:
        super().__init__(inner)
        self.rng = random.Random(seed)
        self.rate = rate
        self.faults: list[str] = []

    def write(self, data: bytes) -> int:
        roll = self.rng.random
        if roll() < self.rate:
            self.faults.append("drop")
            return len(data)
        if roll() < self.rate:
            self.faults.append("flip")
            buf = bytearray(data)
            buf[self.rng.randrange(len(buf))] ^= 1 << self.rng.randrange(8)
            data = bytes(buf)
        if roll() < self.rate:
            self.faults.append("garbage")
            self.inner.write(bytes(self.rng.randrange(1, 256) for _ in range(7)))
        if roll() < self.rate:
            self.faults.append("split")
            cut = self.rng.randrange(len(data))
            self.inner.write(data[:cut])
            threading.Event().wait(0.01)
            data = data[cut:]
        self.inner.write(data)
        if roll() < self.rate:
            self.faults.append("duplicate")
            self.inner.write(data)
        self.sent += data
        return len(data)


@dataclass
class Bench:
    tmp: Path
    paths: AgentPaths
    plan: Plan
    pki_dir: Path
    slave_path: str
    agent: Agent
    master_fd: int

    def tool_port(self, **kw) -> SpyPort:
        return SpyPort(open_port(self.slave_path), **kw)

    def restart_agent(self) -> Agent:
        """The agent process restarted (power cut): a new instance on the same files."""
        self.agent = Agent(self.paths, self.agent.identity,
                           required_tests=frozenset({"clock", "disk"}))
        return self.agent


def write_settings(tmp: Path) -> Path:
    recipient = Identity.generate().recipient
    scenario = REPO / "examples" / "dealer-day.toml"
    path = tmp / "site.toml"
    path.write_text(f'''device_id = "er-test-0001"
site = "Autohaus Test"
jurisdiction = "DE"

[keys]
recipients = ["{recipient}"]

[[lines]]
id = "line1"
backend = "sim"
[lines.options]
scenario = "{scenario}"
speed = 0.0
''')
    return path


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test CA (sync/pki.py): signs device CSRs and the broker's certificate."""
    return make_pki(tmp_path_factory.mktemp("pki") / "pki", ["er-test-0001"])


@pytest.fixture(scope="session")
def pki_dir(test_pki: Pki) -> Path:
    return test_pki.directory


@pytest.fixture
def bench(tmp_path: Path, pki_dir: Path) -> Iterator[Bench]:
    master, slave = os.openpty()
    tty.setraw(slave)
    slave_path = os.ttyname(slave)
    paths = AgentPaths(data_dir=tmp_path / "data", config_path=tmp_path / "etc" / "config.toml")
    agent = Agent(paths, DeviceIdentity(SERIAL, SECRET), selftests=SELFTESTS,
                  required_tests=frozenset({"clock", "disk"}))
    ops_pub = (pki_dir / "ops-signing.pub").read_text().strip()
    plan = Plan(secret=SECRET.decode(), settings_file=str(write_settings(tmp_path)),
                selftests=["clock", "disk"], lock=True, selftest_timeout_s=0.5,
                pki=PkiPlan(ca_cert=str(pki_dir / "ca.crt"), ca_key=str(pki_dir / "ca.key")),
                install=InstallPlan(broker_host="127.0.0.1", broker_port=1,
                                    ops_public_key=ops_pub))
    b = Bench(tmp_path, paths, plan, pki_dir, slave_path, agent, master)
    stop = threading.Event()
    port = FdPort(master)

    def serve() -> None:
        link = Link(port, "pty")
        while not stop.is_set():
            frame = link.receive(0.1)
            reply = b.agent.handle(frame) if frame is not None else None
            if reply is not None:
                link.send(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield b
    stop.set()
    thread.join(5)
    port.close()
    os.close(slave)
