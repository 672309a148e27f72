"""`edge-recorder demo`: a dealer's day on the simulated line, end to end, in under a minute.

Throwaway keys; the day's scenario (examples/dealer-day.toml) runs accelerated through the
real appliance; then the catalogue, one recording decrypted with the central key (the
device itself cannot), and the audit chain verified.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from drivers.clock import SystemClock
from firmware.agecrypt import Identity, NoMatchingIdentity
from firmware.audit import verify_audit
from firmware.catalogue import Catalogue
from firmware.config import load_config
from firmware.daemon import Appliance
from firmware.fsutil import atomic_write
from firmware.keys import load_public_key
from firmware.recfile import decrypt_recording, write_wav
from firmware.report import calls_table, recordings_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = REPO / "examples" / "dealer-day.toml"

CONFIG_TEMPLATE = """\
# Written by `edge-recorder demo`.
device_id = "demo-0001"
site = "Autohaus Demo, Koeln"
jurisdiction = "DE"

[storage]
data_dir = "data"

[keys]
recipients = ["{recipient}"]

[limits]
flush_interval_s = 2.0

[[lines]]
id = "line1"
backend = "sim"
[lines.options]
scenario = "{scenario}"
speed = {speed}
"""


class DemoError(Exception):
    """The demo could not run (one-line message)."""


def run_demo(out_dir: Path | None, speed: float, scenario: Path | None) -> int:
    console = Console()
    scenario = (scenario or DEFAULT_SCENARIO).resolve()
    if not scenario.is_file():
        raise DemoError(f"{scenario}: demo scenario not found")
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="edge-recorder-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "data").exists():
        raise DemoError(f"{out_dir}: holds an earlier demo; give an empty --out folder")
    logging.getLogger().setLevel(logging.WARNING)
    started = time.monotonic()

    console.rule("[bold]1. Keys and configuration")
    central = Identity.generate()
    atomic_write(out_dir / "central.key", f"{central}\n".encode(), 0o600)
    config_path = out_dir / "config.toml"
    atomic_write(config_path, CONFIG_TEMPLATE.format(
        recipient=central.recipient, scenario=scenario, speed=speed).encode(), 0o644)
    console.print(f"central store key (kept OFF the device): {out_dir / 'central.key'}")
    console.print(f"device config: {config_path} (holds only the public recipient)")

    console.rule("[bold]2. A dealer's day on the simulated line")
    config = load_config(config_path)
    app = Appliance(config, clock=SystemClock())
    _run_with_status(console, app)
    console.print(f"device signing key generated on first start: {config.device_key_path}")

    console.rule("[bold]3. What the policy decided, and what was recorded")
    catalogue = Catalogue.read_only(config.catalogue_path)
    calls = catalogue.calls()
    console.print(calls_table(calls, _outcomes(catalogue),
                              title=f"{len(calls)} calls under the {config.jurisdiction} policy"))
    rows = catalogue.recordings()
    console.print(recordings_table(list(reversed(rows)), title=f"{len(rows)} recordings"))

    console.rule("[bold]4. Decrypt one recording with the central key")
    _decrypt_one(console, rows, central, out_dir)

    console.rule("[bold]5. Verify the audit trail (public key only)")
    report = verify_audit(config.catalogue_path,
                          load_public_key(Path(f"{config.device_key_path}.pub")),
                          device_id=config.device_id, check_files=True)
    console.print(("[green]" if report.ok else "[red]") + report.message)
    console.print(f"\ndemo files: {out_dir}   ({time.monotonic() - started:.1f} s)")
    console.print(f"try: edge-recorder recordings list --config {config_path}")
    return 0 if report.ok else 1


_OUTCOMES = {"keep_held": "whole call", "decline": "nothing: no consent key",
             "drop_held": "nothing", "start": "from the consent key or start code",
             "pause": "paused", "erase": "erased (objection)"}


def _outcomes(catalogue: Catalogue) -> dict[str, str]:
    """Per call, what its gate entries in the audit trail say was kept."""
    seen: dict[str, list[str]] = {}
    for entry in catalogue.audit_entries():
        if entry.kind == "gate":
            action = json.loads(entry.data)["action"] if isinstance(entry.data, str) else (
                entry.data["action"])
            seen.setdefault(entry.subject, []).append(action)
    out = {}
    for call_id, actions in seen.items():
        last = actions[-1]
        text = _OUTCOMES.get(last, last)
        if "pause" in actions and last == "resume":
            text = "all but a paused stretch (card details)"
        elif last == "drop_held" and len(actions) == 1:
            text = "nothing: ended before a consent key"
        out[call_id] = text
    return out


def _run_with_status(console: Console, app: Appliance) -> None:
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(app.run(until_lines_end=True)))
    with console.status("recording...") as status:
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            runner = app.runners[0] if app.runners else None
            if runner is not None:
                seconds = runner.engine.now / 8000
                status.update(f"line time {int(seconds // 60)}:{int(seconds % 60):02d}, "
                              f"state {runner.engine.state}")
    if not result or result[0] != 0:
        raise DemoError("the appliance stopped with an error (see the log above)")


def _decrypt_one(console: Console, rows: list[dict], central: Identity, out: Path) -> None:
    answered = [r for r in rows if r.get("answered_offset_s") is not None and r.get("size")]
    if not answered:
        raise DemoError("no answered call was recorded")
    row = max(answered, key=lambda r: r.get("audio_s") or 0)
    path = Path(row["path"])
    try:
        decrypt_recording(path, [Identity.generate()])
    except NoMatchingIdentity as exc:
        console.print(f"the device holds no private key; any other key fails: [red]{exc}")
    rec = decrypt_recording(path, [central])
    wav = out / f"{row['id']}.wav"
    write_wav(wav, rec.pcm)
    console.print(f"central store decrypts {path.name}: {len(rec.pcm) / 8000:.1f} s of audio, "
                  f"{'complete' if rec.complete else 'interrupted'} -> {wav}")
