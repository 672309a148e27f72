"""A test and bench PKI for the MQTT broker: CA, broker, devices, central, ops.

Everything is EC P-256 (the broker and every client speak TLS 1.2 and 1.3 with ECDSA).
The certificate's Common Name is the identity the broker uses as the MQTT username
(``use_identity_as_username``), so a client certificate's CN is a device id, ``central``
or ``ops``. With ``negatives`` the PKI also holds what the broker must refuse: an expired
certificate and one from an unrelated CA for every device.

Layout under the directory (docs/PROTOCOL.md, "Test PKI")::

    ca.crt ca.key                      the CA (10 years)
    broker.crt broker.key              the broker (SAN DNS:localhost, IP:127.0.0.1)
    clients/<id>.crt clients/<id>.key  devices, central, ops (clientAuth)
    expired/<id>.crt expired/<id>.key  expired device certificates (negatives)
    foreign-ca.crt foreign-ca.key      an unrelated CA (negatives)
    foreign/<id>.crt foreign/<id>.key  device certificates from the unrelated CA (negatives)
    ops-signing.key ops-signing.pub    Ed25519 key signing config and commands; raw public
                                       key in base64

Private keys are PEM PKCS#8, 0600, written atomically; the directory is 0700. This is
not production issuance: device keys are made here, not on the device.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.config import DeviceId
from firmware.fsutil import atomic_write, make_dirs

CENTRAL = "central"
OPS = "ops"
RESERVED_IDS = frozenset({CENTRAL, OPS})  # ACL users; a device by these names would share them
DEVICE_ID_RE = re.compile(typing.get_args(DeviceId)[1].pattern)  # firmware/config.py DeviceId

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=730)
CLOCK_SKEW = dt.timedelta(hours=1)  # not_before backdated so a slightly slow clock accepts
EXPIRED_AGO = dt.timedelta(days=1)

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


class PkiError(Exception):
    """The PKI cannot be made as asked (message is one line naming the cause)."""


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Paths of everything ``make_pki`` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    broker: Credential
    clients: Mapping[str, Credential]
    ops_signing_key: Path
    ops_signing_pub: Path
    ops_signing_pub_b64: str
    expired: Mapping[str, Credential] = field(default_factory=dict)
    foreign_ca_cert: Path | None = None
    foreign: Mapping[str, Credential] = field(default_factory=dict)

    @property
    def central(self) -> Credential:
        return self.clients[CENTRAL]

    @property
    def ops(self) -> Credential:
        return self.clients[OPS]


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def check_device_id(device_id: str) -> str:
    """``device_id`` if it can be a certificate CN, an MQTT username and a topic level."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise PkiError(f"device id {device_id!r}: must match {DEVICE_ID_RE.pattern}")
    if device_id in RESERVED_IDS:
        raise PkiError(f"device id {device_id!r}: reserved for the {device_id} certificate")
    return device_id


def make_pki(directory: Path, devices: Sequence[str], now: dt.datetime | None = None,
             *, negatives: bool = False) -> Pki:
    """Create a fresh PKI in ``directory`` (created 0700; must not hold a PKI already)."""
    devices = _checked_devices(devices)
    now = now or dt.datetime.now(dt.UTC)
    if (directory / "ca.key").exists():
        raise PkiError(f"{directory}: holds a PKI already (ca.key); refusing to overwrite keys")
    make_dirs(directory, DIR_MODE)
    ca = _write_ca(directory, "ca", "edge-recorder test CA", now)
    broker = _write_leaf(directory, "broker", ca, _broker_profile(), now, now + LEAF_VALIDITY)
    clients = {name: _write_client(directory / "clients", name, ca, now, now + LEAF_VALIDITY)
               for name in (*devices, CENTRAL, OPS)}
    signing_key, signing_pub, pub_b64 = _write_ops_signing_key(directory)
    pki = Pki(directory=directory, ca_cert=directory / "ca.crt", ca_key=directory / "ca.key",
              broker=broker, clients=clients, ops_signing_key=signing_key,
              ops_signing_pub=signing_pub, ops_signing_pub_b64=pub_b64)
    return _add_negatives(pki, ca, devices, now) if negatives else pki


