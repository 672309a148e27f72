"""Unit files pass `systemd-analyze verify` (any stderr output is a failure) and score as
hardened in `systemd-analyze security --offline`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
TARGETS = ("sysinit.target", "basic.target", "multi-user.target", "local-fs.target",
           "time-sync.target", "shutdown.target", "sockets.target", "paths.target",
           "timers.target", "slices.target", "network-online.target", "network.target")
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (make installs it)")


def fake_root(tmp: Path, unit: Path) -> Path:
    """A root with the unit, the targets it names and its ExecStart binary."""
    system = tmp / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    shutil.copy(unit, system)
    for target in TARGETS:
        src = Path("/lib/systemd/system") / target
        if src.exists():
            shutil.copy(src, system)
    for exe in re.findall(r"^Exec\w+=[-@:+!]*(\S+)", unit.read_text(), re.MULTILINE):
        binary = tmp / exe.lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return tmp


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies_cleanly(tmp_path: Path, unit: Path) -> None:
    root = fake_root(tmp_path, unit)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit.name],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_is_hardened(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_only_the_sync_agent_reaches_the_network() -> None:
    recorder = unit_settings(REPO / "systemd" / "edge-recorder.service")
    agent = unit_settings(REPO / "systemd" / "edge-recorder-sync.service")
    assert recorder["Service.PrivateNetwork"] == ["yes"]
    assert recorder["Service.RestrictAddressFamilies"] == ["AF_UNIX"]
    assert "Service.PrivateNetwork" not in agent
    assert agent["Service.RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert agent["Service.ExecStart"] == [
        "/opt/edge-recorder/bin/edge-recorder sync --config /etc/edge-recorder/config.toml"]
    assert "network-online.target" in agent["Unit.After"][0].split()
    assert "network-online.target" in agent["Unit.Wants"][0].split()
    assert agent["Service.Restart"] == ["on-failure"]
    assert float(agent["Service.RestartSec"][0]) >= 1


def test_sync_agent_writes_only_its_state_directory() -> None:
    agent = unit_settings(REPO / "systemd" / "edge-recorder-sync.service")
    assert agent["Service.ProtectSystem"] == ["strict"]
    assert agent["Service.ProtectHome"] == ["yes"]
    assert agent["Service.StateDirectory"] == ["edge-recorder"]
    for key in ("ReadWritePaths", "LogsDirectory", "CacheDirectory", "RuntimeDirectory"):
        assert f"Service.{key}" not in agent, key
    assert agent["Service.User"] == ["edge-recorder"]


def test_provisioning_agent_keeps_the_console_getty_off_its_port() -> None:
    text = (REPO / "systemd" / "edge-recorder-provision.service").read_text()
    port = re.search(r"provision-agent --port /dev/(\S+)", text)
    assert port and port.group(1) == "serial0"
    conflicts = re.search(r"^Conflicts=(.*)$", text, re.MULTILINE)
    assert conflicts and "serial-getty@ttyS0.service" in conflicts.group(1)
    assert "serial-getty@ttyAMA0.service" in conflicts.group(1)
    assert "serial-getty@ttyGS0.service" in conflicts.group(1)
