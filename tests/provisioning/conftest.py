"""A device agent on one end of a pty pair, in a thread; the engineer's tool on the other."""

from __future__ import annotations

import os
import queue
import random
import threading
import time
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
    """Drops, flips, splits, duplicates and delays what the tool writes (seeded).

    Bytes reach the device through one carrier thread in write order, as on a wire: a
    delayed write holds back every write after it, and ``write`` returns at once, so a
    delay longer than the tool's request timeout makes it retry while the first copy is
    still on its way.
    """

    MAX_DELAY_S = 0.8  # above the flow tests' 0.5 s request timeout, so some delays cause a retry

    KINDS = frozenset({"drop", "delay", "flip", "garbage", "split", "duplicate"})

    def __init__(self, inner, seed: int, rate: float = 0.08,
                 kinds: frozenset[str] = KINDS) -> None:
        super().__init__(inner)
        self.rng = random.Random(seed)
        self.rate = rate
        self.kinds = kinds
        self.faults: list[str] = []
        self.delays_s: list[float] = []
        self._wire: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        self._carrier = threading.Thread(target=self._carry, daemon=True)
        self._carrier.start()

    def write(self, data: bytes) -> int:
        if self._hit("drop"):
            return len(data)
        delay_s = 0.0
        if self._hit("delay"):
            delay_s = self.rng.uniform(0.0, self.MAX_DELAY_S)
            self.delays_s.append(delay_s)
        if self._hit("flip"):
            buf = bytearray(data)
            buf[self.rng.randrange(len(buf))] ^= 1 << self.rng.randrange(8)
            data = bytes(buf)
        if self._hit("garbage"):
            self._put(bytes(self.rng.randrange(1, 256) for _ in range(7)), delay_s)
        if self._hit("split"):
            cut = self.rng.randrange(len(data))
            self._put(data[:cut], delay_s)
            data, delay_s = data[cut:], delay_s + 0.01
        self._put(data, delay_s)
        if self._hit("duplicate"):
            self._put(data, delay_s)
        self.sent += data
        return len(data)

    def _hit(self, kind: str) -> bool:
        """One roll for ``kind``; a disabled kind is rolled too but never hits."""
        hit = self.rng.random() < self.rate and kind in self.kinds
        if hit:
            self.faults.append(kind)
        return hit

    def _put(self, data: bytes, delay_s: float) -> None:
        self._wire.put((time.monotonic() + delay_s, data))

    def _carry(self) -> None:
        while (item := self._wire.get()) is not None:
            due_s, data = item
            time.sleep(max(0.0, due_s - time.monotonic()))
            self.inner.write(data)

    def close(self) -> None:
        self._wire.put(None)
        self._carrier.join(10.0)  # every queued write delivered
        super().close()


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


def write_settings(tmp: Path, scenario: Path = REPO / "examples" / "dealer-day.toml",
                   name: str = "site.toml") -> Path:
    """Site settings for one simulated line playing ``scenario``."""
    recipient = Identity.generate().recipient
    path = tmp / name
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
