"""Mutual TLS and per-device access on a real mosquitto with the repository's config and ACL.

A refused certificate is asserted by the TLS alert the broker sends; a refused publish
by its PUBACK reason (0x87 Not authorized); a message that must not arrive by its
absence ahead of a control message published after it, which does arrive.
"""

from __future__ import annotations

import ssl

import pytest

from sync.broker import Broker
from sync.pki import Pki
from tests.sync.conftest import WAIT_S, Clients, tls_alert

NOT_AUTHORIZED = 0x87  # MQTT 5 reason code (OASIS MQTT 5.0, 3.4.2.1)
TLS_VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
                pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")]


# --- mutual TLS ------------------------------------------------------------------------------
def test_device_round_trip_with_central(mqtt_clients: Clients) -> None:
    central = mqtt_clients.connect("central")
    device = mqtt_clients.connect("dev-a")
    assert central.subscribe("er/v1/+/up/#") == [1]
    assert device.subscribe("er/v1/dev-a/down/#") == [1]

    assert device.publish("er/v1/dev-a/up/status", b"online") == 0
    assert central.receive_until(b"online") == [("er/v1/dev-a/up/status", b"online")]
    assert central.publish("er/v1/dev-a/down/ack", b"stored") == 0
    assert device.receive_until(b"stored") == [("er/v1/dev-a/down/ack", b"stored")]


def test_broker_advertises_its_maximum_packet_size(mqtt_clients: Clients,
                                                   broker: Broker) -> None:
    device = mqtt_clients.connect("dev-a")
    assert device.connack_properties is not None
    assert device.connack_properties.MaximumPacketSize == broker.config.max_packet_size


