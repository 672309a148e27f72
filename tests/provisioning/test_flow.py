"""The real engineer's tool against the device agent over a pty pair."""

from __future__ import annotations

import time

import pytest

from firmware.config import load_config
from provisioning import codec as c
from provisioning.state import State
from provisioning.tool import Client, DeviceError, ProvisionError, provision, unlock
from provisioning.transport import TransportError

from .conftest import Bench, FaultyPort, SpyPort

pytestmark = pytest.mark.timeout(60)


def run(bench: Bench, port: SpyPort | None = None, **plan_changes) -> tuple:
    port = port or bench.tool_port()
    plan = bench.plan
    for key, value in plan_changes.items():
        setattr(plan, key, value)
    try:
        return provision(Client(port, timeout_s=0.5, retries=8), plan), port
    finally:
        port.close()


def frames_in(data: bytes) -> list[c.Frame]:
    return [f for f in c.FrameDecoder().feed(data) if isinstance(f, c.Frame)]


def test_full_flow_locks_a_blank_box(bench: Bench) -> None:
    outcome, _ = run(bench)
    assert outcome.state == State.LOCKED.value
    assert outcome.steps == ["configure", "keys", "install", "selftest", "lock"]
    config = load_config(bench.paths.config_path)
    assert config.device_id == "er-test-0001" and config.sync is not None
    assert config.sync.host == "127.0.0.1"
    assert (bench.paths.tls_key.stat().st_mode & 0o777) == 0o600
    # /etc's config is a link to the managed copy in the state directory, the one file
    # the sync agent may replace with a signed update (its unit cannot write /etc)
    assert bench.paths.config_path.is_symlink()
    assert bench.paths.config_path.resolve() == bench.paths.managed_config.resolve()
    assert (bench.paths.managed_config.stat().st_mode & 0o777) == 0o640


def test_private_keys_never_in_any_frame(bench: Bench) -> None:
    outcome, port = run(bench)
    assert outcome.state == State.LOCKED.value
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(bench.paths.tls_key.read_bytes(), None)
    secret_int = key.private_numbers().private_value.to_bytes(32, "big")
    ed_pem = (bench.paths.data_dir / "keys" / "device_ed25519.pem").read_bytes()
    ed = serialization.load_pem_private_key(ed_pem, None)
    ed_raw = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
    wire = bytes(port.sent) + bytes(port.received)
    payloads = b"".join(f.payload for f in frames_in(wire))
    assert len(frames_in(bytes(port.received))) > 10
    for needle in (secret_int, ed_raw, bench.paths.tls_key.read_bytes(), ed_pem, b"PRIVATE KEY"):
        assert needle not in payloads and needle not in wire


def test_locked_device_refuses_writes_but_answers_reads(bench: Bench) -> None:
    run(bench)
    port = bench.tool_port()
    client = Client(port, timeout_s=0.5)
    try:
        hello = client.hello()
        assert client.identify().state == State.LOCKED.value
        client.authenticate(bench.plan.secret.encode(), hello.serial)
        with pytest.raises(DeviceError) as err:
            client.upload("settings", b"x")
            client.request(c.MsgType.CONFIGURE, c.ConfigureReq(settings="settings"), c.StateRep)
        assert err.value.code == c.ErrorCode.LOCKED
        for msg_type in (c.MsgType.GENERATE_KEY, c.MsgType.LOCK):
            with pytest.raises(DeviceError) as err:
                client.request(msg_type, c.Empty(), c.StateRep)
            assert err.value.code == c.ErrorCode.LOCKED
    finally:
        port.close()


def test_signed_ticket_unlocks(bench: Bench) -> None:
    run(bench)
    port = bench.tool_port()
    try:
        state = unlock(Client(port, timeout_s=0.5), bench.plan.secret.encode(),
                       bench.pki_dir / "ops-signing.key", time.time())
    finally:
        port.close()
    assert state == State.TESTED.value


def test_ticket_from_another_key_is_refused(bench: Bench, tmp_path) -> None:
    from sync.pki import make_pki

    other = make_pki(tmp_path / "other", ["x1"])
    run(bench)
    port = bench.tool_port()
    try:
        with pytest.raises(DeviceError) as err:
            unlock(Client(port, timeout_s=0.5), bench.plan.secret.encode(),
                   other.ops_signing_key, time.time())
    finally:
        port.close()
    assert err.value.code == c.ErrorCode.BAD_AUTH
    assert bench.agent.state == State.LOCKED


def test_wrong_secret_refused_and_rate_limited_across_restarts(bench: Bench) -> None:
    for _ in range(3):
        with pytest.raises(ProvisionError, match="BAD_AUTH: wrong secret"):
            run(bench, secret="not-the-label")
    with pytest.raises(DeviceError) as err:
        run(bench)  # even the right secret waits now
    assert err.value.code == c.ErrorCode.RATE_LIMITED and err.value.retry_after_s > 0
    bench.restart_agent()
    with pytest.raises(DeviceError) as err:
        run(bench)
    assert err.value.code == c.ErrorCode.RATE_LIMITED
    assert not bench.paths.config_path.exists()


def test_requests_without_session_are_refused(bench: Bench) -> None:
    port = bench.tool_port()
    client = Client(port, timeout_s=0.5)
    try:
        client.hello()
        with pytest.raises(DeviceError) as err:
            client.request(c.MsgType.GENERATE_KEY, c.Empty(), c.StateRep)
        assert err.value.code == c.ErrorCode.BAD_AUTH
        frame = c.Frame(type=0x7E, request_id=1)
        client.link.send(frame)
        reply = client._await(1, 2.0)
        assert reply is not None and reply.is_error
        assert c.unpack(reply.payload, c.ErrorRep).code == c.ErrorCode.UNKNOWN_COMMAND
    finally:
        port.close()


@pytest.mark.parametrize("seed", range(4))
def test_flow_completes_through_a_faulty_transport(bench: Bench, seed: int) -> None:
    port = FaultyPort(bench.tool_port().inner, seed)
    outcome, _ = run(bench, port)
    assert outcome.state == State.LOCKED.value
    assert port.faults, "the seed injected no fault"
    load_config(bench.paths.config_path)


def test_flow_completes_through_a_slow_line(bench: Bench) -> None:
    """Only delays, some longer than the request timeout: the tool retries, the device
    answers the late copy and the retry, and the tool matches each answer once."""
    port = FaultyPort(bench.tool_port().inner, seed=5, rate=0.25, kinds=frozenset({"delay"}))
    outcome, _ = run(bench, port)
    assert outcome.state == State.LOCKED.value
    assert port.faults and set(port.faults) == {"delay"}
    assert max(port.delays_s) > 0.5  # longer than the client's timeout_s
    load_config(bench.paths.config_path)


def test_cable_pulled_at_every_step_is_restartable(bench: Bench) -> None:
    _, full = run(bench)
    total_writes = full.writes
    for cut in range(1, total_writes):
        # a fresh device each time would be slow: undo the lock with the agent's own store
        bench.agent._store.save(State.UNPROVISIONED)
        for path in (bench.paths.config_path, bench.paths.provision_dir / "settings.toml",
                     bench.paths.provision_dir / "install.json"):
            path.unlink(missing_ok=True)
        with pytest.raises((ProvisionError, TransportError)):
            run(bench, SpyPort(bench.tool_port().inner, cut_after_writes=cut))
        if bench.paths.config_path.exists():
            load_config(bench.paths.config_path)  # never half-written
        bench.restart_agent()
        outcome, _ = run(bench)
        assert outcome.state == State.LOCKED.value, cut
