"""Arguments of `provision` and `provision-agent`; imports nothing heavy, so building the
command line stays fast (the commands themselves live in provisioning/commands.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_BAUD = 115_200  # the Pi's /dev/serial0 console rate and the common USB-serial default
ALL_SELFTESTS = ("line", "mqtt", "clock", "disk")


def add_provision_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["unlock"], default=None,
                   help="unlock: field unlock of a locked device (--challenge-out, --ticket)")
    p.add_argument("--port", required=True, help="serial port or pyserial URL")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD)
    p.add_argument("--plan", type=Path, default=None, help="TOML plan (non-interactive)")
    p.add_argument("--secret-file", type=Path, default=None, help="label secret")
    p.add_argument("--settings", type=Path, default=None,
                   help="site settings TOML (config schema without storage/sync/trust)")
    p.add_argument("--ca-cert", type=Path, default=None, help="local CA certificate (bench)")
    p.add_argument("--ca-key", type=Path, default=None, help="local CA key (bench)")
    p.add_argument("--csr-out", type=Path, default=None, help="write the CSR here and stop")
    p.add_argument("--certificate", type=Path, default=None, help="signed certificate")
    p.add_argument("--chain", "--ca-chain", dest="chain", type=Path, default=None,
                   help="CA chain to install (default --ca-cert)")
    p.add_argument("--broker", default=None, help="broker HOST[:PORT]")
    p.add_argument("--ops-public-key", default=None, help="base64 Ed25519 ops key")
    p.add_argument("--selftests", default=None, help=f"comma list of {','.join(ALL_SELFTESTS)}")
    p.add_argument("--lock", action="store_true", help="lock after passing self-tests")
    p.add_argument("--yes", action="store_true", help="ask nothing (bulk work)")
    p.add_argument("--unlock-key", type=Path, default=None,
                   help="unlock: sign the ticket here with this ops key (bench)")
    p.add_argument("--challenge-out", type=Path, default=None,
                   help="unlock: write the device's challenge here for ops to sign")
    p.add_argument("--ticket", type=Path, default=None,
                   help="unlock: the ticket ops signed (python -m provisioning.tool sign-ticket)")


def add_agent_arguments(p: argparse.ArgumentParser, default_config: Path) -> None:
    p.add_argument("--port", required=True, help="/dev/serial0, /dev/ttyGS0 or pyserial URL")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUD)
    p.add_argument("--config", type=Path, default=default_config, help="config file to write")
    p.add_argument("--data-dir", type=Path, default=Path("/var/lib/edge-recorder"))
    p.add_argument("--secret-file", type=Path, default=Path("/etc/edge-recorder/label-secret"),
                   help="the label secret written at the factory")
    p.add_argument("--serial", default=None, help="serial number (default: the board's)")
