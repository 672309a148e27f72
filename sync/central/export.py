"""Export bundles for a dispute or a subject-access request, and their verification.

One folder per recording (layout in docs/CENTRAL.md, "Export bundles"): the decrypted
audio as a standard WAV, the metadata, the policy decision with its sources, and the
proof: the ciphertext as stored, the device's signed manifest and public key, the audit
chain from the first entry about the call up to the anchored head with central's
countersignature, and ``MANIFEST.sha256`` (``sha256sum -c`` format) signed by central.
:func:`verify_bundle` needs public keys only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.agecrypt import Identity
from firmware.audit import AuditEntry, AuditFormatError, ChainHead, Checkpoint, verify_entries
from firmware.fsutil import atomic_write, make_dirs
from firmware.keys import key_id
from firmware.recfile import decrypt_recording, write_wav
from sync import protocol as p
from sync.central.catalogue import Catalogue, StoredRecording

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "edge-recorder/export/1"
MANIFEST_NAME = "MANIFEST.sha256"
SIGNATURE_NAME = "MANIFEST.sha256.sig"
WAV_NAME, REC_NAME, META_NAME, DECISION_NAME = ("audio.wav", "recording.rec", "metadata.json",
                                                "decision.json")
PROOF_MANIFEST, PROOF_KEY, PROOF_AUDIT = ("proof/manifest.json", "proof/device.pub",
                                          "proof/audit.json")
BUNDLE_FILES = (WAV_NAME, REC_NAME, META_NAME, DECISION_NAME, PROOF_MANIFEST, PROOF_KEY,
                PROOF_AUDIT)
METADATA_KEYS = ("recording_id", "call_id", "segment", "device_id", "line_id", "direction",
                 "started_at", "created_at", "audio_s", "retention_until", "codec", "size",
                 "sha256")


class ExportError(Exception):
    """A recording cannot be exported (unknown id, missing object, no anchored trail)."""


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """Who asks, why, and with which keys."""

    identities: Sequence[Identity]
    signing_key: Ed25519PrivateKey
    who: str
    why: str


# --- export ----------------------------------------------------------------------------
def export_recordings(catalogue: Catalogue, objects_dir: Path, devices_dir: Path,
                      recording_ids: Sequence[str], out: Path, request: ExportRequest,
                      now_iso: str) -> list[Path]:
    """One bundle per id under ``out``; the export is recorded in the catalogue first."""
    rows = [_stored(catalogue, rid) for rid in recording_ids]
    catalogue.add_export(now_iso, request.who, request.why, list(recording_ids), str(out))
    return [export_one(catalogue, objects_dir, devices_dir, row, out / row.recording_id,
                       request) for row in rows]


def export_one(catalogue: Catalogue, objects_dir: Path, devices_dir: Path,
               row: StoredRecording, folder: Path, request: ExportRequest) -> Path:
    if folder.exists():
        raise ExportError(f"{folder}: exists; refusing to overwrite a bundle")
    make_dirs(folder / "proof", 0o700)
    rec_path = objects_dir / row.object_path
    ciphertext = _read(rec_path)
    audio = decrypt_recording(rec_path, request.identities)
    write_wav(folder / WAV_NAME, audio.pcm)
    _write(folder / REC_NAME, ciphertext)
    _write_json(folder / META_NAME, metadata(row, complete=audio.complete))
    _write_json(folder / DECISION_NAME, decision(row.manifest))
    _write_json(folder / PROOF_MANIFEST, {"manifest": row.manifest,
                                          "manifest_sig": row.manifest_sig})
    _write(folder / PROOF_KEY, _read(devices_dir / f"{row.device_id}.pub"))
    _write_json(folder / PROOF_AUDIT, audit_proof(catalogue, row, request.signing_key))
    seal(folder, request.signing_key)
    log.info("recording %s exported to %s for %s (%s)", row.recording_id, folder, request.who,
             request.why)
    return folder


def metadata(row: StoredRecording, *, complete: bool) -> dict[str, Any]:
    """What central knows of the recording (numbers as the device sent them)."""
    meta = {key: row.manifest.get(key) for key in METADATA_KEYS}
    meta.update({"numbers": row.manifest.get("numbers"), "stored_at": row.stored_at,
                 "audio_complete": complete, "format": BUNDLE_FORMAT})
    return meta


def decision(manifest: dict[str, Any]) -> dict[str, Any]:
    """The signed manifest's policy decision (the device stores it as JSON text)."""
    raw = manifest.get("decision")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {"unparsed": raw}
    return raw if isinstance(raw, dict) else {}


