"""Audit anchoring: each device's chain continued, checked and countersigned.

A batch must continue central's head for the device. One that starts before it is
compared with what central holds: the same entries are a resend (answered with the
head); different ones mean the device's trail was rewritten or rolled back: an alert.
A batch whose chain or checkpoint signatures do not verify is an alert too.
"""

from __future__ import annotations

import base64
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.audit import GENESIS_HEAD, ChainHead, verify_entries
from firmware.keys import key_id
from sync import protocol as p
from sync.central.catalogue import Catalogue

log = logging.getLogger(__name__)

ALERT_ROLLBACK = "audit.rollback"
ALERT_BREAK = "audit.break"


def central_head(catalogue: Catalogue, device: str) -> ChainHead:
    held = catalogue.audit_head(device)
    return ChainHead(held.count, held.hash) if held else GENESIS_HEAD


def receipt(key: Ed25519PrivateKey, device: str, head: ChainHead,
            error: str | None) -> p.Receipt:
    signature = key.sign(p.receipt_body(device, head.count, head.hash))
    return p.Receipt(head.count, head.hash, key_id(key.public_key()),
                     base64.b64encode(signature).decode("ascii"), error)


def anchor_batch(catalogue: Catalogue, key: Ed25519PrivateKey, device: str,
                 device_key: Ed25519PublicKey, batch: p.AuditBatch, now_iso: str) -> p.Receipt:
    """Check ``batch`` against central's copy, store it, and answer with a receipt."""
    head = central_head(catalogue, device)
    start = ChainHead(batch.start_count, batch.start_hash)
    if start != head:
        return _not_continuing(catalogue, key, device, batch, head, now_iso)
    report = verify_entries(batch.entries, batch.checkpoints, device_key, device_id=device,
                            start=head)
    if not report.ok:
        log.warning("%s: audit batch refused: %s", device, report.message)
        catalogue.add_alert(device, ALERT_BREAK, str(report.first_bad_seq or ""),
                            report.message, now_iso)
        return receipt(key, device, head, "audit_invalid")
    new_head = ChainHead(report.head.count, report.head.hash)
    if new_head == head:
        return receipt(key, device, head, None)
    answer = receipt(key, device, new_head, None)
    if not catalogue.anchor(device, head, batch.entries, batch.checkpoints, new_head,
                            answer.signature, now_iso):
        return receipt(key, device, central_head(catalogue, device), "audit_gap")
    return answer


def _not_continuing(catalogue: Catalogue, key: Ed25519PrivateKey, device: str,
                    batch: p.AuditBatch, head: ChainHead, now_iso: str) -> p.Receipt:
    """A resend (same hashes as held), a rollback (different ones), or a gap."""
    if batch.start_count < head.count:
        held = catalogue.audit_hashes(device, batch.start_count, head.count)
        sent = {e.seq: e.hash for e in batch.entries}
        if batch.start_count > 0:
            sent[batch.start_count] = batch.start_hash
        differing = sorted(seq for seq, digest in sent.items()
                           if seq in held and held[seq] != digest)
        if differing:
            detail = (f"entry {differing[0]} differs from the anchored chain (head "
                      f"{head.count}): the device's trail was rewritten or rolled back")
            log.error("%s: %s", device, detail)
            catalogue.add_alert(device, ALERT_ROLLBACK, str(differing[0]), detail, now_iso)
            return receipt(key, device, head, "audit_invalid")
    log.info("%s: audit batch starts at %d, central holds %d", device, batch.start_count,
             head.count)
    return receipt(key, device, head, "audit_gap")
