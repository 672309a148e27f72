"""Configuration: the example is valid; every kind of mistake gives one line naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firmware.config import ConfigError, load_config, parse_config
from tests.configtext import RECIPIENT, device_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "config.toml"
GOOD = device_config()


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device_id == "er-de-0001" and cfg.jurisdiction == "DE"
    assert cfg.recordings_dir == Path("/var/lib/edge-recorder/recordings")
    assert cfg.catalogue_path == Path("/var/lib/edge-recorder/catalogue.db")
    assert cfg.line_country(cfg.lines[0]) == "DE"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD.replace('[keys]', '[storage]\ndata_dir = "state"\n[keys]'))
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.device_key_path == tmp_path / "state" / "keys" / "device_ed25519.pem"
    assert cfg.limits.flush_interval_s == 2.0 and cfg.limits.max_segment_s == 3600


@pytest.mark.parametrize(("edit", "expected"), [
    (("site = \"Test site\"", "site = \"Test site\"\ncolour = \"blue\""), "c.toml: colour: unknown key"),
    (("jurisdiction = \"DE\"", "jurisdiction = \"Germany\""), "c.toml: jurisdiction: expected `str` matching"),
    (("jurisdiction = \"DE\"", "jurisdiction = 49"), "c.toml: jurisdiction: expected `str`, got `int`"),
    (("[keys]", "[limits]\nring_timeout_s = 100\n[keys]"), "c.toml: limits.ring_timeout_s: expected `float` <= 30"),
    (("[keys]", "[limits]\nflush_interval_s = 5.0\n[keys]"), "c.toml: limits.flush_interval_s: expected `float` <= 2.0"),
    (("[keys]", "[limits]\nflsh = 1\n[keys]"), "c.toml: limits.flsh: unknown key"),
    (("device_id = \"er-1\"\n", ""), "c.toml: device_id: required key is missing"),
    ((f'"{RECIPIENT}"', '"age1notakey"'), "c.toml: keys.recipients[0]: expected `str` matching"),
    (("backend = \"sim\"", "backend = \"carrier-pigeon\""), "c.toml: lines[0]: unknown line backend 'carrier-pigeon'"),
    (("[lines.options]", "[lines.options]\nwarp = 9"), "c.toml: lines[0]: sim options: Object contains unknown field `warp`"),
    (("id = \"line1\"", "id = \"line 1!\""), "c.toml: lines[0].id: expected `str` matching"),
    (("[keys]", "[keys"), "c.toml: not valid TOML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, edit: tuple[str, str],
                                               expected: str) -> None:
    path = tmp_path / "c.toml"
    assert edit[0] in GOOD
    path.write_text(GOOD.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path)), message
    assert expected in message, message


def test_duplicate_line_ids_rejected() -> None:
    text = GOOD + GOOD[GOOD.index("[[lines]]"):]
    with pytest.raises(ConfigError, match=r"lines\[1\].id: duplicate line id 'line1'"):
        parse_config(text, "x.toml")


def test_bad_recipient_checksum_rejected() -> None:
    broken = RECIPIENT[:-1] + ("q" if RECIPIENT[-1] != "q" else "p")
    with pytest.raises(ConfigError, match=r"keys.recipients\[0\]: not a valid age recipient"):
        parse_config(GOOD.replace(RECIPIENT, broken), "x.toml")


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=False)


def test_cli_config_check_ok_and_bad(tmp_path: Path) -> None:
    ok = run_cli("config", "check", str(EXAMPLE))
    assert ok.returncode == 0 and "ok" in ok.stdout
    path = tmp_path / "c.toml"
    path.write_text(GOOD.replace("jurisdiction = \"DE\"", "jurisdiction = \"DEU\""))
    bad = run_cli("config", "check", str(path))
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "jurisdiction" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- [policy] ------------------------------------------------------------------------------
SIGNER = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 7.1 test 1 public key


def test_policy_table_parses_and_resolves_paths(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD + f"""
[policy]
file = "policy.toml"
signers = ["{SIGNER}"]
language = "de"
country_code = "49"
dial_prefixes = ["0"]
private_prefix = "*99"
do_not_record = ["+49 221 123456", "0221 555 000", "(0221) 555-001"]
[policy.overrides.outbound]
mode = "notice"
retention_days = 30
[policy.overrides.inbound]
record = false
""")
    cfg = load_config(path)
    assert cfg.policy_file_path == tmp_path / "policy.toml"
    assert cfg.policy.overrides.outbound is not None
    assert cfg.policy.overrides.outbound.mode == "notice"
    assert cfg.policy.overrides.inbound is not None
    assert cfg.policy.overrides.inbound.record is False
    assert cfg.policy_dir == Path("/var/lib/edge-recorder/policy")


def test_policy_defaults() -> None:
    cfg = parse_config(GOOD, "x.toml")
    assert cfg.policy_file_path is None and cfg.policy.signers == []
    assert cfg.policy.do_not_record == [] and cfg.policy.private_prefix is None


@pytest.mark.parametrize(("policy", "expected"), [
    ('colour = "red"', "policy.colour: unknown key"),
    ('signers = ["not-a-key"]', "policy.signers[0]: not base64 of a 32-byte Ed25519 public key"),
    ('signers = ["AAAA"]', "policy.signers[0]: not base64 of a 32-byte Ed25519 public key"),
    ('file = "p.toml"', "policy.signers: needed when policy.file is set"),
    ('language = "German"', "policy.language: expected `str` matching"),
    ('country_code = "049"', "policy.country_code: expected `str` matching"),
    ('country_code = 49', "policy.country_code: expected `str | null`, got `int`"),
    ('dial_prefixes = ["0a"]', "policy.dial_prefixes[0]: expected `str` matching"),
    ('private_prefix = "*99 "', "policy.private_prefix: expected `str` matching"),
    ('do_not_record = ["call me"]', "policy.do_not_record[0]: expected `str` matching"),
    ('do_not_record = ["+"]', "policy.do_not_record[0]: expected `str` matching"),
    ('[policy.overrides.outbound]\nmode = "loud"', "policy.overrides.outbound.mode: invalid enum value 'loud'"),
    ('[policy.overrides.outbound]\nretention_days = 0', "policy.overrides.outbound.retention_days: expected `int` >= 1"),
    ('[policy.overrides.sideways]\nmode = "notice"', "policy.overrides.sideways: unknown key"),
    ('[policy.overrides.inbound]\nrecord = false\nmode = "notice"', 'policy.overrides.inbound: record = false needs mode "none"'),
    ('[policy.overrides.inbound]\nrecord = true\nmode = "none"', 'policy.overrides.inbound: mode "none" needs record = false'),
])
def test_bad_policy_settings_name_the_key(policy: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD + "\n[policy]\n" + policy + "\n", "c.toml")
    message = str(info.value)
    assert message.startswith("c.toml: ") and "\n" not in message, message
    assert expected in message, message


@pytest.mark.parametrize("device_id", ["central", "OPS"])
def test_central_identities_are_not_device_ids(device_id: str) -> None:
    import re

    text = re.sub(r'device_id = "[^"]*"', f'device_id = "{device_id}"', GOOD, count=1)
    with pytest.raises(ConfigError, match=r"device_id: .* is reserved"):
        parse_config(text, "c.toml")
