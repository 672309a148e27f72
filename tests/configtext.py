"""A valid appliance configuration for tests: one simulated line playing the dealer's day.

The packages' tests build their configuration files from this one text instead of each
writing its own copy.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A valid age recipient whose identity exists nowhere: what is sealed to it stays sealed.
RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
DEALER_DAY = REPO / "examples" / "dealer-day.toml"


def device_config(*, device_id: str = "er-1", site: str = "Test site",
                  data_dir: Path | str | None = None, recipient: str = RECIPIENT,
                  tail: str = "") -> str:
    """The text of a config (leading newline included): ``[storage]`` only with
    ``data_dir``; ``tail`` (tables such as ``[sync]`` or ``[policy]``) goes at the end."""
    storage = "" if data_dir is None else f'[storage]\ndata_dir = "{data_dir}"\n'
    return f"""
device_id = "{device_id}"
site = "{site}"
jurisdiction = "DE"
{storage}[keys]
recipients = ["{recipient}"]
[[lines]]
id = "line1"
backend = "sim"
[lines.options]
scenario = "{DEALER_DAY}"
{tail}"""
