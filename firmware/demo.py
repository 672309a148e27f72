"""`edge-recorder demo`: a dealer's day on the simulated line, end to end, in under a minute.

Throwaway keys and a throwaway PKI; a local mosquitto with mutual TLS and the central
store (sync/demo.py); the day's scenario (examples/dealer-day.toml) runs accelerated
through the real appliance while the sync agent uploads each recording as it closes; then
the catalogue, what central confirmed (sha256 on both sides, latency), central's
countersignature of the audit trail, the fleet status ops sees, one recording decrypted
from central's copy with the central key (the device itself cannot), and the audit chain
verified. Everything started is stopped at the end, on errors too.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from drivers.clock import SystemClock
from firmware.agecrypt import Identity, NoMatchingIdentity
from firmware.audit import verify_audit
from firmware.catalogue import Catalogue
from firmware.config import Config, load_config
from firmware.daemon import Appliance
from firmware.fsutil import atomic_write
from firmware.keys import load_or_create_signing_key, load_public_key, public_key_path
from firmware.recfile import decrypt_recording, write_wav
from firmware.report import calls_table, recordings_table

if TYPE_CHECKING:
    from sync.demo import SyncStack

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = REPO / "examples" / "dealer-day.toml"
DEVICE_ID = "demo-0001"
SYNC_TIMEOUT_S = 30.0  # every recording confirmed and the trail countersigned by then

CONFIG_TEMPLATE = """\
# Written by `edge-recorder demo`.
device_id = "{device_id}"
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
    from sync.demo import SyncStack  # the network half; firmware does not need sync

    console = Console()
    scenario = (scenario or DEFAULT_SCENARIO).resolve()
    if not scenario.is_file():
        raise DemoError(f"{scenario}: demo scenario not found")
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="edge-recorder-demo-"))
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "data").exists() or (out_dir / "sync").exists():
        raise DemoError(f"{out_dir}: holds an earlier demo; give an empty --out folder")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("sync.central").setLevel(logging.ERROR)  # logs its clean stop as a warning
    started = time.monotonic()
    with SyncStack(out_dir / "sync", DEVICE_ID) as stack:
        ok = _tour(console, stack, out_dir, speed, scenario)
    console.print("broker, central store and sync agent stopped")
    console.print(f"\ndemo files: {out_dir}   ({time.monotonic() - started:.1f} s)")
    console.print(f"try: edge-recorder recordings list --config {out_dir / 'config.toml'}")
    return 0 if ok else 1


def _tour(console: Console, stack: SyncStack, out_dir: Path, speed: float,
          scenario: Path) -> bool:
    console.rule("[bold]1. Keys, test PKI, broker and configuration")
    central = Identity.generate()
    atomic_write(out_dir / "central.key", f"{central}\n".encode(), 0o600)
    stack.start_network()
    config_path = out_dir / "config.toml"
    atomic_write(config_path, (CONFIG_TEMPLATE.format(
        device_id=DEVICE_ID, recipient=central.recipient, scenario=scenario, speed=speed)
        + stack.config_tables()).encode(), 0o644)
    config = load_config(config_path)
    _prepare_device(stack, config)
    assert stack.broker is not None
    console.print(f"central store key (kept OFF the device): {out_dir / 'central.key'}")
    console.print(f"device signing key (made on the device; central holds its public half): "
                  f"{config.device_key_path}")
    console.print(f"mosquitto with mutual TLS on {stack.broker.host}:{stack.broker.port}; "
                  f"test PKI in {out_dir / 'sync' / 'pki'}")
    console.print(f"device config: {config_path} (public recipient, its own certificate, "
                  "central's and ops' public keys)")

    console.rule("[bold]2. A dealer's day on the simulated line, the sync agent running")
    stack.start_sync(config)
    _run_with_status(console, Appliance(config, clock=SystemClock()), stack)

    console.rule("[bold]3. What the policy decided, and what was recorded")
    catalogue = Catalogue.read_only(config.catalogue_path)
    calls = catalogue.calls()
    console.print(calls_table(calls, _outcomes(catalogue),
                              title=f"{len(calls)} calls under the {config.jurisdiction} policy"))
    rows = catalogue.recordings()
    console.print(recordings_table(list(reversed(rows)), title=f"{len(rows)} recordings"))

    console.rule("[bold]4. Confirmed by the central store")
    synced = _show_sync(console, stack, catalogue)

    console.rule("[bold]5. Decrypt central's copy with the central key")
    _decrypt_one(console, rows, central, out_dir, stack)

    console.rule("[bold]6. Verify the audit trail (public key only)")
    report = verify_audit(config.catalogue_path,
                          load_public_key(public_key_path(config.device_key_path)),
                          device_id=config.device_id, check_files=True)
    console.print(("[green]" if report.ok else "[red]") + report.message)
    catalogue.close()
    return report.ok and synced


