"""A test PKI and a real mosquitto (mutual TLS, the repository's ACL) for the sync tests.

``broker`` starts mosquitto on a free loopback port with its own config and data
directory under the test's tmp_path and stops it at teardown; when a test fails, the
broker's log is added to the report. ``mqtt_clients`` makes paho MQTT 5 clients (callback
API version 2) that connect with a certificate of the PKI and wait on their callbacks with
bounded waits; ``tls_alert`` looks at the TLS layer alone.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sync.broker import Broker, start_local
from sync.pki import Credential, Pki, make_pki

DEVICES = ("dev-a", "dev-b")
WAIT_S = 5.0  # bound on every wait for a broker answer; loopback answers take milliseconds


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), DEVICES, negatives=True)


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    running = start_local(pki, tmp_path / "broker")
    try:
        yield running
    finally:
        running.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used the broker shows the broker's log."""
    report = yield
    running = getattr(item, "funcargs", {}).get("broker")
    if report.failed and isinstance(running, Broker):
        report.sections.append((f"mosquitto log {running.log_path}", running.log_text()))
    return report


class TestClient:
    """A paho MQTT 5 client over TLS whose waits fail with a message instead of hanging."""

    __test__ = False  # not a test class

    def __init__(self, broker: Broker, ca: Path, credential: Credential | None,
                 client_id: str, *, username: str | None = None) -> None:
        self.broker = broker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca),
                            certfile=str(credential.cert) if credential else None,
                            keyfile=str(credential.key) if credential else None)
        if username is not None:
            self.client.username_pw_set(username, "ignored")
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.disconnected = threading.Event()
        self._answered = threading.Event()  # CONNACK or the end of the connection
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self._threaded = False
        self._set_callbacks()

    def _set_callbacks(self) -> None:
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self._ack(mid, reason)
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._ack(mid, reasons)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connack, self.connack_properties = reason, properties
        self._answered.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _reason: ReasonCode,
                       _p: Properties | None) -> None:
        self.disconnected.set()
        self._answered.set()

    def _ack(self, mid: int, value: Any) -> None:
        with self._acked:
            self._acks[mid] = value
            self._acked.notify_all()

    def start(self, *, threaded: bool = True) -> None:
        """Connect (the TLS handshake happens here). Threaded, paho's network thread runs
        (and reconnects after a loss); otherwise the waits run the loop in this thread."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=60)
        if threaded:
            self.client.loop_start()
        self._threaded = threaded

    def _wait(self, event: threading.Event) -> bool:
        if self._threaded:
            return event.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not event.is_set() and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        return event.is_set()

    def wait_connack(self) -> ReasonCode:
        """The CONNACK reason; fails if the connection ends without one."""
        self._wait(self._answered)
        if self.connack is None:
            pytest.fail(f"no CONNACK within {WAIT_S} s (disconnected: "
                        f"{self.disconnected.is_set()})")
        return self.connack

    def wait_refused(self) -> None:
        """The connection ends without a CONNACK."""
        self._wait(self._answered)
        assert self.connack is None, f"broker sent CONNACK {self.connack}"
        assert self.disconnected.is_set(), f"connection still open after {WAIT_S} s"

    def wait_disconnected(self) -> bool:
        return self._wait(self.disconnected)

    def subscribe(self, topic: str) -> list[ReasonCode]:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS, result
        return list(self._wait_ack(mid, f"SUBACK for {topic}"))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """PUBACK reason code of a QoS 1 publish."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, info.rc
        reason: ReasonCode = self._wait_ack(info.mid, f"PUBACK for {topic}")
        return reason

    def _wait_ack(self, mid: int, what: str) -> Any:
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, timeout=WAIT_S):
                pytest.fail(f"no {what} within {WAIT_S} s")
            return self._acks.pop(mid)

    def receive_until(self, control: bytes) -> list[tuple[str, bytes]]:
        """(topic, payload) of every message up to and including the one whose payload is
        ``control``. Messages reach a client in the order the broker handled them, so a
        message published before the control and delivered at all is in this list."""
        seen: list[tuple[str, bytes]] = []
        while not seen or seen[-1][1] != control:
            try:
                message = self.messages.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"control message {control!r} not received within {WAIT_S} s; "
                            f"got {seen}")
            seen.append((message.topic, message.payload))
        return seen

    def close(self) -> None:
        self.client.disconnect()
        if self._threaded:
            self.client.loop_stop()


class Clients:
    """Makes TestClients for one broker and closes them all at teardown."""

    def __init__(self, broker: Broker, pki: Pki) -> None:
        self.broker, self.pki = broker, pki
        self._made: list[TestClient] = []

    def client(self, credential: Credential | None, client_id: str, *,
               username: str | None = None) -> TestClient:
        made = TestClient(self.broker, self.pki.ca_cert, credential, client_id,
                          username=username)
        self._made.append(made)
        return made

    def connect(self, name: str, *, client_id: str | None = None, username: str | None = None,
                threaded: bool = True) -> TestClient:
        """A connected client with the certificate of ``name`` (device id, central, ops)."""
        made = self.client(self.pki.clients[name], client_id or name, username=username)
        made.start(threaded=threaded)
        reason = made.wait_connack()
        assert reason == 0, f"{name}: CONNACK {reason}"
        return made

    def close(self) -> None:
        for made in self._made:
            made.close()


@pytest.fixture
def mqtt_clients(broker: Broker, pki: Pki) -> Iterator[Clients]:
    clients = Clients(broker, pki)
    try:
        yield clients
    finally:
        clients.close()


# MQTT 3.1.1 CONNECT (OASIS 3.1): clean session, keepalive 60 s, empty client id; and the
# first byte of CONNACK.
MQTT_CONNECT = bytes.fromhex("100c00044d5154540402003c0000")
CONNACK = 0x20


def tls_alert(broker: Broker, ca: Path, credential: Credential | None,
              version: ssl.TLSVersion, *, send_connect: bool = False) -> str:
    """The TLS alert the broker refuses a client certificate with (OpenSSL's reason name),
    or "accepted". With TLS 1.3 the broker judges the certificate after the client's
    handshake is done, so the alert arrives on the first read: nothing is sent before it
    (data arriving after the broker closed makes the kernel reset the connection, and the
    reset discards the alert). ``send_connect`` sends an MQTT CONNECT, so an accepted
    certificate is seen at once, by its CONNACK."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    if credential is not None:
        context.load_cert_chain(credential.cert, credential.key)
    with socket.create_connection((broker.host, broker.port), timeout=WAIT_S) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                if send_connect:
                    tls.sendall(MQTT_CONNECT)
                first = tls.recv(1)
        except ssl.SSLError as exc:
            return str(exc.reason)
        except TimeoutError:
            return f"no answer within {WAIT_S} s"
    return "accepted" if first == bytes([CONNACK]) else f"closed, first byte {first!r}"
