"""The commands as an engineer and ops run them: `edge-recorder provision` with a plan file,
the company PKI path (CSR out, signed by the real openssl CLI, certificate in), field unlock
with a ticket from `python -m provisioning.tool sign-ticket`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioning.state import State
from provisioning.tool import make_ticket, write_doc

from .conftest import REPO, Bench

pytestmark = pytest.mark.timeout(90)


def edge_recorder(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def sign_ticket(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioning.tool", "sign-ticket", *args],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=60)


def write_plan(bench: Bench, path: Path, *, pki: bool = True) -> Path:
    plan = bench.plan
    secret = bench.tmp / "label-secret"
    secret.write_text(plan.secret or "")
    assert plan.install is not None and plan.settings_file is not None
    text = (f'secret_file = "{secret}"\nsettings_file = "{plan.settings_file}"\n'
            f'selftests = ["clock", "disk"]\nselftest_timeout_s = 2.0\nlock = true\n\n'
            f'[install]\nbroker_host = "{plan.install.broker_host}"\n'
            f'broker_port = {plan.install.broker_port}\n'
            f'ops_public_key = "{plan.install.ops_public_key}"\n')
    if pki:
        text += f'\n[pki]\nca_cert = "{bench.pki_dir / "ca.crt"}"\n' \
                f'ca_key = "{bench.pki_dir / "ca.key"}"\n'
    path.write_text(text)
    return path


def provisioned(bench: Bench) -> Path:
    plan = write_plan(bench, bench.tmp / "plan.toml")
    done = edge_recorder("provision", "--port", bench.slave_path, "--plan", str(plan), "--yes")
    assert done.returncode == 0, done.stderr
    return plan


def test_plan_file_provisions_and_locks(bench: Bench) -> None:
    provisioned(bench)
    assert bench.agent.state == State.LOCKED


def test_bad_plan_is_one_line_and_exit_1(bench: Bench) -> None:
    plan = bench.tmp / "bad.toml"
    plan.write_text('selftests = ["clock", "teleport"]\n')
    done = edge_recorder("provision", "--port", bench.slave_path, "--plan", str(plan))
    assert done.returncode == 1
    assert done.stderr.strip() == f"edge-recorder: error: {plan}: selftests: unknown 'teleport'"


def test_no_plan_without_a_terminal_is_one_line_not_a_prompt(bench: Bench) -> None:
    done = edge_recorder("provision", "--port", bench.slave_path)  # stdin is /dev/null
    assert done.returncode == 1
    assert done.stderr.startswith("edge-recorder: error: provision: no --plan or --settings")
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout
    assert bench.agent.state == State.UNPROVISIONED


def test_company_pki_csr_out_then_signed_certificate(bench: Bench) -> None:
    plan = write_plan(bench, bench.tmp / "plan.toml", pki=False)
    csr = bench.tmp / "device.csr"
    port = ("--port", bench.slave_path, "--plan", str(plan), "--yes")
    done = edge_recorder("provision", *port, "--csr-out", str(csr))
    assert done.returncode == 0, done.stderr
    assert "CSR written" in done.stdout and bench.agent.state == State.KEYED
    ext = bench.tmp / "client.ext"
    ext.write_text("basicConstraints = critical, CA:FALSE\nextendedKeyUsage = clientAuth\n")
    cert = bench.tmp / "device.crt"
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA",
                    str(bench.pki_dir / "ca.crt"), "-CAkey", str(bench.pki_dir / "ca.key"),
                    "-CAcreateserial", "-CAserial", str(bench.tmp / "ca.srl"), "-days", "30",
                    "-sha256", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    done = edge_recorder("provision", *port, "--certificate", str(cert), "--ca-chain",
                         str(bench.pki_dir / "ca.crt"))
    assert done.returncode == 0, done.stderr
    assert bench.agent.state == State.LOCKED
    assert bench.paths.certificate.read_bytes() == cert.read_bytes()


def test_certificate_for_another_key_is_refused(bench: Bench) -> None:
    plan = write_plan(bench, bench.tmp / "plan.toml", pki=False)
    port = ("--port", bench.slave_path, "--plan", str(plan), "--yes")
    assert edge_recorder("provision", *port, "--csr-out", str(bench.tmp / "x.csr")).returncode == 0
    other = bench.pki_dir / "clients" / "er-test-0001.crt"
    done = edge_recorder("provision", *port, "--certificate", str(other), "--ca-chain",
                         str(bench.pki_dir / "ca.crt"))
    assert done.returncode == 1 and "not for this device's TLS key" in done.stderr
    assert bench.agent.state == State.KEYED


def unlock_args(bench: Bench, plan: Path, *extra: str) -> tuple[str, ...]:
    return ("provision", "unlock", "--port", bench.slave_path, "--plan", str(plan), *extra)


def challenge(bench: Bench, plan: Path) -> Path:
    path = bench.tmp / "challenge.json"
    done = edge_recorder(*unlock_args(bench, plan, "--challenge-out", str(path)))
    assert done.returncode == 0, done.stderr
    return path


def test_field_unlock_with_ops_ticket_works_once(bench: Bench) -> None:
    plan = provisioned(bench)
    doc = json.loads(challenge(bench, plan).read_text())
    assert doc["device_id"] == "er-test-0001" and doc["state"] == State.LOCKED.value
    assert len(bytes.fromhex(doc["nonce"])) == 16
    ticket = bench.tmp / "ticket.json"
    signed = sign_ticket("--key", str(bench.pki_dir / "ops-signing.key"), "--challenge",
                         str(bench.tmp / "challenge.json"), "-o", str(ticket))
    assert signed.returncode == 0, signed.stderr
    done = edge_recorder(*unlock_args(bench, plan, "--ticket", str(ticket)))
    assert done.returncode == 0, done.stderr
    assert bench.agent.state == State.TESTED
    bench.agent._store.save(State.LOCKED)  # locked again, as after a new provisioning run
    replay = edge_recorder(*unlock_args(bench, plan, "--ticket", str(ticket)))
    assert replay.returncode == 1 and "nonce" in replay.stderr
    assert bench.agent.state == State.LOCKED


def test_expired_ticket_is_refused(bench: Bench) -> None:
    plan = provisioned(bench)
    doc = json.loads(challenge(bench, plan).read_text())
    ticket = bench.tmp / "old.json"
    write_doc(ticket, make_ticket(doc, bench.pki_dir / "ops-signing.key", time.time() - 7200,
                                  3600))
    done = edge_recorder(*unlock_args(bench, plan, "--ticket", str(ticket)))
    assert done.returncode == 1 and "expired" in done.stderr
    assert bench.agent.state == State.LOCKED


def test_ticket_for_another_device_is_refused(bench: Bench) -> None:
    plan = provisioned(bench)
    doc = json.loads(challenge(bench, plan).read_text())
    ticket = bench.tmp / "other.json"
    write_doc(ticket, make_ticket({**doc, "serial": "10000000deadbeef"},
                                  bench.pki_dir / "ops-signing.key", time.time()))
    done = edge_recorder(*unlock_args(bench, plan, "--ticket", str(ticket)))
    assert done.returncode == 1 and "for serial '10000000deadbeef'" in done.stderr
    assert bench.agent.state == State.LOCKED


def test_sign_ticket_rejects_a_non_challenge(tmp_path: Path, pki_dir: Path) -> None:
    bogus = tmp_path / "c.json"
    bogus.write_text('{"kind": "something else"}')
    done = sign_ticket("--key", str(pki_dir / "ops-signing.key"), "--challenge", str(bogus),
                       "-o", str(tmp_path / "t.json"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {bogus}: kind: not an edge-recorder unlock challenge"