def _checked_devices(devices: Sequence[str]) -> list[str]:
    if not devices:
        raise PkiError("no device ids given")
    seen: set[str] = set()
    for device_id in devices:
        check_device_id(device_id)
        if device_id in seen:
            raise PkiError(f"device id {device_id!r}: given twice")
        seen.add(device_id)
    return list(devices)


def _add_negatives(pki: Pki, ca: _Issuer, devices: Sequence[str], now: dt.datetime) -> Pki:
    directory = pki.directory
    expired = {d: _write_client(directory / "expired", d, ca, now - LEAF_VALIDITY,
                                now - EXPIRED_AGO) for d in devices}
    # Same name as the real CA, another key: the broker must check the signature, not the name.
    foreign_ca = _write_ca(directory, "foreign-ca", "edge-recorder test CA", now)
    foreign = {d: _write_client(directory / "foreign", d, foreign_ca, now, now + LEAF_VALIDITY)
               for d in devices}
    return replace(pki, expired=expired, foreign_ca_cert=directory / "foreign-ca.crt",
                   foreign=foreign)


# --- certificates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Profile:
    cn: str
    eku: x509.ObjectIdentifier
    sans: tuple[x509.GeneralName, ...] = ()


def _broker_profile() -> _Profile:
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")))
    return _Profile("edge-recorder broker", ExtendedKeyUsageOID.SERVER_AUTH, sans)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-recorder test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_ca(directory: Path, stem: str, cn: str, now: dt.datetime) -> _Issuer:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    builder = (_base(name, name, key.public_key(), now - CLOCK_SKEW, now + CA_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True))
    cert = builder.sign(key, hashes.SHA256())
    _write_pair(directory, stem, cert, key)
    return _Issuer(name, key)


def _write_client(directory: Path, client_id: str, issuer: _Issuer, not_before: dt.datetime,
                  not_after: dt.datetime) -> Credential:
    make_dirs(directory, DIR_MODE)
    profile = _Profile(client_id, ExtendedKeyUsageOID.CLIENT_AUTH)
    return _write_leaf(directory, client_id, issuer, profile, not_before, not_after)


def _write_leaf(directory: Path, stem: str, issuer: _Issuer, profile: _Profile,
                not_before: dt.datetime, not_after: dt.datetime) -> Credential:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_base(_name(profile.cn), issuer.name, key.public_key(), not_before - CLOCK_SKEW,
                     not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(cert_sign=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([profile.eku]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer.key.public_key()), critical=False))
    if profile.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(profile.sans)),
                                        critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    return _write_pair(directory, stem, cert, key)


def _base(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
          not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _write_pair(directory: Path, stem: str, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> Credential:
    pair = Credential(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    atomic_write(pair.key, _private_pem(key), PRIVATE_MODE)
    atomic_write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return pair


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_ops_signing_key(directory: Path) -> tuple[Path, Path, str]:
    """The Ed25519 key that signs configuration and commands; the device holds its public
    key as base64 of the raw 32 bytes (RFC 8032 5.1.5)."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    pub_b64 = base64.b64encode(raw).decode("ascii")
    key_path, pub_path = directory / "ops-signing.key", directory / "ops-signing.pub"
    atomic_write(key_path, _private_pem(key), PRIVATE_MODE)
    atomic_write(pub_path, f"{pub_b64}\n".encode(), PUBLIC_MODE)
    return key_path, pub_path, pub_b64


# --- command line -----------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _UsageError(f"{message} (see --help)")


def _parser() -> _Parser:
    parser = _Parser(prog="python -m sync.pki",
                     description="Create a test PKI for the MQTT broker (never for production).")
    parser.add_argument("directory", type=Path, help="where to write it (created, 0700)")
    parser.add_argument("--device", action="append", required=True, metavar="ID",
                        help="a device id to issue a client certificate for (repeat)")
    parser.add_argument("--negatives", action="store_true",
                        help="also expired and foreign-CA device certificates")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sync.pki``: exit 0 done, 2 bad arguments, 1 cannot write."""
    try:
        args = _parser().parse_args(argv)
        pki = make_pki(args.directory, args.device, negatives=args.negatives)
    except (_UsageError, PkiError) as exc:
        sys.stderr.write(f"sync.pki: error: {exc}\n")
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"sync.pki: error: {where}{exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"{pki.directory}: CA, broker, {len(args.device)} device(s), central, "
                     f"ops; ops signing public key {pki.ops_signing_pub_b64}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
