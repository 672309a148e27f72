"""The same protocol over every transport the tool opens by URL: socket:// (TCP), loop://,
and the `provision-agent` command itself on a pty."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import codec as c
from provisioning.agent import Agent, AgentPaths, DeviceIdentity
from provisioning.state import State
from provisioning.tool import Client, provision
from provisioning.transport import FdPort, Link, open_port

from .conftest import REPO, SECRET, SERIAL, Bench

pytestmark = pytest.mark.timeout(60)


class SocketPort:
    """The device end of a TCP connection as a port (the tool end is pyserial socket://)."""

    def __init__(self, sock: socket.socket, timeout_s: float = 0.05) -> None:
        self.sock, self.timeout_s = sock, timeout_s

    def read(self, size: int = 1) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], self.timeout_s)
        return self.sock.recv(max(size, 4096)) if ready else b""

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_url(bench: Bench) -> Iterator[str]:
    """socket:// URL of a second agent (same device files as the pty bench) over TCP."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    agent = Agent(bench.paths, DeviceIdentity(SERIAL, SECRET),
                  required_tests=frozenset({"clock", "disk"}))

    def serve() -> None:
        conn, _ = server.accept()
        agent.serve(SocketPort(conn), stop, "tcp")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"socket://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


def test_full_flow_over_socket_url(bench: Bench, socket_url: str) -> None:
    port = open_port(socket_url)
    try:
        outcome = provision(Client(port, timeout_s=0.5), bench.plan)
    finally:
        port.close()
    assert outcome.state == State.LOCKED.value


def test_frames_through_loop_url(bench: Bench) -> None:
    """loop:// is one queue of 4096 bytes read back by the writer: the device answers in
    the same thread, one frame at a time (a max-size frame is far below the queue)."""
    link = Link(open_port("loop://"), "loop")
    try:
        requests = [c.Frame(type=c.MsgType.HELLO, request_id=7,
                            payload=c.pack(c.HelloReq(max_frame=c.DEFAULT_MAX_FRAME))),
                    c.Frame(type=c.MsgType.IDENTIFY, request_id=8, payload=c.pack(c.Empty()))]
        replies = []
        for request in requests:
            link.send(request)
            received = link.receive(1.0)
            assert received == request
            reply = bench.agent.handle(received)
            assert reply is not None
            link.send(reply)
            replies.append(link.receive(1.0))
    finally:
        link.port.close()
    hello = c.unpack(replies[0].payload, c.HelloRep)
    assert hello.serial == SERIAL and hello.max_frame == c.DEFAULT_MAX_FRAME
    assert c.encoded_limit(hello.max_frame) < 4096
    assert c.unpack(replies[1].payload, c.IdentifyRep).state == State.UNPROVISIONED.value


def test_provision_agent_command_on_a_pty(bench: Bench, tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    secret = tmp_path / "label-secret"
    secret.write_bytes(SECRET)
    paths = AgentPaths(data_dir=tmp_path / "dev", config_path=tmp_path / "dev-etc" / "c.toml")
    agent = subprocess.Popen(
        [sys.executable, "-m", "firmware.cli", "provision-agent", "--port", os.ttyname(slave),
         "--config", str(paths.config_path), "--data-dir", str(paths.data_dir),
         "--secret-file", str(secret), "--serial", SERIAL],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = FdPort(master)
    try:
        outcome = provision(Client(port, timeout_s=1.0, retries=10), bench.plan)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=10)
        port.close()
        os.close(slave)
    assert agent.returncode == 0, stderr
    # the command requires every self-test; the plan ran clock and disk only
    assert outcome.state == State.CERT_INSTALLED.value
    assert outcome.steps == ["configure", "keys", "install", "selftest"]
    assert paths.config_path.exists() and paths.tls_key.stat().st_mode & 0o777 == 0o600
