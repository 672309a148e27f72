"""`edge-recorder policy`: the table, `show`, `check`, `sign`/`keygen`, `install`; the policy
in force on an appliance; and docs/COMPLIANCE.md's table against the data file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.cli import main
from firmware.config import Config, parse_config
from firmware.policyfile import PolicyError, parse_policy, public_key_text, sign_policy
from firmware.policystore import (
    BUILTIN_PATH,
    install_policy,
    installed_path,
    load_active_policy,
    signature_path,
)
from firmware.report import policy_markdown
from tests.configtext import REPO
from tests.firmware.policydata import MINI, config_text, signer_line, with_version

BUILTIN_VERSION = parse_policy(BUILTIN_PATH.read_bytes()).version


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_config(tmp_path: Path, policy: str) -> tuple[Config, Path]:
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path / "state", policy))
    return parse_config(path.read_text(), str(path)), path


def signed(tmp_path: Path, key: Ed25519PrivateKey, version: int,
           name: str = "update.toml") -> tuple[Path, Path]:
    path = tmp_path / name
    path.write_bytes(with_version(MINI, version))
    sig = signature_path(path)
    sig.write_bytes(sign_policy(path.read_bytes(), key))
    return path, sig


# --- the table -----------------------------------------------------------------------------
def test_policy_table_is_loud_about_unreviewed_rules(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the table still fits 100
    code, out, _ = run(capsys, "policy")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) == 100, max(lines, key=len)
    assert out.count("UNREVIEWED") == len(list(parse_policy(BUILTIN_PATH.read_bytes()).rules()))
    assert re.search(r"^DE +in +yes +consent_gate", out, re.M)
    assert lines[-1] == "74 of 74 rules are not reviewed by counsel"


def test_policy_table_of_another_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(MINI)
    code, out, _ = run(capsys, "policy", "--file", str(path))
    assert code == 0 and "test-policy v3" in out
    assert out.splitlines()[-1] == "3 of 4 rules are not reviewed by counsel"


# --- show ----------------------------------------------------------------------------------
def test_show_one_decision(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "show", "--country", "DE", "--direction", "outbound")
    assert code == 0
    sha = parse_policy(BUILTIN_PATH.read_bytes()).sha256
    for needle in ("DE outbound (Germany)", "record:     yes", "consent_gate",
                   "StGB §201", "retention:  90 days", "112, 110, 116xxx",
                   "NO - not reviewed by counsel", f"v{BUILTIN_VERSION}", sha):
        assert needle in out, (needle, out)


def test_show_json_with_site_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, config = make_config(tmp_path, 'private_prefix = "*99"\n'
                                      '[policy.overrides.outbound]\nmode = "notice"')
    code, out, _ = run(capsys, "policy", "show", "--country", "de", "--direction", "outbound",
                       "--config", str(config), "--json")
    info = json.loads(out)
    assert code == 0 and info["mode"] == "notice" and info["reviewed"] is False
    assert info["reason"] == "DE outbound rule; site override: mode"
    assert info["emergency_numbers"] == ["112", "110", "116xxx"] and info["sources"]
    code, out, _ = run(capsys, "policy", "show", "--country", "DE", "--direction", "outbound",
                       "--config", str(config), "--json", "--number", "*99 0221 555")
    assert json.loads(out)["reason"] == "private call code"


def test_show_emergency_number(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "show", "--country", "GB", "--direction", "unknown",
                       "--number", "999", "--json")
    info = json.loads(out)
    assert code == 0 and info["emergency"] and info["mode"] == "none" and not info["record"]


@pytest.mark.parametrize(("argv", "status", "needle"), [
    (("--country", "XX", "--direction", "inbound"), 1, "no rules for jurisdiction 'XX'"),
    (("--country", "Germany", "--direction", "inbound"), 2, "not a jurisdiction code"),
    (("--country", "DE", "--direction", "up"), 2, "invalid choice: 'up'"),
    (("--direction", "inbound"), 2, "--country"),
])
def test_show_bad_input(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], status: int,
                       needle: str) -> None:
    code, _, err = run(capsys, "policy", "show", *argv)
    assert code == status
    one_line_error(err, needle)


# --- check, keygen, sign -------------------------------------------------------------------
def test_check_the_builtin_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "check", str(BUILTIN_PATH))
    assert code == 0 and "ok (edge-recorder-policy version" in out
    assert "74 rules, 74 not reviewed by counsel" in out


def test_check_a_broken_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(MINI.replace('mode = "notice"', 'mode = "shout"'))
    code, _, err = run(capsys, "policy", "check", str(path))
    assert code == 1
    one_line_error(err, f"{path}: jurisdictions.DE-BY.inbound.mode: unknown mode 'shout'")


def test_keygen_sign_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pem, path, sig = tmp_path / "ops.pem", tmp_path / "p.toml", tmp_path / "p.toml.sig"
    path.write_text(MINI)
    code, out, _ = run(capsys, "policy", "keygen", "-o", str(pem))
    public = out.strip()
    assert code == 0 and len(public) == 44 and pem.stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "policy", "keygen", "-o", str(pem))
    assert code == 1
    one_line_error(err, "refusing to overwrite")
    code, out, _ = run(capsys, "policy", "sign", str(path), "--key", str(pem), "-o", str(sig))
    assert code == 0 and public in out
    code, out, _ = run(capsys, "policy", "check", str(path), "--sig", str(sig),
                       "--pubkey", public)
    assert code == 0 and "signature ok" in out
    other = public_key_text(Ed25519PrivateKey.generate().public_key())
    code, _, err = run(capsys, "policy", "check", str(path), "--sig", str(sig),
                       "--pubkey", other)
    assert code == 1
    one_line_error(err, "signature does not verify")
    path.write_text(MINI + "\n# tampered\n")
    code, _, err = run(capsys, "policy", "check", str(path), "--sig", str(sig),
                       "--pubkey", public)
    assert code == 1
    one_line_error(err, "signature does not verify")


def test_sign_refuses_an_invalid_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pem, path = tmp_path / "ops.pem", tmp_path / "p.toml"
    run(capsys, "policy", "keygen", "-o", str(pem))
    path.write_text("[meta]\n")
    code, _, err = run(capsys, "policy", "sign", str(path), "--key", str(pem),
                       "-o", str(tmp_path / "p.sig"))
    assert code == 1 and not (tmp_path / "p.sig").exists()
    one_line_error(err, "meta.id: required key is missing")


@pytest.mark.parametrize(("extra", "needle"), [
    (("--sig", "SIG"), "--sig and --pubkey go together"),
    (("--pubkey", "PUB"), "--sig and --pubkey go together"),
    (("--sig", "SIG", "--pubkey", "bad"), "not base64 of a 32-byte Ed25519 public key"),
])
def test_check_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, key: Ed25519PrivateKey,
                            extra: tuple[str, ...], needle: str) -> None:
    path, sig = signed(tmp_path, key, 3)
    values = {"SIG": str(sig), "PUB": public_key_text(key.public_key())}
    code, _, err = run(capsys, "policy", "check", str(path), *(values.get(a, a) for a in extra))
    assert code == 2
    one_line_error(err, needle)


# --- the policy in force, and installing updates -------------------------------------------
def test_builtin_is_in_force_by_default(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path, "")
    policy, problems = load_active_policy(config)
    assert policy is not None and policy.source == str(BUILTIN_PATH) and problems == []


def test_configured_file_must_be_signed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path, sig = signed(tmp_path, key, 1, "site-policy.toml")
    config, _ = make_config(tmp_path, f'file = "{path}"\n{signer_line(key)}')
    policy, problems = load_active_policy(config)
    assert policy is not None and policy.id == "test-policy" and problems == []
    sig.write_bytes(sign_policy(b"something else", key))
    policy, problems = load_active_policy(config)
    assert policy is None
    assert len(problems) == 1 and "signature does not verify" in problems[0]
    sig.unlink()
    policy, problems = load_active_policy(config)
    assert policy is None and "cannot read" in problems[0]


def test_install_newer_then_refuse_older_bad_and_unsigned(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    config, _ = make_config(tmp_path, signer_line(key))
    newer = BUILTIN_VERSION + 1
    path, sig = signed(tmp_path, key, newer)
    installed = install_policy(config, path.read_bytes(), sig.read_bytes())
    assert installed.version == newer
    assert installed_path(config).read_bytes() == path.read_bytes()
    assert signature_path(installed_path(config)).read_bytes() == sig.read_bytes()
    active, problems = load_active_policy(config)
    assert active is not None and active.version == newer and problems == []

    def refused(data: bytes, signature: bytes, match: str) -> None:
        with pytest.raises(PolicyError, match=match):
            install_policy(config, data, signature)
        still, _ = load_active_policy(config)
        assert still is not None and still.sha256 == active.sha256

    same = with_version(MINI, newer)
    refused(same, sign_policy(same, key), f"version {newer} is not newer")
    older = with_version(MINI, 1)
    refused(older, sign_policy(older, key), "version 1 is not newer")
    broken = with_version(MINI, newer + 1).replace(b'mode = "notice"', b'mode = "shout"')
    refused(broken, sign_policy(broken, key), "unknown mode 'shout'")
    good = with_version(MINI, newer + 1)
    refused(good, b"", "not base64 of a 64-byte Ed25519 signature")
    stranger = Ed25519PrivateKey.generate()
    refused(good, sign_policy(good, stranger), "signature does not verify")


def test_damaged_installed_policy_falls_back(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    config, _ = make_config(tmp_path, signer_line(key))
    path, sig = signed(tmp_path, key, BUILTIN_VERSION + 1)
    install_policy(config, path.read_bytes(), sig.read_bytes())
    installed_path(config).write_bytes(with_version(MINI, BUILTIN_VERSION + 5))  # not signed
    active, problems = load_active_policy(config)
    assert active is not None and active.source == str(BUILTIN_PATH)
    assert len(problems) == 1 and "signature does not verify" in problems[0]


def test_install_needs_signers(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    config, _ = make_config(tmp_path, "")
    path, sig = signed(tmp_path, key, BUILTIN_VERSION + 1)
    with pytest.raises(PolicyError, match="no signer keys configured"):
        install_policy(config, path.read_bytes(), sig.read_bytes())
    assert not installed_path(config).exists()


def test_install_command(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         key: Ed25519PrivateKey) -> None:
    _, config = make_config(tmp_path, signer_line(key))
    path, sig = signed(tmp_path, key, BUILTIN_VERSION + 1)
    code, out, _ = run(capsys, "policy", "install", str(path), "--sig", str(sig),
                       "--config", str(config))
    assert code == 0 and f"installed test-policy version {BUILTIN_VERSION + 1}" in out
    code, _, err = run(capsys, "policy", "install", str(path), "--sig", str(sig),
                       "--config", str(config))
    assert code == 1
    one_line_error(err, "is not newer than the policy in force")
    code, out, _ = run(capsys, "policy", "--config", str(config))
    assert code == 0 and f"test-policy v{BUILTIN_VERSION + 1}" in out


def test_real_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "firmware.cli", "policy", "show",
                             "--country", "FR", "--direction", "outbound"],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert result.returncode == 0 and "mode:       manual" in result.stdout


# --- docs/COMPLIANCE.md --------------------------------------------------------------------
def test_compliance_doc_table_matches_the_data() -> None:
    doc = (REPO / "docs" / "COMPLIANCE.md").read_text(encoding="utf-8")
    start, end = "<!-- policy-table:start -->\n", "<!-- policy-table:end -->"
    table = doc[doc.index(start) + len(start):doc.index(end)]
    expected = policy_markdown(parse_policy(BUILTIN_PATH.read_bytes()))
    assert table == expected, ("docs/COMPLIANCE.md is out of date: regenerate the table with "
                               "`edge-recorder policy --markdown`")
