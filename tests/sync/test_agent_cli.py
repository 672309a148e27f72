"""`edge-recorder sync`: configuration mistakes end in one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firmware.config import ConfigError, parse_config
from tests.configtext import device_config
from tests.sync.uploadkit import REPO

BASE = device_config(device_id="dev-a", site="s")
SYNC = '[sync]\nhost = "localhost"\nca_file = "ca.crt"\ncert_file = "d.crt"\nkey_file = "d.key"\n'


def run_sync(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "sync", "--config",
                           str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


def test_sync_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(BASE + SYNC, str(tmp_path / "c.toml"))
    assert config.sync is not None
    assert (config.sync.port, config.sync.chunk_kib, config.sync.window) == (8883, 120, 20)
    assert config.resolve_path(config.sync.ca_file) == tmp_path / "ca.crt"
    assert config.sync.central_public_key is None  # receipts kept unverified
    key = "A" * 43 + "="  # base64 of 32 zero bytes: the shape is all config checks
    pinned = parse_config(BASE + SYNC + f'central_public_key = "{key}"\n', "c.toml")
    assert pinned.sync is not None and pinned.sync.central_public_key == key


@pytest.mark.parametrize(("extra", "needle"), [
    ("chunk_kib = 0\n", "c.toml: sync.chunk_kib: expected `int` >= 1"),
    ("window = 100\n", "c.toml: sync.window: expected `int` <= 64"),
    ("reconnect_min_s = 9\nreconnect_max_s = 2\n", "c.toml: sync.reconnect_min_s: 9 is above"),
    ("colour = 1\n", "c.toml: sync.colour: unknown key"),
    ('central_public_key = "c2hvcnQ="\n',
     "c.toml: sync.central_public_key: not base64 of a 32-byte Ed25519 public key"),
    ("central_public_key = 7\n", "c.toml: sync.central_public_key: expected `str | null`"),
])
def test_sync_table_errors_name_the_key(extra: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + SYNC + extra, "c.toml")
    assert str(caught.value).startswith(needle), caught.value


def test_cli_without_sync_table_or_files(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(BASE)
    done = run_sync(config)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("sync: the [sync] table is missing"), done.stderr
    assert done.stderr.count("\n") == 1
    config.write_text(BASE + SYNC)
    done = run_sync(config)
    assert done.returncode == 1 and "sync.ca_file" in done.stderr and "ca.crt" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