REFUSALS = {
    # case: (credential, alert with TLS 1.2, alert with TLS 1.3)
    "no certificate": (lambda pki: None, "SSLV3_ALERT_HANDSHAKE_FAILURE",
                       "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    "foreign CA": (lambda pki: pki.foreign["dev-a"], "TLSV1_ALERT_UNKNOWN_CA",
                   "TLSV1_ALERT_UNKNOWN_CA"),
    "expired": (lambda pki: pki.expired["dev-a"], "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
    "server certificate": (lambda pki: pki.broker, "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                           "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"),
}


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_broker_refuses_certificate_with_tls_alert(broker: Broker, pki: Pki, case: str,
                                                    version: ssl.TLSVersion) -> None:
    credential, alert_tls12, alert_tls13 = REFUSALS[case]
    expected = alert_tls12 if version == ssl.TLSVersion.TLSv1_2 else alert_tls13
    assert tls_alert(broker, pki.ca_cert, credential(pki), version) == expected


def test_valid_certificate_passes_the_tls_check(broker: Broker, pki: Pki) -> None:
    """The control for the refusals above: the same probe accepts a valid device."""
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert tls_alert(broker, pki.ca_cert, pki.clients["dev-a"], version,
                         send_connect=True) == "accepted"


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_client_never_gets_a_connack(mqtt_clients: Clients, broker: Broker,
                                             pki: Pki, case: str) -> None:
    """The device's own MQTT client (TLS 1.3 by default) is cut off before CONNACK and the
    broker logs why."""
    credential = REFUSALS[case][0](pki)
    client = mqtt_clients.client(credential, "dev-a")
    client.start(threaded=False)
    client.wait_refused()
    reason = ("peer did not return a certificate" if credential is None
              else "certificate verify failed")
    assert broker.wait_for_log(reason, WAIT_S), f"broker log lacks {reason!r}"


# --- identity: certificate CN = username = client id ------------------------------------------
def test_claimed_username_and_client_id_are_ignored(mqtt_clients: Clients) -> None:
    """dev-a's certificate, presenting as client id dev-b with username central, is still
    dev-a: it neither takes over dev-b's session nor gains central's or dev-b's rights,
    and it replaces dev-a's own connection."""
    central = mqtt_clients.connect("central")
    central.subscribe("er/v1/+/up/#")
    dev_b = mqtt_clients.connect("dev-b")
    dev_b.subscribe("er/v1/dev-b/down/#")
    dev_a = mqtt_clients.connect("dev-a", threaded=False)  # no reconnect to replace the impostor
    impostor = mqtt_clients.connect("dev-a", client_id="dev-b", username="central")

    assert dev_a.wait_disconnected(), "dev-a's earlier connection was not replaced"
    assert impostor.publish("er/v1/dev-b/up/status", b"forged") == NOT_AUTHORIZED
    assert impostor.publish("er/v1/dev-a/up/status", b"impostor-own") == 0
    assert central.receive_until(b"impostor-own") == [("er/v1/dev-a/up/status",
                                                        b"impostor-own")]
    assert central.publish("er/v1/dev-b/down/cmd/ping", b"still-there") == 0
    assert dev_b.receive_until(b"still-there") == [("er/v1/dev-b/down/cmd/ping",
                                                     b"still-there")]
    assert not dev_b.disconnected.is_set()


# --- access control --------------------------------------------------------------------------
PUBLISH_RIGHTS = [
    ("dev-a", "er/v1/dev-a/up/upload/init", True),
    ("dev-a", "er/v1/dev-a/to/ingest-1/rec/r/chunk", True),  # routed to one worker
    ("dev-a", "er/v1/dev-b/to/ingest-1/rec/r/chunk", False),
    ("central", "er/v1/dev-a/to/ingest-1/rec/r/chunk", False),
    ("dev-a", "er/v1/dev-b/up/status", False),
    ("dev-a", "er/v1/dev-a/down/cmd/reboot", False),
    ("dev-a", "er/v1/dev-a", False),
    ("dev-a", "elsewhere", False),
    ("central", "er/v1/dev-a/down/ack", True),
    ("central", "er/v1/dev-a/up/status", False),
    ("ops", "er/v1/dev-a/down/config", True),
    ("ops", "er/v1/dev-a/down/cmd/reboot", True),
    ("ops", "er/v1/dev-a/down/ack", False),
    ("ops", "er/v1/dev-a/up/status", False),
]


@pytest.mark.parametrize(("who", "topic", "allowed"), PUBLISH_RIGHTS)
def test_publish_rights(mqtt_clients: Clients, who: str, topic: str, allowed: bool) -> None:
    """Granted: PUBACK 0x00, or 0x10 (no matching subscribers; nobody listens here)."""
    reason = mqtt_clients.connect(who).publish(topic, b"x")
    assert reason in ((0x00, 0x10) if allowed else (NOT_AUTHORIZED,)), reason


def test_device_cannot_publish_into_another_devices_topics(mqtt_clients: Clients) -> None:
    central = mqtt_clients.connect("central")
    central.subscribe("er/v1/+/up/#")
    dev_b = mqtt_clients.connect("dev-b")

    central.subscribe("er/v1/+/to/#")
    dev_b.publish("er/v1/dev-a/up/upload/init", b"forged")
    dev_b.publish("er/v1/dev-a/to/central/rec/r/chunk", b"forged-routed")
    dev_b.publish("er/v1/dev-b/to/central/rec/r/chunk", b"own-routed")
    dev_b.publish("er/v1/dev-b/up/status", b"control")
    assert central.receive_until(b"control") == [
        ("er/v1/dev-b/to/central/rec/r/chunk", b"own-routed"),
        ("er/v1/dev-b/up/status", b"control")]


def test_device_cannot_read_another_devices_down_topics(mqtt_clients: Clients) -> None:
    central = mqtt_clients.connect("central")
    assert not central.publish("er/v1/dev-b/down/config", b"b-config", retain=True).is_failure
    assert not central.publish("er/v1/dev-a/down/config", b"a-config", retain=True).is_failure
    dev_a = mqtt_clients.connect("dev-a")

    dev_a.subscribe("er/v1/dev-b/down/#")  # granted at SUBACK, filtered at delivery
    dev_a.subscribe("er/v1/+/down/#")
    assert dev_a.receive_until(b"a-config") == [("er/v1/dev-a/down/config", b"a-config")]
    central.publish("er/v1/dev-b/down/cmd/x", b"for-b")
    central.publish("er/v1/dev-a/down/cmd/x", b"for-a")
    assert dev_a.receive_until(b"for-a") == [("er/v1/dev-a/down/cmd/x", b"for-a")]


def test_device_cannot_publish_to_its_own_down_topics(mqtt_clients: Clients) -> None:
    dev_a = mqtt_clients.connect("dev-a")
    dev_a.subscribe("er/v1/dev-a/down/#")
    central = mqtt_clients.connect("central")

    assert dev_a.publish("er/v1/dev-a/down/cmd/reboot", b"self-made") == NOT_AUTHORIZED
    assert central.publish("er/v1/dev-a/down/cmd/reboot", b"from-central") == 0
    assert dev_a.receive_until(b"from-central") == [("er/v1/dev-a/down/cmd/reboot",
                                                      b"from-central")]


def test_devices_cannot_read_up_topics(mqtt_clients: Clients) -> None:
    """Not even their own: what a device sends is for central only."""
    dev_a = mqtt_clients.connect("dev-a")
    dev_b = mqtt_clients.connect("dev-b")
    dev_a.subscribe("er/v1/+/up/#")
    dev_a.subscribe("er/v1/dev-a/down/#")
    central = mqtt_clients.connect("central")

    dev_b.publish("er/v1/dev-b/up/status", b"b-status")
    dev_a.publish("er/v1/dev-a/up/status", b"a-status")
    central.publish("er/v1/dev-a/down/ack", b"control")
    assert dev_a.receive_until(b"control") == [("er/v1/dev-a/down/ack", b"control")]


def test_ops_reads_status_and_jobs_only(mqtt_clients: Clients) -> None:
    ops = mqtt_clients.connect("ops")
    ops.subscribe("er/v1/+/up/#")
    device = mqtt_clients.connect("dev-a")

    for topic in ("er/v1/dev-a/up/upload/init", "er/v1/dev-a/up/audit",
                  "er/v1/dev-a/up/jobs/j1", "er/v1/dev-a/up/status"):
        assert device.publish(topic, topic.encode()) == 0
    assert ops.receive_until(b"er/v1/dev-a/up/status") == [
        ("er/v1/dev-a/up/jobs/j1", b"er/v1/dev-a/up/jobs/j1"),
        ("er/v1/dev-a/up/status", b"er/v1/dev-a/up/status")]


def test_central_reads_no_down_topics(mqtt_clients: Clients) -> None:
    central = mqtt_clients.connect("central")
    central.subscribe("er/v1/+/down/#")
    central.subscribe("er/v1/+/up/#")
    ops = mqtt_clients.connect("ops")
    device = mqtt_clients.connect("dev-a")

    assert ops.publish("er/v1/dev-a/down/config", b"signed-config") == 0
    assert device.publish("er/v1/dev-a/up/status", b"control") == 0
    assert central.receive_until(b"control") == [("er/v1/dev-a/up/status", b"control")]
