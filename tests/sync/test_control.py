"""The control plane: status messages, signed updates and commands -- refused ones reported
and never acted on, good ones applied atomically, duplicates answered from the stored
result -- and one run through a real mosquitto."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from drivers.clock import ManualClock
from firmware.agecrypt import Identity
from firmware.catalogue import Catalogue
from firmware.config import load_config
from firmware.keys import private_key_pem
from firmware.policyfile import public_key_text, sign_policy
from sync import envelope
from sync.broker import Broker
from sync.control import CONFIG_JOB, ControlPlane, RunResult, replace_recipients
from sync.envelope import CLOCK_SKEW_S, MAX_ENVELOPE_BYTES, Payload, make_body, sign
from sync.pki import Pki
from tests.configtext import RECIPIENT, REPO
from tests.firmware.policydata import MINI
from tests.sync.conftest import WAIT_S, Clients

DEVICE = "dev-a"
OPS = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()


def config_text(data_dir: Path, *, ops_key: Ed25519PrivateKey = OPS, site: str = "Site A",
                recipient: str = RECIPIENT, device: str = DEVICE) -> str:
    return f"""# managed by ops
device_id = "{device}"
site = "{site}"
jurisdiction = "DE"
[storage]
data_dir = "{data_dir}"
[keys]
# central store
recipients = ["{recipient}"]
[[lines]]
id = "line1"
backend = "sim"
[lines.options]
scenario = "{REPO / 'examples' / 'dealer-day.toml'}"
[policy]
signers = ["{public_key_text(ops_key.public_key())}"]
[trust]
ops_public_key = "{public_key_text(ops_key.public_key())}"
"""


class FakeRunner:
    """Stands in for journalctl and systemctl; records every call."""

    def __init__(self, result: RunResult | Exception = RunResult(0, "line a\nline b\n")) -> None:
        self.calls: list[list[str]] = []
        self.result = result

    def __call__(self, argv: Sequence[str], timeout_s: float) -> RunResult:
        self.calls.append(list(argv))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class Device:
    """A config file, a catalogue and a control plane on a manual clock."""

    def __init__(self, tmp_path: Path, runner: FakeRunner | None = None, *,
                 wall_start: float = 1_790_000_000.0) -> None:
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.data_dir = tmp_path / "data"
        self.config_path = tmp_path / "config.toml"
        if not self.config_path.exists():
            self.config_path.write_text(config_text(self.data_dir))
        self.original = self.config_path.read_bytes()
        self.clock = ManualClock(wall_start=wall_start)
        self.runner = runner or FakeRunner()
        self.key = Ed25519PrivateKey.generate()
        self.plane = self.start()

    def start(self, client_cert: Path | None = None) -> ControlPlane:
        config = load_config(self.config_path)
        return ControlPlane(config, config.catalogue_path, self.clock, self.key,
                            client_cert=client_cert, runner=self.runner, heartbeat_s=60.0)

    def now(self) -> int:
        return int(self.clock.wall())

    def audit_kinds(self) -> list[str]:
        with Catalogue.read_only(self.data_dir / "catalogue.db") as cat:
            return [entry.kind for entry in cat.audit_entries()]


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    made = Device(tmp_path)
    yield made
    made.plane.close()


def cmd(dev: Device, name: str, job: str = "job-1", *, version: int = 100,
        key: Ed25519PrivateKey = OPS, **fields: Any) -> bytes:
    body = make_body("command", device=fields.pop("device", DEVICE), version=version,
                     issued_at=fields.pop("issued_at", dev.now()),
                     valid_s=fields.pop("valid_s", 600), job_id=job, command=name,
                     args=fields.pop("args", None))
    return sign(body, key)


def config_update(dev: Device, text: str, *, version: int = 5) -> bytes:
    body = make_body("config", device=DEVICE, version=version, issued_at=dev.now(),
                     valid_s=600, payload=Payload(toml=text))
    return sign(body, OPS)


def only(messages: list[tuple[str, bytes, int, bool]], topic_end: str) -> dict[str, Any]:
    found = [json.loads(payload) for topic, payload, _, _ in messages
             if topic.endswith(topic_end)]
    assert len(found) == 1, messages
    return found[0]


CMD_TOPIC = f"er/v1/{DEVICE}/down/cmd/"
CONFIG_TOPIC = f"er/v1/{DEVICE}/down/config"


# --- configuration -----------------------------------------------------------------------

def test_good_config_is_applied_atomically_and_the_old_one_kept(device: Device) -> None:
    new_text = config_text(device.data_dir, site="Site B")
    out = device.plane.handle(CONFIG_TOPIC, config_update(device, new_text))
    status = only(out, "/up/jobs/config")
    assert status["state"] == "succeeded" and status["result"]["restart_pending"] is True
    assert status["result"]["message"] == "applied, restart pending"
    assert device.config_path.read_text() == new_text
    assert (device.tmp / "config.toml.previous").read_bytes() == device.original
    assert not (device.tmp / "config.toml.part").exists()
    assert "control.applied" in device.audit_kinds()
    assert out[0][3] is True  # retained: the latest outcome of the retained update


def test_bad_config_is_refused_and_the_old_file_intact(device: Device) -> None:
    bad = config_text(device.data_dir).replace('jurisdiction = "DE"', 'jurisdiction = 49')
    status = only(device.plane.handle(CONFIG_TOPIC, config_update(device, bad)),
                  "/up/jobs/config")
    assert status["state"] == "failed"
    assert "config.toml: jurisdiction: expected `str`, got `int`" in status["error"]
    assert device.config_path.read_bytes() == device.original
    assert not (device.tmp / "config.toml.previous").exists()
    assert "control.rejected" in device.audit_kinds()


@pytest.mark.parametrize("edit", ["device", "trust"])
def test_config_that_would_orphan_the_device_is_refused(device: Device, edit: str) -> None:
    text = config_text(device.data_dir)
    text = (text.replace(f'device_id = "{DEVICE}"', 'device_id = "dev-z"') if edit == "device"
            else text.split("[trust]")[0])
    status = only(device.plane.handle(CONFIG_TOPIC, config_update(device, text)),
                  "/up/jobs/config")
    assert status["state"] == "failed" and device.config_path.read_bytes() == device.original


def test_retained_config_redelivered_is_answered_from_the_stored_result(device: Device) -> None:
    data = config_update(device, config_text(device.data_dir, site="Site B"))
    first = device.plane.handle(CONFIG_TOPIC, data)
    (device.tmp / "config.toml.previous").unlink()
    audits = len(device.audit_kinds())
    again = device.plane.handle(CONFIG_TOPIC, data)
    assert again == first
    assert not (device.tmp / "config.toml.previous").exists()  # not applied twice
    assert len(device.audit_kinds()) == audits


def test_cleared_retained_config_is_ignored(device: Device) -> None:
    assert device.plane.handle(CONFIG_TOPIC, b"") == []


def test_signed_policy_update_is_installed(device: Device) -> None:
    policy = MINI.replace("version = 3", "version = 900000").encode()
    body = make_body("policy", device=DEVICE, version=1, issued_at=device.now(), valid_s=60,
                     payload=Payload(policy=policy.decode(),
                                     signature=sign_policy(policy, OPS).decode().strip()))
    status = only(device.plane.handle(CONFIG_TOPIC, sign(body, OPS)), "/up/jobs/config")
    assert status["state"] == "succeeded" and status["result"]["policy_version"] == 900000
    assert (device.data_dir / "policy" / "policy.toml").read_bytes() == policy


# --- every refusal: reported, audited, never acted on ------------------------------------

def refusals(dev: Device) -> dict[str, tuple[bytes, str]]:
    good = cmd(dev, "reboot")
    unsigned = json.loads(good)
    del unsigned["signature"]
    tampered = json.loads(good)
    tampered["body"] = tampered["body"].replace('"version":100', '"version":101')
    return {
        "unsigned": (json.dumps(unsigned).encode(), "unsigned"),
        "bad_signature": (json.dumps(tampered).encode(), "bad_signature"),
        "wrong_key": (cmd(dev, "reboot", key=STRANGER), "bad_signature"),
        "other_device": (cmd(dev, "reboot", device="dev-b"), "wrong_device"),
        "expired": (cmd(dev, "reboot", issued_at=dev.now() - 1000 - CLOCK_SKEW_S,
                        valid_s=1000 - 1), "expired"),
        "not_yet_valid": (cmd(dev, "reboot", issued_at=dev.now() + CLOCK_SKEW_S + 10),
                          "not_yet_valid"),
        "replayed": (cmd(dev, "reboot", job="job-new", version=50), "replayed"),
        "older_version": (cmd(dev, "reboot", job="job-new", version=49), "older_version"),
        "malformed_json": (b'{"format": "er-signed/1", "body": ', "malformed"),
        "oversize": (cmd(dev, "reboot", args={"pad": "x" * MAX_ENVELOPE_BYTES}), "malformed"),
    }


@pytest.mark.parametrize("case", ["unsigned", "bad_signature", "wrong_key", "other_device",
                                  "expired", "not_yet_valid", "replayed", "older_version",
                                  "malformed_json", "oversize"])
def test_refused_command_is_reported_and_never_executed(device: Device, case: str) -> None:
    # An applied command at version 50 makes the replay and older-version cases real.
    device.plane.handle(CMD_TOPIC + "job-0", cmd(device, "status", job="job-0", version=50))
    data, reason = refusals(device)[case]
    out = device.plane.handle(CMD_TOPIC + "job-1", data)
    for _ in range(3):
        device.clock.advance(100)
        out += device.plane.heartbeat_due(device.clock.monotonic())
    status = only(out, "/up/jobs/job-1")
    assert (status["state"], status["reason"]) == ("rejected", reason)
    assert device.runner.calls == []  # systemctl reboot never ran
    assert device.audit_kinds().count("control.rejected") == 1


@pytest.mark.parametrize("case", ["unsigned", "wrong_key", "other_device", "expired",
                                  "not_yet_valid", "replayed", "older_version",
                                  "malformed_json", "oversize"])
def test_refused_config_leaves_the_file_unchanged(device: Device, case: str) -> None:
    new_text = config_text(device.data_dir, site="Site B")
    device.plane.handle(CONFIG_TOPIC, config_update(device, new_text, version=50))
    device.config_path.write_bytes(device.original)
    reason = refusals(device)[case][1]
    body_fields: dict[str, Any] = {"device": DEVICE, "version": 60, "valid_s": 600,
                                   "issued_at": device.now()}
    key = STRANGER if case == "wrong_key" else OPS
    if case == "other_device":
        body_fields["device"] = "dev-b"
    elif case == "expired":
        body_fields["issued_at"] -= 2000
    elif case == "not_yet_valid":
        body_fields["issued_at"] += CLOCK_SKEW_S + 10
    elif case in ("replayed", "older_version"):
        body_fields["version"] = 50 if case == "replayed" else 49
    text = config_text(device.data_dir, site="Site C")
    if case == "oversize":
        text += "#" + "x" * MAX_ENVELOPE_BYTES + "\n"
    data = sign(make_body("config", payload=Payload(toml=text), **body_fields), key)
    if case == "unsigned":
        stripped = json.loads(data)
        del stripped["signature"]
        data = json.dumps(stripped).encode()
    elif case == "malformed_json":
        data = data[:40]
    status = only(device.plane.handle(CONFIG_TOPIC, data), "/up/jobs/config")
    assert (status["state"], status["reason"]) == ("rejected", reason)
    assert device.config_path.read_bytes() == device.original


def test_unknown_command_is_rejected(device: Device) -> None:
    text = (b'{"command":"format_disk","device":"dev-a","issued_at":%d,"job_id":"job-1",'
            b'"kind":"command","not_after":%d,"not_before":%d,"version":1}'
            % (device.now(), device.now() + 60, device.now()))
    signature = OPS.sign(envelope.SIGNING_CONTEXT + text)
    data = json.dumps({"format": envelope.FORMAT, "body": text.decode(),
                       "signature": base64.b64encode(signature).decode()})
    status = only(device.plane.handle(CMD_TOPIC + "job-1", data.encode()), "/up/jobs/job-1")
    assert (status["state"], status["reason"]) == ("rejected", "unknown_command")


def test_unsigned_rejection_is_not_retained_and_cannot_replace_a_result(device: Device) -> None:
    good = device.plane.handle(CMD_TOPIC + "job-1", cmd(device, "fetch_logs"))
    forged = json.loads(cmd(device, "fetch_logs"))
    del forged["signature"]
    refused = device.plane.handle(CMD_TOPIC + "job-1", json.dumps(forged).encode())
    assert refused[0][3] is False and good[0][3] is True
    assert device.plane.handle(CMD_TOPIC + "job-1", cmd(device, "fetch_logs")) == good


def test_command_for_another_job_topic_is_refused(device: Device) -> None:
    status = only(device.plane.handle(CMD_TOPIC + "job-2", cmd(device, "fetch_logs")),
                  "/up/jobs/job-2")
    assert status["reason"] == "malformed" and device.runner.calls == []


# --- commands ------------------------------------------------------------------------------

def test_duplicate_job_is_answered_from_cache_and_executed_once(device: Device) -> None:
    data = cmd(device, "fetch_logs", args={"lines": 20})
    first = device.plane.handle(CMD_TOPIC + "job-1", data)
    status = only(first, "/up/jobs/job-1")
    assert status["state"] == "succeeded" and status["result"]["lines"] == ["line a", "line b"]
    assert device.runner.calls == [["journalctl", "-u", "edge-recorder", "--no-pager",
                                    "-n", "20"]]
    device.plane.close()
    device.plane = device.start()  # the stored result survives a restart
    assert device.plane.handle(CMD_TOPIC + "job-1", data) == first
    assert len(device.runner.calls) == 1


def test_fetch_logs_without_journalctl_says_so(tmp_path: Path) -> None:
    dev = Device(tmp_path, FakeRunner(FileNotFoundError("journalctl")))
    status = only(dev.plane.handle(CMD_TOPIC + "job-1", cmd(dev, "fetch_logs")),
                  "/up/jobs/job-1")
    assert status["state"] == "failed"
    assert status["error"] == "fetch_logs: journalctl is not installed on this device"
    dev.plane.close()


def test_fetch_logs_that_hangs_times_out(tmp_path: Path) -> None:
    dev = Device(tmp_path, FakeRunner(subprocess.TimeoutExpired("journalctl", 30)))
    status = only(dev.plane.handle(CMD_TOPIC + "job-1", cmd(dev, "fetch_logs")),
                  "/up/jobs/job-1")
    assert status["state"] == "timed_out"
    dev.plane.close()


def test_reboot_is_reported_in_progress_before_it_runs(device: Device) -> None:
    status = only(device.plane.handle(CMD_TOPIC + "job-1", cmd(device, "reboot")),
                  "/up/jobs/job-1")
    assert status["state"] == "in_progress" and device.runner.calls == []
    assert device.plane.heartbeat_due(device.clock.monotonic()) == []
    assert device.runner.calls == [["systemctl", "reboot"]]
    device.plane.close()
    device.plane = device.start()  # the machine came back
    device.plane.will()
    after = only(device.plane.birth(), "/up/jobs/job-1")
    assert after["state"] == "succeeded" and after["result"] == {"message": "device restarted"}


def test_resync_marks_sent_items_pending_again(device: Device) -> None:
    with Catalogue(device.data_dir / "catalogue.db", clock=device.clock,
                   device_id=DEVICE) as cat:
        with cat.transaction() as txn:
            sent = txn.enqueue("audit", "batch-1")
            txn.enqueue("audit", "batch-2")
            assert sent is not None
            txn.update_outbox(sent, state="sent")
        status = only(device.plane.handle(CMD_TOPIC + "job-1", cmd(device, "resync")),
                      "/up/jobs/job-1")
        assert status["result"] == {"requeued": 1}
        assert [row["ref"] for row in cat.outbox_pending()] == ["batch-1", "batch-2"]


def test_rotate_recipients_changes_only_the_recipients(device: Device) -> None:
    new = str(Identity.generate().recipient)
    status = only(device.plane.handle(CMD_TOPIC + "job-1", cmd(
        device, "rotate_recipients", args={"recipients": [RECIPIENT, new]})), "/up/jobs/job-1")
    assert status["state"] == "succeeded" and status["result"]["restart_pending"]
    assert load_config(device.config_path).keys.recipients == [RECIPIENT, new]
    assert "# central store" in device.config_path.read_text()  # comments kept
    assert (device.tmp / "config.toml.previous").read_bytes() == device.original


def test_rotate_recipients_refuses_an_invalid_recipient(device: Device) -> None:
    status = only(device.plane.handle(CMD_TOPIC + "job-1", cmd(
        device, "rotate_recipients", args={"recipients": ["age1nope"]})), "/up/jobs/job-1")
    assert status["state"] == "failed" and device.config_path.read_bytes() == device.original


def test_replace_recipients_refuses_a_layout_it_cannot_edit() -> None:
    text = config_text(Path("/tmp/x")).replace(
        f'recipients = ["{RECIPIENT}"]', f'recipients = [\n "{RECIPIENT}",\n]')
    assert "recipients = [" in replace_recipients(text, [RECIPIENT], "c.toml")
    inline = text.replace("[keys]\n# central store\n", "").replace(
        f'recipients = [\n "{RECIPIENT}",\n]', "")
    inline = inline.replace('jurisdiction = "DE"',
                            f'jurisdiction = "DE"\nkeys = {{recipients = ["{RECIPIENT}"]}}')
    with pytest.raises(Exception, match="no \\[keys\\] table"):
        replace_recipients(inline, [RECIPIENT], "c.toml")


def test_job_status_is_signed_by_the_device(device: Device) -> None:
    status = only(device.plane.handle(CMD_TOPIC + "job-1", cmd(device, "status")),
                  "/up/jobs/job-1")
    fields = {k: v for k, v in status.items() if k not in ("key_id", "signature")}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    device.key.public_key().verify(base64.b64decode(status["signature"]),
                                   b"edge-recorder job status v1\n" + text.encode())


# --- status --------------------------------------------------------------------------------

def test_will_and_birth_share_a_session_that_grows_across_restarts(device: Device) -> None:
    will_topic, will, qos, retain = device.plane.will()
    assert (will_topic, qos, retain) == (f"er/v1/{DEVICE}/up/status", 1, True)
    birth_topic, birth, _, birth_retain = device.plane.birth()[0]
    will_fields, birth_fields = json.loads(will), json.loads(birth)
    assert will_fields["state"] == "offline" and will_fields["type"] == "will"
    assert birth_fields["state"] == "online" and birth_fields["type"] == "birth"
    assert will_fields["session"] == birth_fields["session"] == 1
    assert birth_topic == will_topic and birth_retain
    assert birth_fields["config_sha256"] == hashlib.sha256(
        device.original).hexdigest()
    assert birth_fields["firmware_version"] and birth_fields["started_at"].endswith("Z")
    device.plane.will()
    assert json.loads(device.plane.birth()[0][1])["session"] == 2
    device.plane.close()
    device.plane = device.start()
    assert json.loads(device.plane.will()[1])["session"] == 3


def test_heartbeat_every_period_with_its_measurements(tmp_path: Path, pki: Pki) -> None:
    device = Device(tmp_path, wall_start=time.time())  # the test PKI's certificates are real
    device.plane.close()
    device.plane = device.start(client_cert=pki.clients[DEVICE].cert)
    with Catalogue(device.data_dir / "catalogue.db", clock=device.clock,
                   device_id=DEVICE) as cat, cat.transaction() as txn:
        call = txn.insert_call(line_id="line1")
        rec = txn.insert_recording(call_id=call, path="x.rec", codec="alaw", size=4000)
        txn.enqueue("recording", rec)
    device.plane.will()
    device.plane.birth()
    device.clock.advance(59)
    assert device.plane.heartbeat_due(device.clock.monotonic()) == []
    device.clock.advance(1)
    [(topic, payload, qos, retain)] = device.plane.heartbeat_due(device.clock.monotonic())
    beat = json.loads(payload)
    assert (topic, qos, retain) == (f"er/v1/{DEVICE}/up/status", 1, True)
    assert beat["type"] == "heartbeat" and beat["session"] == 1
    assert (beat["backlog_count"], beat["backlog_bytes"]) == (1, 4000)
    assert beat["oldest_unsynced_age_s"] == 60
    assert beat["lines"] == [{"id": "line1", "active_calls": 1}]
    assert beat["last_call_at"] is not None and beat["disk_free_bytes"] > 0
    assert 728 <= beat["cert_expiry_days"] <= 730  # the test PKI issues for 2 years
    assert beat["clock_synced"] is True and beat["uptime_s"] == 60
    assert device.plane.heartbeat_due(device.clock.monotonic()) == []
    device.plane.close()


# --- ops-side tool -------------------------------------------------------------------------

def test_sign_tool_makes_an_envelope_the_device_accepts(tmp_path: Path) -> None:
    device = Device(tmp_path, wall_start=time.time())  # the tool signs with the real clock
    key_path = device.tmp / "ops.pem"
    key_path.write_bytes(private_key_pem(OPS))
    out = device.tmp / "cmd.json"
    done = subprocess.run(
        [sys.executable, "-m", "sync.control", "sign", "--key", str(key_path), "--kind",
         "command", "--device", DEVICE, "--job", "job-7", "--command", "fetch_logs",
         "--arg", "lines=5", "--version", "1", "-o", str(out)],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    status = only(device.plane.handle(CMD_TOPIC + "job-7", out.read_bytes()), "/up/jobs/job-7")
    assert status["state"] == "succeeded" and device.runner.calls[0][-1] == "5"
    device.plane.close()


@pytest.mark.parametrize(("extra", "message"), [
    (["--key", "/nonexistent.pem"], "/nonexistent.pem: cannot read"),
    (["--command", "format_disk"], "unknown_command"),
])
def test_sign_tool_errors_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    key_path = tmp_path / "ops.pem"
    key_path.write_bytes(private_key_pem(OPS))
    argv = [sys.executable, "-m", "sync.control", "sign", "--key", str(key_path), "--kind",
            "command", "--device", DEVICE, "--job", "j", "--command", "status",
            "-o", str(tmp_path / "out.json"), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- end to end through mosquitto ----------------------------------------------------------

class DeviceHarness:
    """A device-side paho client wired to a ControlPlane (what the sync agent does): the
    will is set before connecting, birth and subscriptions follow the CONNACK, messages go
    to ``handle`` and its answers are published -- all on paho's network thread."""

    def __init__(self, broker: Broker, pki: Pki, plane: ControlPlane) -> None:
        self.plane = plane
        self.connected: queue.Queue[int] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE,
                                  protocol=mqtt.MQTTv5)
        credential = pki.clients[DEVICE]
        self.client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(credential.cert),
                            keyfile=str(credential.key))
        self.client.on_pre_connect = lambda client, _u: client.will_set(*plane.will())
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.loop_start()
        assert self.connected.get(timeout=WAIT_S) == 0

    def _publish(self, messages: list[tuple[str, bytes, int, bool]]) -> None:
        for topic, payload, qos, retain in messages:
            self.client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._publish(self.plane.birth())
        for topic, qos in self.plane.subscriptions():
            client.subscribe(topic, qos=qos)
        self.connected.put(int(reason.value))

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._publish(self.plane.handle(message.topic, message.payload))

    def kill_connection(self) -> None:
        """End the TCP connection without DISCONNECT (a crash or a cut cable)."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def next_message(client: Any, topic: str) -> dict[str, Any]:
    while True:
        try:
            message = client.messages.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"nothing on {topic} within {WAIT_S} s")
        if message.topic == topic:
            return dict(json.loads(message.payload))


def test_end_to_end_config_command_and_will(tmp_path: Path, broker: Broker, pki: Pki,
                                            mqtt_clients: Clients) -> None:
    device = Device(tmp_path / "device")
    ops = mqtt_clients.connect("ops")
    ops.subscribe(f"er/v1/{DEVICE}/up/jobs/#")
    ops.subscribe(f"er/v1/{DEVICE}/up/status")
    new_text = config_text(device.data_dir, site="Site B")
    # Nobody subscribes yet: PUBACK 0x10 (no matching subscribers), the message is retained.
    assert ops.publish(CONFIG_TOPIC, config_update(device, new_text), retain=True) in (0, 0x10)

    harness = DeviceHarness(broker, pki, device.plane)
    try:
        birth = next_message(ops, f"er/v1/{DEVICE}/up/status")
        assert (birth["type"], birth["session"]) == ("birth", 1)
        applied = next_message(ops, f"er/v1/{DEVICE}/up/jobs/{CONFIG_JOB}")
        assert applied["state"] == "succeeded"
        assert device.config_path.read_text() == new_text

        assert ops.publish(CMD_TOPIC + "job-9", cmd(device, "fetch_logs", job="job-9")) == 0
        done = next_message(ops, f"er/v1/{DEVICE}/up/jobs/job-9")
        assert done["state"] == "succeeded" and done["result"]["lines"] == ["line a", "line b"]

        harness.kill_connection()
        will = next_message(ops, f"er/v1/{DEVICE}/up/status")
        assert (will["type"], will["state"], will["session"]) == ("will", "offline", 1)
        late = mqtt_clients.connect("ops", client_id="ops")  # a fresh subscriber: retained
        late.subscribe(f"er/v1/{DEVICE}/up/status")
        retained = next_message(late, f"er/v1/{DEVICE}/up/status")
        assert (retained["state"], retained["session"]) == ("offline", 1)
    finally:
        harness.client.loop_stop()
        device.plane.close()


def test_config_update_follows_a_symlinked_config_to_the_managed_copy(tmp_path: Path) -> None:
    """/etc/edge-recorder/config.toml -> state dir copy: the link stays, the target changes."""
    from sync.control import _config_path

    managed = tmp_path / "state" / "config.toml"
    managed.parent.mkdir()
    managed.write_text("x = 1\n")
    link = tmp_path / "etc" / "config.toml"
    link.parent.mkdir()
    link.symlink_to(managed)

    class Cfg:
        source = str(link)

    assert _config_path(Cfg()) == managed  # type: ignore[arg-type]
