"""Central export bundles, their verification with public keys only, search, the fleet
monitor's alert rules and the central config file (through the real CLI where it runs)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.agecrypt import Identity
from firmware.audit import GENESIS_HEAD, ChainHead, make_entry, sign_checkpoint
from firmware.catalogue import iso_utc_ms
from firmware.config import ConfigError
from firmware.keys import private_key_pem, public_key_pem
from firmware.recfile import RecordingWriter
from firmware.recorder import commitment
from sync import protocol as p
from sync.central import CentralStore
from sync.central.catalogue import StatusRow, open_catalogue
from sync.central.config import Fleet, parse_central_config
from sync.central.export import verify_bundle
from sync.central.fleet import device_alerts, rows
from sync.central.search import search
from tests.sync.test_central import catalogue_url  # noqa: F401 - the parametrised fixture
from tests.sync.uploadkit import DEVICE

REPO = Path(__file__).resolve().parents[2]
CALLER = "+4930123456"
STARTS = ("2024-03-01T09:00:00.000Z", "2024-03-02T09:00:00.000Z")


@dataclass
class Site:
    root: Path
    store: CentralStore
    device_key: Ed25519PrivateKey
    central_key: Path
    identity: Path
    rids: list[str]


def _recording(path: Path, identity: Identity) -> bytes:
    pcm = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    with RecordingWriter(path, recipients=[identity.recipient],
                         header={"recording_id": path.stem}) as writer:
        writer.write_audio(0, pcm)
        writer.close("hangup")
    return path.read_bytes()


def _manifest(rid: str, data: bytes, started: str, numbers: dict[str, object]) -> dict:
    decision = {"record": True, "mode": "notice", "basis": "consent", "sources": ["BDSG s. 26"],
                "audit_numbers": numbers["audit_numbers"]}
    return {"recording_id": rid, "call_id": f"call-{rid[:8]}", "segment": 0,
            "device_id": DEVICE, "line_id": "line1", "direction": "inbound",
            "started_at": started, "created_at": started, "audio_s": 1.0,
            "decision": json.dumps(decision), "retention_until": None, "codec": "alaw",
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "numbers": numbers}


def _upload(store: CentralStore, key: Ed25519PrivateKey, manifest: dict, data: bytes) -> None:
    rid = manifest["recording_id"]
    init = p.Init(rid, len(data), manifest["sha256"], 4096, manifest,
                  key.sign(p.manifest_bytes(manifest)))
    store.handle(p.rec_topic(DEVICE, "up", rid, "init"), init.encode())
    store.handle(p.rec_topic(DEVICE, "up", rid, "chunk"), p.encode_chunk(rid, 0, data))
    fin = p.Fin(rid, len(data), manifest["sha256"]).encode()
    ack = p.decode_ack(store.handle(p.rec_topic(DEVICE, "up", rid, "fin"), fin)[0][1])
    assert ack.state == p.STORED


def _anchor(store: CentralStore, key: Ed25519PrivateKey, manifests: list[dict]) -> None:
    head, entries = GENESIS_HEAD, []
    for m in manifests:
        for kind, subject, data in (("call.started", m["call_id"], {"caller": "x"}),
                                    ("recording.closed", m["recording_id"],
                                     {"sha256": m["sha256"]})):
            entries.append(make_entry(head, time.time(), True, kind, subject, data))
            head = ChainHead(entries[-1].seq, entries[-1].hash)
    checkpoint = sign_checkpoint(key, DEVICE, head, int(time.time()))
    batch = p.AuditBatch(0, GENESIS_HEAD.hash, entries, [checkpoint]).encode()
    answer = p.decode_receipt(store.handle(f"er/v1/{DEVICE}/up/audit/batch", batch)[0][1])
    assert answer.error is None and answer.count == head.count


@pytest.fixture
def site(tmp_path: Path, catalogue_url: str) -> Iterator[Site]:  # noqa: F811
    devices = tmp_path / "store" / "devices"
    devices.mkdir(parents=True)
    device_key, central = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (devices / f"{DEVICE}.pub").write_bytes(public_key_pem(device_key.public_key()))
    central_key = tmp_path / "central_ed25519.pem"
    central_key.write_bytes(private_key_pem(central))
    central_key.chmod(0o600)
    (tmp_path / "central.pub").write_bytes(public_key_pem(central.public_key()))
    identity = Identity.generate()
    (tmp_path / "central.key").write_text(f"{identity}\n")
    store = CentralStore(tmp_path / "store", devices, central,
                         catalogue=open_catalogue(catalogue_url))
    salt = "ab" * 16
    numbers = ({"audit_numbers": "clear", "caller": CALLER, "dialed": None},
               {"audit_numbers": "commitment", "salt": salt,
                "caller": commitment(salt, CALLER), "dialed": None})
    manifests = []
    for started, nums in zip(STARTS, numbers, strict=True):
        rid = str(uuid.uuid4())
        data = _recording(tmp_path / f"{rid}.rec", identity)
        manifests.append(_manifest(rid, data, started, nums))
        _upload(store, device_key, manifests[-1], data)
    _anchor(store, device_key, manifests)
    try:
        yield Site(tmp_path, store, device_key, central_key, tmp_path / "central.key",
                   [m["recording_id"] for m in manifests])
    finally:
        store.close()


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def _export(site: Site, url: str, *rids: str) -> subprocess.CompletedProcess[str]:
    return cli("central", "export", *rids, "--identity", site.identity, "--out",
               site.root / "out", "--reason", "dispute 17", "--who", "compliance officer",
               "--dir", site.root / "store", "--catalogue", url, "--signing-key",
               site.central_key)


def _verify(site: Site, bundle: Path, device_pub: Path | None = None) -> list[str]:
    from firmware.keys import load_public_key

    device = load_public_key(device_pub or site.root / "store" / "devices" / f"{DEVICE}.pub")
    return verify_bundle(bundle, device, load_public_key(site.root / "central.pub"))


def test_export_bundle_verifies_and_is_audited(site: Site, catalogue_url: str) -> None:  # noqa: F811
    done = _export(site, catalogue_url, *site.rids)
    assert done.returncode == 0, done.stderr
    bundle = site.root / "out" / site.rids[0]
    checked = cli("central", "verify", bundle, "--device-key",
                  site.root / "store" / "devices" / f"{DEVICE}.pub", "--central-key",
                  site.root / "central.pub")
    assert checked.returncode == 0, checked.stdout
    assert subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=bundle,
                          check=False).returncode == 0
    assert subprocess.run(["sox", "--info", "-r", str(bundle / "audio.wav")], check=True,
                          capture_output=True, text=True).stdout.strip() == "8000"
    decision = json.loads((bundle / "decision.json").read_text())
    assert decision["sources"] == ["BDSG s. 26"]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert (meta["numbers"]["caller"], meta["line_id"]) == (CALLER, "line1")
    audit = json.loads((bundle / "proof" / "audit.json").read_text())
    assert len(audit["about"]) == 2 and audit["head"]["count"] == 4
    (export,) = site.store.catalogue.exports()
    assert (export["who"], export["why"], export["recording_ids"]) == (
        "compliance officer", "dispute 17", site.rids)


def _flip(path: Path, needle: bytes | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(needle) if needle else len(data) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["wav", "metadata", "audit", "device_key", "object"])
def test_tampered_bundle_fails(site: Site, catalogue_url: str, damage: str) -> None:  # noqa: F811
    assert _export(site, catalogue_url, site.rids[0]).returncode == 0
    bundle = site.root / "out" / site.rids[0]
    assert _verify(site, bundle) == []
    other = site.root / "other.pub"
    other.write_bytes(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    if damage == "wav":
        _flip(bundle / "audio.wav")
    elif damage == "metadata":
        _flip(bundle / "metadata.json", b"line1")
    elif damage == "audit":
        _flip(bundle / "proof" / "audit.json", b"recording.closed")
    elif damage == "object":
        _flip(bundle / "recording.rec")
    problems = _verify(site, bundle, other if damage == "device_key" else None)
    assert problems, damage
    checked = cli("central", "verify", bundle, "--device-key",
                  other if damage == "device_key"
                  else site.root / "store" / "devices" / f"{DEVICE}.pub",
                  "--central-key", site.root / "central.pub")
    assert checked.returncode == 1
    assert all(line.startswith(f"{bundle}: FAIL: ") for line in checked.stdout.splitlines())


def test_export_refuses_unknown_id_with_one_line(site: Site, catalogue_url: str) -> None:  # noqa: F811
    done = _export(site, catalogue_url, str(uuid.uuid4()))
    assert done.returncode == 1
    assert "not in the central catalogue" in done.stderr and len(done.stderr.splitlines()) == 1
    assert site.store.catalogue.exports() == []


def test_search_by_number_time_and_device(site: Site, catalogue_url: str) -> None:  # noqa: F811
    cat = site.store.catalogue
    assert [r.recording_id for r in search(cat, number=CALLER)] == site.rids
    assert [r.recording_id for r in search(cat, number="30123")] == site.rids[:1]  # clear only
    assert search(cat, number="+4930999999") == []
    assert [r.recording_id for r in search(cat, start="2024-03-02T00:00:00.000Z")] == \
        site.rids[1:]
    assert [r.recording_id for r in search(cat, end="2024-03-02T00:00:00.000Z")] == \
        site.rids[:1]
    assert search(cat, device_id="dev-other") == []
    found = cli("central", "search", "--catalogue", catalogue_url, "--number", CALLER,
                "--from", "2024-03-02", "--device", DEVICE, "--json")
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["recording_id"] for line in found.stdout.splitlines()] == \
        site.rids[1:]
    bad = cli("central", "search", "--catalogue", catalogue_url, "--from", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


# --- fleet alert rules (pure) ------------------------------------------------------------
NOW_S = 1_700_000_000.0


def _status(**fields: object) -> StatusRow:
    healthy = {"backlog_count": 0, "oldest_unsynced_age_s": None, "disk_free_bytes": 10**10,
               "cert_expiry_days": 300, "clock_synced": True}
    return StatusRow(DEVICE, 1, str(fields.pop("state", "online")), iso_utc_ms(NOW_S - 600),
                     iso_utc_ms(NOW_S - float(fields.pop("age_s", 10))), healthy | fields)


@pytest.mark.parametrize(("fields", "alert"), [
    ({}, None),
    ({"backlog_count": 101}, "backlog 101"),
    ({"oldest_unsynced_age_s": 25 * 3600}, "oldest unsynced 25.0 h"),
    ({"disk_free_bytes": 400 * 10**6}, "disk free 400 MB"),
    ({"cert_expiry_days": 29}, "certificate expires in 29 d"),
    ({"clock_synced": False}, "clock unsynced"),
    ({"age_s": 181}, "silent 3 min"),
    ({"age_s": 179}, None),
])
def test_fleet_alert_thresholds(fields: dict[str, object], alert: str | None) -> None:
    found = device_alerts(_status(**fields), NOW_S, Fleet())
    assert found == ([alert] if alert else [])


def test_fleet_offline_after_missed_heartbeats_and_config_limits() -> None:
    (row,) = rows([_status(age_s=181)], {}, now_s=NOW_S, limits=Fleet())
    assert (row["state"], row["since"]) == ("offline", iso_utc_ms(NOW_S - 181))
    (row,) = rows([_status(age_s=181)], {DEVICE: 2}, now_s=NOW_S,
                  limits=Fleet(heartbeat_s=120))
    assert (row["state"], row["stored_alerts"], row["alerts"]) == ("online", 2, [])
    (row,) = rows([_status(state="offline", age_s=5000)], {}, now_s=NOW_S, limits=Fleet())
    assert (row["state"], row["alerts"]) == ("offline", [])
    quiet = Fleet(clock_unsynced=False, backlog_count=1000)
    assert device_alerts(_status(clock_synced=False, backlog_count=500), NOW_S, quiet) == []


# --- central config ----------------------------------------------------------------------
GOOD = """
[broker]
host = "broker"
ca = "ca.crt"
cert = "ingest-1.crt"
key = "ingest-1.key"
[store]
objects_dir = "/srv/er"
devices_dir = "devices"
signing_key = "/srv/er/central_ed25519.pem"
[worker]
id = "ingest-1"
share_group = "ingest"
retention_interval_s = 600
[fleet]
backlog_count = 50
"""


def test_central_config_parses_and_resolves_paths(tmp_path: Path) -> None:
    config = parse_central_config(GOOD, "c.toml", tmp_path)
    assert config.broker is not None and config.broker.ca == str(tmp_path / "ca.crt")
    assert config.store.devices_dir == str(tmp_path / "devices")
    assert config.catalogue_url == "sqlite:///srv/er/catalogue.db"
    assert (config.worker.share_group, config.fleet.backlog_count) == ("ingest", 50)


@pytest.mark.parametrize(("change", "message"), [
    (("port", "port = 0\nhost"), "c.toml: broker.port: Expected `int` >= 1"),
    (("retention_interval_s = 600", "retention_interval_s = -1"),
     "c.toml: worker.retention_interval_s: Expected `float` > 0"),
    (("backlog_count", "backlogs"), "c.toml: fleet.backlogs: unknown key"),
    (("objects_dir", "object_dir"), "c.toml: store.object_dir: unknown key"),
    (('id = "ingest-1"', 'id = "a b"'), "c.toml: worker.id:"),
])
def test_central_config_errors_name_the_key(change: tuple[str, str], message: str) -> None:
    text = GOOD.replace("host", change[1], 1) if change[0] == "port" else \
        GOOD.replace(*change, 1)
    with pytest.raises(ConfigError) as caught:
        parse_central_config(text, "c.toml")
    assert str(caught.value).lower().startswith(message.lower()), str(caught.value)


def test_ingest_config_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "central.toml"
    path.write_text(GOOD)
    done = cli("central", "ingest", "--config", path)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(f"broker.ca: {tmp_path / 'ca.crt'}: no such file")
    assert len(done.stderr.splitlines()) == 1
    shutil.rmtree(tmp_path / "devices", ignore_errors=True)


def test_manifest_signature_key_swapped_in_bundle_fails(site: Site,
                                                        catalogue_url: str) -> None:  # noqa: F811
    """A bundle whose proof/device.pub and signature were both replaced by a forger still
    fails: the verifier takes the device key from its own records, and the chain head is
    countersigned by central."""
    assert _export(site, catalogue_url, site.rids[1]).returncode == 0
    bundle = site.root / "out" / site.rids[1]
    forger = Ed25519PrivateKey.generate()
    signed = json.loads((bundle / "proof" / "manifest.json").read_text())
    signed["manifest_sig"] = base64.b64encode(
        forger.sign(p.manifest_bytes(signed["manifest"]))).decode()
    (bundle / "proof" / "manifest.json").write_text(json.dumps(signed))
    (bundle / "proof" / "device.pub").write_bytes(public_key_pem(forger.public_key()))
    problems = _verify(site, bundle)
    assert any("device's signature" in x for x in problems)
    assert any("MANIFEST.sha256" in x for x in problems)
