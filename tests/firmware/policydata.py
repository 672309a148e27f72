"""A small policy file for the compliance tests, and helpers to sign and configure it."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.policyfile import public_key_text
from tests.configtext import device_config

MINI = """\
[meta]
id = "test-policy"
version = 3
published = "2026-01-01"

[defaults]
beep = { freq_hz = 1400.0, duration_s = 0.5, period_s = 15.0 }
consent_timeout_s = 10.0
consent_digits = "1"

[jurisdictions.DE]
name = "Germany"
languages = ["de"]
emergency = ["112", "110", "116xxx"]
[jurisdictions.DE.inbound]
record = true
mode = "consent_gate"
basis = "consent"
retention_days = 90
sources = ["StGB 201"]
reviewed = true
notes = "DE notes"
[jurisdictions.DE.outbound]
record = false
mode = "none"
basis = "not recorded"
retention_days = 30
sources = ["StGB 201"]

[jurisdictions.DE-BY]
name = "Bavaria"
parent = "DE"
beep = { freq_hz = 1000.0, duration_s = 0.2, period_s = 10.0 }
[jurisdictions.DE-BY.inbound]
mode = "notice"
"""


def with_version(text: str, version: int) -> bytes:
    return text.replace("version = 3", f"version = {version}", 1).encode()


def config_text(data_dir: Path, policy: str = "") -> str:
    """A valid appliance config with its state in ``data_dir`` and a ``[policy]`` table."""
    return device_config(data_dir=data_dir, tail=f"[policy]\n{policy}\n")


def signer_line(*keys: Ed25519PrivateKey) -> str:
    return "signers = [" + ", ".join(f'"{public_key_text(k.public_key())}"'
                                     for k in keys) + "]"
