"""Self-tests for real: the line test through the backend registry on a simulated line,
the MQTT test against a real mosquitto with the certificate the box was just given."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware.config import load_config
from provisioning.selftest import line_test
from provisioning.state import State
from provisioning.tool import Client, InstallPlan, ProvisionError, provision
from sync.broker import Broker, start_local
from sync.pki import Pki

from .conftest import Bench, write_settings

pytestmark = pytest.mark.timeout(60)

DEVICE_ID = "er-test-0001"
CONNACK_WAIT_S = 5.0
# One German inbound call straight away: a ring burst (1 s on, DE cadence) inside the 2 s
# of line time the line test reads, then pick-up and hang-up (docs/SIMULATOR.md).
LINE_SCENARIO = """country = "DE"
seed = 7
tail_s = 0.3
[[calls]]
gap_s = 0.1
direction = "inbound"
cid = "none"
rings = 1
talk_s = 0.3
hangup = "near"
"""


def short_line_settings(tmp: Path) -> Path:
    scenario = tmp / "line-check.toml"
    scenario.write_text(LINE_SCENARIO)
    return write_settings(tmp, scenario, "site-line.toml")


@pytest.fixture
def broker(test_pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    running = start_local(test_pki, tmp_path / "broker")
    try:
        yield running
    finally:
        running.stop()


def run_plan(bench: Bench) -> object:
    port = bench.tool_port()
    try:
        return provision(Client(port, timeout_s=0.5, retries=8), bench.plan)
    finally:
        port.close()


def connack_with_installed_certificate(bench: Bench) -> object:
    """CONNACK reason for a fresh paho client using the files the device now holds."""
    config = load_config(bench.paths.config_path)
    assert config.sync is not None
    answered, reason = threading.Event(), {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE_ID,
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, code, _p: (reason.update(code=code),
                                                        answered.set())
    client.tls_set(ca_certs=str(config.resolve_path(config.sync.ca_file)),
                   certfile=str(config.resolve_path(config.sync.cert_file)),
                   keyfile=str(config.resolve_path(config.sync.key_file)))
    client.connect(config.sync.host, config.sync.port)
    client.loop_start()
    try:
        assert answered.wait(CONNACK_WAIT_S), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reason["code"]


def test_provisioned_box_passes_every_selftest_against_a_real_broker(
        bench: Bench, broker: Broker, test_pki: Pki) -> None:
    bench.plan.settings_file = str(short_line_settings(bench.tmp))
    bench.plan.selftests = ["line", "mqtt", "clock", "disk"]
    bench.plan.selftest_timeout_s = 10.0
    bench.plan.install = InstallPlan(broker_host="127.0.0.1", broker_port=broker.port,
                                     ops_public_key=test_pki.ops_signing_pub_b64)
    outcome = run_plan(bench)
    assert outcome.state == State.LOCKED.value
    results = {result.name: result for result in outcome.results}
    assert all(result.ok for result in results.values()), results
    assert "ring_on" in results["line"].detail and "hook on" in results["line"].detail
    assert f"connected as {DEVICE_ID}" in results["mqtt"].detail
    assert connack_with_installed_certificate(bench) == 0
    assert broker.wait_for_log(f"as {DEVICE_ID}", 2.0), broker.log_text()


def test_mqtt_selftest_failure_keeps_the_box_unlocked(bench: Bench) -> None:
    bench.plan.selftests = ["mqtt", "clock", "disk"]
    with pytest.raises(ProvisionError, match="self-test failed: mqtt"):
        run_plan(bench)  # the bench plan's broker is 127.0.0.1:1: nobody listens
    assert bench.agent.state == State.CERT_INSTALLED


def test_line_selftest_reports_a_dead_input(tmp_path: Path) -> None:
    silent = tmp_path / "dead.toml"
    silent.write_text('country = "DE"\nnoise_dbfs = -120.0\ntail_s = 2.5\n')
    settings = short_line_settings(tmp_path).read_text().replace(
        str(tmp_path / "line-check.toml"), str(silent))
    config_path = tmp_path / "config.toml"
    config_path.write_text(settings + f'\n[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    result = line_test(load_config(config_path), 5.0)
    assert not result.ok and "no signal" in result.detail, result