def audit_proof(catalogue: Catalogue, row: StoredRecording,
                central_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The chain from the first entry about the call to the anchored, countersigned head."""
    device, subjects = row.device_id, _subjects(row)
    head = catalogue.audit_head(device)
    firsts = [s for s in (catalogue.first_seq_about(device, x) for x in subjects) if s]
    if head is None or not firsts:
        raise ExportError(f"recording {row.recording_id}: no anchored audit entry about it yet")
    entries = catalogue.audit_entries(device, min(firsts), head.count)
    checkpoints = catalogue.audit_checkpoints(device, min(firsts), head.count)
    return {"device_id": device, "subjects": sorted(subjects),
            "about": [e.seq for e in entries if e.subject in subjects],
            "entries": [e.to_dict() for e in entries],
            "checkpoints": [c.to_dict() for c in checkpoints],
            "head": {"count": head.count, "hash": head.hash, "updated_at": head.updated_at,
                     "receipt_sig": head.receipt_sig,
                     "central_key_id": key_id(central_key.public_key())}}


def seal(folder: Path, key: Ed25519PrivateKey) -> None:
    """``MANIFEST.sha256`` over the bundle files and central's signature of it."""
    text = "".join(f"{_sha256(folder / name)}  {name}\n" for name in BUNDLE_FILES)
    _write(folder / MANIFEST_NAME, text.encode())
    _write(folder / SIGNATURE_NAME, base64.b64encode(key.sign(text.encode())) + b"\n")


# --- verify ----------------------------------------------------------------------------
def verify_bundle(folder: Path, device_key: Ed25519PublicKey,
                  central_key: Ed25519PublicKey) -> list[str]:
    """Every problem found, one line each; empty when the bundle verifies."""
    problems = _check_manifest_file(folder, central_key)
    try:
        signed = _load_json(folder / PROOF_MANIFEST)
        audit = _load_json(folder / PROOF_AUDIT)
        meta = _load_json(folder / META_NAME)
    except ExportError as exc:
        return [*problems, str(exc)]
    manifest = signed.get("manifest", {})
    problems += _check_device_signature(signed, device_key)
    problems += _check_object(folder / REC_NAME, manifest)
    problems += _check_metadata(meta, manifest)
    problems += _check_audit(audit, manifest, device_key, central_key)
    return problems


def _check_manifest_file(folder: Path, central_key: Ed25519PublicKey) -> list[str]:
    try:
        text = (folder / MANIFEST_NAME).read_bytes()
        signature = base64.b64decode((folder / SIGNATURE_NAME).read_bytes().strip(),
                                     validate=True)
    except (OSError, binascii.Error) as exc:
        return [f"{folder / MANIFEST_NAME}: unreadable or unsigned ({exc})"]
    problems = []
    if not _signed_by(central_key, signature, text):
        problems.append(f"{MANIFEST_NAME}: central's signature does not verify")
    listed = _listed(text.decode(errors="replace"))
    for name in BUNDLE_FILES:
        if name not in listed:
            problems.append(f"{MANIFEST_NAME}: {name} is not listed")
        elif not (folder / name).is_file() or _sha256(folder / name) != listed[name]:
            problems.append(f"{name}: sha256 differs from {MANIFEST_NAME}")
    return problems


def _check_device_signature(signed: dict[str, Any], device_key: Ed25519PublicKey) -> list[str]:
    try:
        signature = base64.b64decode(str(signed.get("manifest_sig", "")), validate=True)
    except binascii.Error:
        signature = b""
    if _signed_by(device_key, signature, p.manifest_bytes(signed.get("manifest", {}))):
        return []
    return [f"{PROOF_MANIFEST}: the device's signature does not verify with the device key"]


def _check_object(rec_path: Path, manifest: dict[str, Any]) -> list[str]:
    if not rec_path.is_file():
        return [f"{REC_NAME}: missing"]
    if _sha256(rec_path) != manifest.get("sha256") or \
            rec_path.stat().st_size != manifest.get("size"):
        return [f"{REC_NAME}: sha256 or size differs from the signed manifest"]
    return []


def _check_metadata(meta: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    return [f"{META_NAME}: {key} differs from the signed manifest" for key in METADATA_KEYS
            if meta.get(key) != manifest.get(key)]


def _check_audit(audit: dict[str, Any], manifest: dict[str, Any],
                 device_key: Ed25519PublicKey, central_key: Ed25519PublicKey) -> list[str]:
    try:
        entries = [AuditEntry.from_dict(e) for e in audit["entries"]]
        checkpoints = [Checkpoint.from_dict(c) for c in audit["checkpoints"]]
        head = ChainHead(int(audit["head"]["count"]), str(audit["head"]["hash"]))
        receipt_sig = base64.b64decode(str(audit["head"]["receipt_sig"]), validate=True)
    except (KeyError, TypeError, ValueError, AuditFormatError, binascii.Error) as exc:
        return [f"{PROOF_AUDIT}: malformed ({exc})"]
    if not entries:
        return [f"{PROOF_AUDIT}: no audit entries"]
    device = str(manifest.get("device_id"))
    problems = _check_chain(entries, checkpoints, head, device, device_key)
    if not _signed_by(central_key, receipt_sig, p.receipt_body(device, head.count, head.hash)):
        problems.append(f"{PROOF_AUDIT}: central's countersignature of head {head.count} "
                        "does not verify")
    return problems + _check_about(entries, manifest)


def _check_chain(entries: list[AuditEntry], checkpoints: list[Checkpoint], head: ChainHead,
                 device: str, device_key: Ed25519PublicKey) -> list[str]:
    start = ChainHead(entries[0].seq - 1, entries[0].prev_hash)
    report = verify_entries(entries, checkpoints, device_key, device_id=device, start=start)
    problems = [] if report.ok else [f"{PROOF_AUDIT}: {report.message}"]
    if (report.head.count, report.head.hash) != (head.count, head.hash):
        problems.append(f"{PROOF_AUDIT}: the chain does not end at the anchored head "
                        f"{head.count}")
    return problems


def _check_about(entries: list[AuditEntry], manifest: dict[str, Any]) -> list[str]:
    """The trail names the recording, and its audited sha256 is the manifest's."""
    rid, sha = manifest.get("recording_id"), manifest.get("sha256")
    subjects = {rid, manifest.get("call_id")}
    if not any(e.subject in subjects for e in entries):
        return [f"{PROOF_AUDIT}: no entry about recording {rid}"]
    audited = [e.data.get("sha256") for e in entries
               if e.subject == rid and e.kind in ("recording.closed", "recording.recovered")]
    if audited and audited[-1] != sha:
        return [f"{PROOF_AUDIT}: the audited sha256 of {rid} differs from the manifest's"]
    return []


# --- helpers ---------------------------------------------------------------------------
def _stored(catalogue: Catalogue, rid: str) -> StoredRecording:
    row = catalogue.get_recording(rid)
    if row is not None:
        return row
    tomb = catalogue.tombstone(rid)
    if tomb is not None:
        raise ExportError(f"recording {rid}: erased at {tomb['erased_at']} ({tomb['cause']}: "
                          f"{tomb['reason']})")
    raise ExportError(f"recording {rid}: not in the central catalogue")


def _subjects(row: StoredRecording) -> set[str]:
    call = row.manifest.get("call_id")
    return {row.recording_id, str(call)} if call else {row.recording_id}


def _listed(text: str) -> dict[str, str]:
    """``sha256sum`` lines: file name -> hex digest."""
    pairs = (line.split("  ", 1) for line in text.splitlines() if "  " in line)
    return {name: digest for digest, name in pairs}


def _signed_by(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o600)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path.name}: unreadable ({exc})") from exc
    if not isinstance(value, dict):
        raise ExportError(f"{path.name}: not a JSON object")
    return value