def _prepare_device(stack: SyncStack, config: Config) -> None:
    """What provisioning does: the device makes its signing key and central learns the
    public half. The catalogue is created here too, before any thread runs (the recorder
    would fork a child for it, and forking a threaded process is unsafe)."""
    load_or_create_signing_key(config.device_key_path)
    stack.register_device(public_key_path(config.device_key_path))
    Catalogue(config.catalogue_path, clock=SystemClock(), device_id=config.device_id).close()


def _show_sync(console: Console, stack: SyncStack, catalogue: Catalogue) -> bool:
    from sync.demo import HEARTBEAT_S, arrivals_table, status_line

    stack.wait_synced(catalogue, SYNC_TIMEOUT_S)
    arrivals = stack.arrivals(catalogue)
    console.print(arrivals_table(arrivals, title=f"{len(arrivals)} recordings uploaded, "
                                 "synced once central answered stored"))
    receipt = catalogue.latest_receipt()
    if receipt is not None:
        console.print(f"audit receipt: central countersigned {receipt['count']} entries, "
                      f"head {str(receipt['head_hash'])[:16]}, key "
                      f"{receipt['central_key_id']} (signature verified before storing)")
    stack.wait_status("heartbeat", HEARTBEAT_S + 2.0)
    assert stack.watcher is not None
    console.print(status_line(stack.watcher.latest(DEVICE_ID), stack.watcher.kinds(DEVICE_ID)))
    return receipt is not None and all(a.matches and a.outbox_state == "stored"
                                       for a in arrivals)


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


def _run_with_status(console: Console, app: Appliance, stack: SyncStack) -> None:
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(app.run(until_lines_end=True)))
    with console.status("recording...") as status:
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.25)
                stack.check_agent()
                runner = app.runners[0] if app.runners else None
                if runner is not None:
                    seconds = runner.engine.now / 8000
                    status.update(f"line time {int(seconds // 60)}:{int(seconds % 60):02d}, "
                                  f"state {runner.engine.state}; "
                                  f"{stack.stored_count()} stored by central")
        except BaseException:  # Ctrl-C or a dead agent: the recorder closes its calls too
            app.stop_event.set()
            worker.join()
            raise
    if not result or result[0] != 0:
        raise DemoError("the appliance stopped with an error (see the log above)")
    console.print(f"the line is quiet; central stored {stack.stored_count()} recording(s) "
                  "while the day ran")


def _decrypt_one(console: Console, rows: list[dict], central: Identity, out: Path,
                 stack: SyncStack) -> None:
    answered = [r for r in rows if r.get("answered_offset_s") is not None and r.get("size")]
    if not answered:
        raise DemoError("no answered call was recorded")
    row = max(answered, key=lambda r: r.get("audio_s") or 0)
    path = Path(row["path"])
    try:
        decrypt_recording(path, [Identity.generate()])
    except NoMatchingIdentity as exc:
        console.print(f"the device holds no private key; any other key fails: [red]{exc}")
    copy = stack.central_copy(str(row["id"]))
    rec = decrypt_recording(copy, [central])
    wav = out / f"{row['id']}.wav"
    write_wav(wav, rec.pcm)
    console.print(f"central store decrypts its copy {copy.name}: {len(rec.pcm) / 8000:.1f} s "
                  f"of audio, {'complete' if rec.complete else 'interrupted'} -> {wav}")
