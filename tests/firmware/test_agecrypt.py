from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from firmware import agecrypt
from firmware.agecrypt import (
    AgeAuthError,
    AgeError,
    AgeFormatError,
    Identity,
    NoMatchingIdentity,
    Recipient,
    Stanza,
    bech32_decode,
    bech32_encode,
    decrypt_stream,
    encrypt_stream,
    load_identities,
    parse_header,
    parse_recipients,
    unwrap_file_key,
    write_header,
)

needs_age = pytest.mark.skipif(shutil.which("age") is None or shutil.which("age-keygen") is None,
                               reason="age CLI not installed")
SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 200_001]
# age.md "The X25519 recipient type": example identity and its recipient.
SPEC_IDENTITY = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
SPEC_RECIPIENT = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"


def _keygen(path: Path) -> Path:
    subprocess.run(["age-keygen", "-o", str(path)], capture_output=True, check=True)
    return path


def _cli_recipient(key_file: Path) -> str:
    return subprocess.run(["age-keygen", "-y", str(key_file)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _encrypt(data: bytes, recipients: list[Recipient]) -> bytes:
    out = io.BytesIO()
    assert encrypt_stream(io.BytesIO(data), out, recipients) == len(data)
    return out.getvalue()


def _decrypt(blob: bytes, identities: list[Identity]) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, identities)
    return out.getvalue()


# --- bech32 and keys ---------------------------------------------------------------
@pytest.mark.parametrize(("text", "hrp", "data_hex"), [
    ("A12UEL5L", "a", ""),  # BIP-173 valid test vectors
    ("a12uel5l", "a", ""),
    ("abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw", "abcdef",
     "00443214c74254b635cf84653a56d7c675be77df"),
])
def test_bech32_decodes_bip173_vectors(text, hrp, data_hex):
    assert bech32_decode(text) == (hrp, bytes.fromhex(data_hex))


@pytest.mark.parametrize("text", [
    "pzry9x0s0muk",  # BIP-173 invalid: no separator
    "1pzry9x0s0muk",  # empty human-readable part
    "x1b4n0q5v",  # invalid data character
    "li1dgmt3",  # checksum too short
    "A1G7SGD8",  # checksum computed over the upper-case hrp
    "a12UEL5L",  # mixed case
])
def test_bech32_rejects_bip173_invalid_vectors(text):
    with pytest.raises(AgeFormatError):
        bech32_decode(text)


def test_bech32_round_trips_random_bytes_without_length_limit():
    data = os.urandom(100)
    text = bech32_encode("Test", data)
    assert len(text) > 90
    assert bech32_decode(text) == ("test", data)
    assert bech32_decode(text.upper()) == ("test", data)


def test_spec_identity_gives_spec_recipient():
    identity = Identity.parse(SPEC_IDENTITY)
    assert str(identity.recipient) == SPEC_RECIPIENT
    assert str(identity) == SPEC_IDENTITY
    assert Recipient.parse(SPEC_RECIPIENT) == identity.recipient


def test_identity_repr_hides_the_secret():
    identity = Identity.parse(SPEC_IDENTITY)
    assert SPEC_IDENTITY not in repr(identity)
    assert SPEC_RECIPIENT in repr(identity)


def test_keys_of_the_wrong_kind_are_rejected_without_echoing_secrets():
    with pytest.raises(AgeFormatError, match="not an age1"):
        Recipient.parse(SPEC_IDENTITY)
    with pytest.raises(AgeFormatError) as excinfo:
        Identity.parse(SPEC_RECIPIENT)
    assert SPEC_RECIPIENT not in str(excinfo.value)


def test_load_identities_reports_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(f"# created: today\n# public key: {SPEC_RECIPIENT}\n\n{SPEC_IDENTITY}\n")
    assert [str(i.recipient) for i in load_identities(good)] == [SPEC_RECIPIENT]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# comment\n{SPEC_IDENTITY[:-1]}Q\n")
    with pytest.raises(AgeFormatError, match=r"bad\.txt:2: ") as excinfo:
        load_identities(bad)
    assert SPEC_IDENTITY[:-1] not in str(excinfo.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(AgeFormatError, match="no identities"):
        load_identities(empty)


def test_parse_recipients_skips_comments_and_names_bad_lines():
    lines = ["# central store", SPEC_RECIPIENT, "", "  " + SPEC_RECIPIENT + "  "]
    assert [str(r) for r in parse_recipients(lines)] == [SPEC_RECIPIENT] * 2
    with pytest.raises(AgeFormatError, match=r"escrow\.txt:2"):
        parse_recipients(["# x", "age1notakey"], "escrow.txt")


# --- header ----------------------------------------------------------------------------
def test_header_round_trip_and_mac():
    file_key = os.urandom(16)
    identity = Identity.generate()
    raw = write_header(file_key, [Identity.generate().recipient, identity.recipient])
    header, length = parse_header(raw + b"payload follows")
    assert length == len(raw)
    assert [s.args[0] for s in header.stanzas] == ["X25519", "X25519"]
    assert raw.startswith(b"age-encryption.org/v1\n") and raw.endswith(b"\n")
    assert header.mac_input == raw[:raw.rindex(b"--- ") + 3]
    assert unwrap_file_key(header, [identity]) == file_key


def test_header_mac_mismatch_is_an_auth_error():
    identity = Identity.generate()
    raw = bytearray(write_header(os.urandom(16), [identity.recipient]))
    mac_start = raw.rindex(b"--- ") + 4
    raw[mac_start] = ord("A") if raw[mac_start] != ord("A") else ord("B")
    header, _ = parse_header(bytes(raw))
    with pytest.raises(AgeAuthError, match="MAC"):
        unwrap_file_key(header, [identity])


@pytest.mark.parametrize("body_len", [0, 32, 47, 48, 96, 100])
def test_unknown_stanzas_with_wrapped_bodies_are_parsed(body_len):
    # age.md: bodies wrap at 64 columns and end with a line shorter than 64 (maybe empty).
    grease = Stanza(("x-grease.example", "a!b"), os.urandom(body_len))
    encoded = grease.to_bytes()
    assert encoded.endswith(b"\n") and all(len(line) <= 64 for line in encoded.split(b"\n"))
    x25519 = Identity.generate().recipient.wrap(os.urandom(16))
    raw = (b"age-encryption.org/v1\n" + grease.to_bytes() + x25519.to_bytes()
           + b"--- " + agecrypt.b64encode_raw(bytes(32)) + b"\n")
    header, length = parse_header(raw)
    assert header.stanzas == (grease, x25519)
    assert length == len(raw)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda raw: raw.replace(b"/v1\n", b"/v2\n"), "age-encryption.org/v1"),
    (lambda raw: raw.replace(b"-> X25519 ", b"->  X25519 "), "malformed stanza arguments"),
    (lambda raw: raw[:raw.rindex(b"---")], "truncated"),
    (lambda raw: raw[:raw.rindex(b"\n")] + b"=\n", "base64"),
])
def test_malformed_headers_are_rejected(mutate, message):
    raw = write_header(os.urandom(16), [Identity.generate().recipient])
    with pytest.raises(AgeFormatError, match=message):
        parse_header(mutate(raw))


