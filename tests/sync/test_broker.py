"""The broker configuration (rendered text) and the runner (start, stop, kill, restart)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sync.broker import (
    ACL_PATH,
    Broker,
    BrokerConfig,
    BrokerError,
    PortTakenError,
    load_template,
    local_config,
    render_config,
)
from sync.pki import Pki
from tests.sync.conftest import Clients, TestClient

PROD = BrokerConfig(port=8883, data_dir=Path("/var/lib/mosquitto"),
                    cafile=Path("/etc/mosquitto/ca.crt"),
                    certfile=Path("/etc/mosquitto/broker.crt"),
                    keyfile=Path("/etc/mosquitto/broker.key"), bind_address=None)


def options(text: str) -> dict[str, list[str]]:
    """mosquitto.conf option -> values, in order (comment lines and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value)
    return found


def test_rendered_config_enforces_mutual_tls_and_identity() -> None:
    conf = options(render_config(load_template(), PROD))
    assert conf["listener"] == ["8883"]  # all interfaces
    for key, value in [("require_certificate", "true"), ("use_identity_as_username", "true"),
                       ("use_username_as_clientid", "true"), ("allow_anonymous", "false"),
                       ("tls_version", "tlsv1.2"), ("persistence", "true"),
                       ("cafile", "/etc/mosquitto/ca.crt"),
                       ("keyfile", "/etc/mosquitto/broker.key"),
                       ("persistence_location", "/var/lib/mosquitto"),
                       ("max_packet_size", "262144"), ("user", "mosquitto")]:
        assert conf[key] == [value], key
    assert conf["acl_file"] == [str(ACL_PATH)]


def test_every_placeholder_is_filled() -> None:
    assert "$" not in render_config(load_template(), PROD)


def test_loopback_listener_for_tests(pki: Pki, tmp_path: Path) -> None:
    conf = options(render_config(load_template(), local_config(pki, tmp_path, 18883)))
    assert conf["listener"] == ["18883 127.0.0.1"]


@pytest.mark.parametrize(("change", "needle"), [
    ({"cafile": Path("/ca.crt\nallow_anonymous true")}, "cafile"),
    ({"keyfile": Path("/my keys/broker.key")}, "keyfile"),
    ({"bind_address": "127.0.0.1\nlistener 1883"}, "bind_address"),
    ({"user": ""}, "user: empty"),
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"max_packet_size": 19}, "max_packet_size"),
    ({"autosave_interval_s": -1}, "autosave_interval_s"),
    ({"max_queued_messages": -1}, "max_queued_messages"),
])
def test_values_that_would_break_the_config_are_refused(change: dict[str, object],
                                                         needle: str) -> None:
    with pytest.raises(BrokerError, match=needle):
        render_config(load_template(), dataclasses.replace(PROD, **change))  # type: ignore[arg-type]


def test_queue_limit_is_rendered() -> None:
    """mosquitto's own default (1000 per client) in production; larger when asked."""
    assert options(render_config(load_template(), PROD))["max_queued_messages"] == ["1000"]
    raised = dataclasses.replace(PROD, max_queued_messages=20_000)
    assert options(render_config(load_template(), raised))["max_queued_messages"] == ["20000"]


def test_unknown_placeholder_is_named() -> None:
    with pytest.raises(BrokerError, match="'mystery'"):
        render_config("listener ${listener}\nx ${mystery}\n", PROD)


def test_acl_grants_devices_only_their_own_topics() -> None:
    acl = options(ACL_PATH.read_text())
    assert acl["pattern"] == ["write er/v1/%u/up/#", "write er/v1/%u/to/#",
                              "read er/v1/%u/down/#"]
    assert acl["user"] == ["central", "ops"]
    assert "readwrite" not in " ".join(acl["topic"])


# --- the runner --------------------------------------------------------------------------------
def test_restart_keeps_retained_messages(broker: Broker, pki: Pki,
                                         mqtt_clients: Clients) -> None:
    central = mqtt_clients.connect("central")
    assert not central.publish("er/v1/dev-a/down/config", b"kept", retain=True).is_failure
    central.close()
    broker.restart()
    device = mqtt_clients.connect("dev-a")
    device.subscribe("er/v1/dev-a/down/#")
    assert device.receive_until(b"kept") == [("er/v1/dev-a/down/config", b"kept")]
    assert broker.log_text().count("mosquitto version") >= 4  # two runs, one log


def test_kill_loses_what_was_not_saved(broker: Broker, mqtt_clients: Clients) -> None:
    """SIGKILL before the autosave: the broker is no store, the protocol must not treat
    it as one."""
    central = mqtt_clients.connect("central")
    assert not central.publish("er/v1/dev-a/down/config", b"lost", retain=True).is_failure
    central.close()
    broker.kill()
    broker.start()
    device = mqtt_clients.connect("dev-a")
    device.subscribe("er/v1/dev-a/down/#")  # a retained message would come now
    central = mqtt_clients.connect("central")
    central.publish("er/v1/dev-a/down/cmd/x", b"control")
    assert device.receive_until(b"control") == [("er/v1/dev-a/down/cmd/x", b"control")]


def _resumed(clients: Clients, name: str) -> TestClient:
    """A client that keeps its session for 5 minutes after it disconnects."""
    made = clients.client(clients.pki.clients[name], name)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    made.client.connect(clients.broker.host, clients.broker.port, keepalive=60,
                        clean_start=False, properties=properties)
    made._threaded = True  # as TestClient.start(threaded=True), which sends no properties
    made.client.loop_start()
    assert made.wait_connack() == 0
    return made


def test_offline_session_queue_holds_max_queued_messages(broker: Broker,
                                                         mqtt_clients: Clients) -> None:
    """The rendered limit is the one mosquitto applies: an offline session keeps that many
    QoS 1 messages, the first ones, and the log says the rest were dropped."""
    broker.stop()
    broker.config = dataclasses.replace(broker.config, max_queued_messages=5)
    broker.start()
    central = _resumed(mqtt_clients, "central")
    assert central.subscribe("er/v1/+/up/#") == [1]
    central.close()
    device = mqtt_clients.connect("dev-a")
    sent = [f"m{n}".encode() for n in range(8)]
    for payload in sent:
        assert device.publish("er/v1/dev-a/up/x", payload) == 0
    central = _resumed(mqtt_clients, "central")
    device.publish("er/v1/dev-a/up/x", b"control")
    assert [payload for _, payload in central.receive_until(b"control")] == \
        [*sent[:5], b"control"]
    assert "Outgoing messages are being dropped for client central" in broker.log_text()


def test_start_failure_names_the_cause(pki: Pki, tmp_path: Path) -> None:
    config = dataclasses.replace(local_config(pki, tmp_path, 18884),
                                 keyfile=tmp_path / "missing.key")
    with pytest.raises(BrokerError, match="Unable to load server key file"):
        Broker(tmp_path, config).start()


def test_a_taken_port_is_reported(broker: Broker, pki: Pki, tmp_path: Path) -> None:
    """A second broker on the port must fail, not take the first one's handshake as its own."""
    second = Broker(tmp_path / "second", local_config(pki, tmp_path / "second", broker.port))
    with pytest.raises(PortTakenError, match="Address already in use"):
        second.start()
    assert not second.running and broker.running


def test_runner_needs_the_log_on_stderr(pki: Pki, tmp_path: Path) -> None:
    config = dataclasses.replace(local_config(pki, tmp_path, 18885), log_dest="syslog")
    with pytest.raises(BrokerError, match="log_dest"):
        Broker(tmp_path, config)
