"""Device TLS key and CSR, certificate checks, bench CA signing, unlock tickets.

The TLS client key is EC P-256 (mosquitto/OpenSSL client certificates, sync/pki.py) and is
made on the device, 0600, and never sent: only the CSR leaves. The Ed25519 device key
(firmware/keys.py) stays the audit signing key. Unlock tickets are signed by the ops
Ed25519 key whose public half was pinned at installation (trust.ops_public_key).
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.fsutil import atomic_write, make_dirs

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
KEY_DIR_MODE = 0o700
LEAF_VALIDITY = dt.timedelta(days=730)  # as sync/pki.py
CLOCK_SKEW = dt.timedelta(hours=1)
TICKET_PURPOSE = "edge-recorder unlock"
# A ticket is for one visit: the device refuses one valid for longer than a week.
MAX_TICKET_LIFETIME_S = 7 * 24 * 3600


class PkiError(Exception):
    """A key, CSR, certificate or ticket is unusable (message names it and why)."""


def load_or_create_tls_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The device's P-256 TLS key at ``path``; made (0600) if there is none."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"{path}: not a PEM private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path}: not an EC key")
        return key
    make_dirs(path.parent, KEY_DIR_MODE)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, PRIVATE_MODE)
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """PEM CSR with CN = device id (the broker's username, sync/pki.py)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _cn(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def check_certificate(cert_pem: bytes, chain_pem: bytes, key: ec.EllipticCurvePrivateKey,
                      device_id: str) -> x509.Certificate:
    """The certificate if it is for ``key`` and ``device_id`` and signed by the chain."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise PkiError(f"certificate: not PEM: {exc}") from None
    if cert.public_key() != key.public_key():
        raise PkiError("certificate: is not for this device's TLS key")
    if _cn(cert.subject) != device_id:
        raise PkiError(f"certificate: CN {_cn(cert.subject)!r} is not device_id {device_id!r}")
    if not any(_signed_by(cert, issuer) for issuer in chain):
        raise PkiError("certificate: not signed by any certificate of the CA chain")
    return cert


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sign_csr(csr_pem: bytes, ca_cert_path: Path, ca_key_path: Path,
             now: dt.datetime | None = None) -> bytes:
    """A client certificate for ``csr_pem`` from a local CA (bench work, sync/pki.py)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"CSR or CA ({ca_cert_path}, {ca_key_path}): {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("CSR: signature does not verify")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_key_path}: not an EC key")
    now = now or dt.datetime.now(dt.UTC)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (x509.CertificateBuilder()
            .subject_name(csr.subject).issuer_name(ca_cert.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(eku, critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def parse_ops_key(text: str) -> Ed25519PublicKey:
    """The ops key from base64 of its raw 32 bytes (RFC 8032 5.1.5)."""
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise PkiError(f"ops public key: not base64 of 32 bytes ({exc})") from None


def sign_ticket(ticket: bytes, ops_key_path: Path) -> bytes:
    """Ed25519 signature of an unlock ticket with the ops key (PEM PKCS#8)."""
    try:
        key = serialization.load_pem_private_key(ops_key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{ops_key_path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{ops_key_path}: not an Ed25519 key")
    return key.sign(ticket)


def verify_ticket(ticket: bytes, signature: bytes, ops_public_key: str) -> None:
    try:
        parse_ops_key(ops_public_key).verify(signature, ticket)
    except InvalidSignature:
        raise PkiError("unlock ticket: signature does not verify with the ops key") from None
