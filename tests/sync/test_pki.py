"""The test PKI: what each certificate is, file modes, the openssl CLI's view, and the
command line's one-line errors."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sync.pki import CENTRAL, OPS, Pki, PkiError, make_pki

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def fixed_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki") / "pki", ["dev-a", "dev-b"], now=NOW,
                    negatives=True)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def openssl_verify(ca: Path, leaf: Path, *purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", *purpose, "-CAfile", str(ca), str(leaf)],
                          capture_output=True, text=True, check=False, timeout=30)


def test_ca_signs_leaves_only_for_ten_years(fixed_pki: Pki) -> None:
    ca = cert(fixed_pki.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.not_valid_after_utc - NOW == dt.timedelta(days=3650)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_client_certificates_name_their_identity(fixed_pki: Pki) -> None:
    ca = cert(fixed_pki.ca_cert)
    assert set(fixed_pki.clients) == {"dev-a", "dev-b", CENTRAL, OPS}
    for name, credential in fixed_pki.clients.items():
        leaf = cert(credential.cert)
        assert cn(leaf) == name
        assert eku(leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        leaf.verify_directly_issued_by(ca)
        assert leaf.not_valid_before_utc <= NOW < leaf.not_valid_after_utc
        key = load_pem_private_key(credential.key.read_bytes(), None)
        assert key.public_key() == leaf.public_key()


def test_broker_certificate_serves_localhost(fixed_pki: Pki) -> None:
    leaf = cert(fixed_pki.broker.cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert eku(leaf) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_openssl_accepts_the_good_and_refuses_the_negatives(fixed_pki: Pki) -> None:
    """The openssl CLI as an independent judge, at the PKI's own time (-attime)."""
    at = ("-attime", str(int(NOW.timestamp())))
    ca = fixed_pki.ca_cert
    assert openssl_verify(ca, fixed_pki.clients["dev-a"].cert, *at, "-purpose",
                          "sslclient").returncode == 0
    assert openssl_verify(ca, fixed_pki.broker.cert, *at, "-purpose",
                          "sslserver").returncode == 0
    expired = openssl_verify(ca, fixed_pki.expired["dev-a"].cert, *at)
    assert "certificate has expired" in expired.stdout + expired.stderr
    foreign = openssl_verify(ca, fixed_pki.foreign["dev-a"].cert, *at)
    assert "unable to get local issuer certificate" in foreign.stdout + foreign.stderr
    assert fixed_pki.foreign_ca_cert is not None
    assert openssl_verify(fixed_pki.foreign_ca_cert, fixed_pki.foreign["dev-a"].cert,
                          *at).returncode == 0
    server_as_client = openssl_verify(ca, fixed_pki.broker.cert, *at, "-purpose", "sslclient")
    assert "unsuitable certificate purpose" in server_as_client.stdout + server_as_client.stderr


def test_negatives_look_like_the_real_device(fixed_pki: Pki) -> None:
    """Same CN, and a foreign CA of the same name: only signature and dates differ."""
    assert cn(cert(fixed_pki.expired["dev-a"].cert)) == "dev-a"
    assert cn(cert(fixed_pki.foreign["dev-a"].cert)) == "dev-a"
    assert fixed_pki.foreign_ca_cert is not None
    assert cert(fixed_pki.foreign_ca_cert).subject == cert(fixed_pki.ca_cert).subject
    assert cert(fixed_pki.expired["dev-a"].cert).not_valid_after_utc < NOW


def test_private_keys_are_owner_only(fixed_pki: Pki) -> None:
    directory = fixed_pki.directory
    assert directory.stat().st_mode & 0o777 == 0o700
    keys = sorted(directory.rglob("*.key"))
    assert len(keys) == 2 + 4 + 2 + 1 + 2 + 1  # CA, broker, clients, expired, foreign CA and leaves, ops signing
    for path in keys:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in directory.rglob("*.crt"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert not list(directory.rglob("*.part"))


def test_ops_signing_key_and_its_raw_public_key(fixed_pki: Pki) -> None:
    key = load_pem_private_key(fixed_pki.ops_signing_key.read_bytes(), None)
    raw = base64.b64decode(fixed_pki.ops_signing_pub_b64, validate=True)
    assert fixed_pki.ops_signing_pub.read_text().strip() == fixed_pki.ops_signing_pub_b64
    public = Ed25519PublicKey.from_public_bytes(raw)
    public.verify(key.sign(b"config"), b"config")  # type: ignore[call-arg,union-attr]


def test_without_negatives_there_are_none(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["dev-a"])
    assert pki.expired == {} and pki.foreign == {} and pki.foreign_ca_cert is None
    assert not (tmp_path / "pki" / "expired").exists()


@pytest.mark.parametrize(("devices", "needle"), [
    (["central"], "reserved"),
    (["ops"], "reserved"),
    (["a/b"], "must match"),
    (["+"], "must match"),
    (["-lead"], "must match"),
    (["x" * 65], "must match"),
    (["dev-a", "dev-a"], "given twice"),
    ([], "no device ids"),
])
def test_refuses_bad_device_ids(tmp_path: Path, devices: list[str], needle: str) -> None:
    with pytest.raises(PkiError, match=needle):
        make_pki(tmp_path / "pki", devices)
    assert not (tmp_path / "pki").exists()


def test_refuses_to_overwrite_a_pki(tmp_path: Path) -> None:
    make_pki(tmp_path, ["dev-a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="refusing to overwrite"):
        make_pki(tmp_path, ["dev-a"])
    assert (tmp_path / "ca.key").read_bytes() == before


# --- command line ------------------------------------------------------------------------------
def pki_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sync.pki", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


def test_cli_makes_a_pki(tmp_path: Path) -> None:
    done = pki_cli(str(tmp_path / "pki"), "--device", "dev-a", "--device", "dev-b",
                   "--negatives")
    assert done.returncode == 0, done.stderr
    assert "2 device(s)" in done.stdout
    for path in ("ca.crt", "broker.key", "clients/dev-b.crt", "clients/ops.key",
                 "expired/dev-a.crt", "foreign/dev-b.key", "ops-signing.pub"):
        assert (tmp_path / "pki" / path).is_file(), path


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    one_line_error(pki_cli(str(tmp_path / "p")), 2, "--device")
    one_line_error(pki_cli(str(tmp_path / "p"), "--device", "a b"), 2, "'a b'")
    one_line_error(pki_cli(str(tmp_path / "p"), "--device", "ops"), 2, "reserved")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    one_line_error(pki_cli(str(blocker / "pki"), "--device", "dev-a"), 1, str(blocker))
    assert pki_cli(str(tmp_path / "q"), "--device", "dev-a").returncode == 0
    one_line_error(pki_cli(str(tmp_path / "q"), "--device", "dev-a"), 2,
                   "refusing to overwrite")