def test_non_canonical_base64_is_rejected():
    assert agecrypt.b64decode_raw(b"AA", "field") == b"\x00"
    for text in (b"AB", b"AA==", b"A", b"A*"):
        with pytest.raises(AgeFormatError, match="field"):
            agecrypt.b64decode_raw(text, "field")


# --- payload ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_stream_round_trip(size):
    identity = Identity.generate()
    data = os.urandom(size)
    blob = _encrypt(data, [identity.recipient])
    chunks = max(1, -(-size // agecrypt.CHUNK_BYTES))
    assert len(blob) == len(parse_header(blob)[0].mac_input) + 44 + 1 + 16 + size + 16 * chunks
    assert _decrypt(blob, [identity]) == data


def test_wrong_identity_cannot_decrypt():
    blob = _encrypt(b"secret call", [Identity.generate().recipient])
    with pytest.raises(NoMatchingIdentity, match="no identity matches"):
        _decrypt(blob, [Identity.generate()])
    with pytest.raises(NoMatchingIdentity):
        _decrypt(blob, [])


def test_every_recipient_decrypts_alone():
    central, escrow = Identity.generate(), Identity.generate()
    blob = _encrypt(b"x" * 70_000, [central.recipient, escrow.recipient])
    assert _decrypt(blob, [central]) == _decrypt(blob, [escrow]) == b"x" * 70_000


def test_flipped_payload_byte_fails_after_earlier_chunks_are_out():
    identity = Identity.generate()
    data = os.urandom(2 * 65536 + 10)
    blob = bytearray(_encrypt(data, [identity.recipient]))
    blob[-5] ^= 0x01
    out = io.BytesIO()
    with pytest.raises(AgeAuthError, match="chunk 2"):
        decrypt_stream(io.BytesIO(bytes(blob)), out, [identity])
    assert out.getvalue() == data[:2 * 65536]


@pytest.mark.parametrize("cut", ["chunk boundary", "mid chunk", "nonce", "no payload"])
def test_truncated_payload_is_detected(cut):
    identity = Identity.generate()
    blob = _encrypt(os.urandom(3 * 65536), [identity.recipient])
    payload_start = parse_header(blob)[1]
    end = {"chunk boundary": payload_start + 16 + 65552, "mid chunk": len(blob) - 100,
           "nonce": payload_start + 7, "no payload": payload_start + 16}[cut]
    with pytest.raises(AgeError):
        _decrypt(blob[:end], [identity])


def test_empty_final_chunk_after_data_is_rejected():
    # age.md: the final chunk MUST NOT be empty unless the whole payload is empty.
    identity = Identity.generate()
    file_key, nonce = os.urandom(16), os.urandom(16)
    aead = ChaCha20Poly1305(agecrypt.derive_payload_key(file_key, nonce))
    blob = (write_header(file_key, [identity.recipient]) + nonce
            + aead.encrypt(agecrypt.stream_nonce(0, False), b"a" * 65536, None)
            + aead.encrypt(agecrypt.stream_nonce(1, True), b"", None))
    with pytest.raises(AgeFormatError, match="final chunk 1 is empty"):
        _decrypt(blob, [identity])


# --- interoperability with the real age CLI ----------------------------------------------
@needs_age
@pytest.mark.parametrize("size", SIZES)
def test_age_cli_decrypts_our_files(tmp_path, size):
    key_file = _keygen(tmp_path / "key.txt")
    recipient = Recipient.parse(_cli_recipient(key_file))
    data = os.urandom(size)
    encrypted = tmp_path / "ours.age"
    encrypted.write_bytes(_encrypt(data, [recipient]))
    out = subprocess.run(["age", "-d", "-i", str(key_file), str(encrypted)],
                         capture_output=True, check=True).stdout
    assert out == data


@needs_age
@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_age_cli_files(tmp_path, size):
    key_file = _keygen(tmp_path / "key.txt")
    data = os.urandom(size)
    blob = subprocess.run(["age", "-r", _cli_recipient(key_file)], input=data,
                          capture_output=True, check=True).stdout
    assert _decrypt(blob, load_identities(key_file)) == data


@needs_age
def test_multiple_recipients_interoperate_both_ways(tmp_path):
    keys = [_keygen(tmp_path / "central.txt"), _keygen(tmp_path / "escrow.txt")]
    recipients = [_cli_recipient(k) for k in keys]
    data = os.urandom(100_000)
    ours = tmp_path / "ours.age"
    ours.write_bytes(_encrypt(data, [Recipient.parse(r) for r in recipients]))
    theirs = subprocess.run(["age", "-r", recipients[0], "-r", recipients[1]], input=data,
                            capture_output=True, check=True).stdout
    for key in keys:
        out = subprocess.run(["age", "-d", "-i", str(key), str(ours)], capture_output=True,
                             check=True).stdout
        assert out == data
        assert _decrypt(theirs, load_identities(key)) == data


@needs_age
def test_age_cli_rejects_our_tampered_and_truncated_files(tmp_path):
    key_file = _keygen(tmp_path / "key.txt")
    blob = _encrypt(os.urandom(150_000), [Recipient.parse(_cli_recipient(key_file))])
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 0x80
    for variant in (bytes(tampered), blob[:-1], blob[:len(blob) - 150_000 % 65536 - 16]):
        path = tmp_path / "bad.age"
        path.write_bytes(variant)
        result = subprocess.run(["age", "-d", "-i", str(key_file), str(path)],
                                capture_output=True, check=False)
        assert result.returncode != 0
