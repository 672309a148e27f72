from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import shutil
import struct
import subprocess
import warnings
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware import agecrypt
from firmware.agecrypt import Identity, Recipient, load_identities, parse_header
from firmware.codec import alaw_decode, alaw_encode
from firmware.recfile import (
    MAX_FLUSH_SAMPLES,
    Gap,
    NoMatchingIdentity,
    RecordingAuthError,
    RecordingError,
    RecordingFormatError,
    RecordingIOError,
    RecordingWriter,
    decrypt_recording,
    export_age,
    part_path_for,
    read_plain_header,
    recover,
    write_wav,
)

RATE = 8000
FRAME = 160  # 20 ms
HEADER = {"recording_id": "rec-0001", "call_id": "call-7", "line_id": "line1",
          "device_id": "dev-42", "created": 1_790_000_000.0}
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")
needs_age = pytest.mark.skipif(shutil.which("age") is None or shutil.which("age-keygen") is None,
                               reason="age CLI not installed")


def _speechlike(samples: int, seed: int = 1) -> np.ndarray:
    """Deterministic test audio: two tones and noise, about -12 dBFS."""
    t = np.arange(samples) / RATE
    rng = np.random.default_rng(seed)
    signal = 6000 * np.sin(2 * np.pi * 440 * t) + 2000 * np.sin(2 * np.pi * 1330 * t)
    return (signal + rng.normal(0, 800, samples)).astype(np.int16)


def _g711(pcm: np.ndarray) -> np.ndarray:
    """What a perfect A-law round trip gives back."""
    return alaw_decode(alaw_encode(pcm))


def _feed(writer: RecordingWriter, start: int, pcm: np.ndarray) -> None:
    for offset in range(0, len(pcm), FRAME):
        writer.write_audio(start + offset, pcm[offset:offset + FRAME])


def _record_offsets(data: bytes) -> list[int]:
    """Start offset of every record plus the end, walked with the format's framing."""
    plain_end = data.index(b"\n", data.index(b"\n") + 1) + 1
    offset = plain_end + parse_header(data[plain_end:])[1] + 16
    offsets = [offset]
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 8 + length
        offsets.append(offset)
    assert offset == len(data)
    return offsets


def _crash_copy(writer: RecordingWriter, dest: Path) -> Path:
    """What a power cut leaves: the .part as written so far, the writer never closed."""
    shutil.copyfile(writer.part_path, dest)
    writer.abort(discard=True)
    return dest


@pytest.fixture
def central() -> Identity:
    return Identity.generate()


@pytest.fixture
def escrow() -> Identity:
    return Identity.generate()


@pytest.fixture
def small_recording(tmp_path, central) -> tuple[Path, np.ndarray]:
    """0.15 s in three 400-sample AUDIO records, a GAP and END."""
    pcm = _speechlike(1200)
    path = tmp_path / "small.rec"
    with RecordingWriter(path, recipients=[central.recipient], header=HEADER,
                         flush_interval_s=0.05) as writer:
        _feed(writer, 0, pcm)
        writer.write_gap(1200, 1600, "card data")
    return path, pcm


# --- round trip ---------------------------------------------------------------------------
def test_several_minutes_with_a_jump_and_a_gap_round_trip(tmp_path, central):
    first, second = _speechlike(716_000, seed=2), _speechlike(60 * RATE, seed=3)
    jump_to = len(first) + 4000  # mid-record: 0.5 s of samples the line never delivered
    gap_end = jump_to + len(second) + 20 * RATE
    start = 123_456  # call starts mid-timeline
    path = tmp_path / "call.rec"
    writer = RecordingWriter(path, recipients=[central.recipient], header=HEADER)
    _feed(writer, start, first)
    _feed(writer, start + jump_to, second)
    writer.write_gap(start + jump_to + len(second), start + gap_end, "card data")
    writer.write_audio(start + gap_end, first[:4000])
    summary = writer.close("hangup")

    data = path.read_bytes()
    assert not part_path_for(path).exists()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert summary.size_bytes == len(data) == writer.bytes_written
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    assert summary.samples == len(first) + len(second) + 4000
    assert summary.records == len(_record_offsets(data)) - 1 == 45 + 30 + 1 + 1 + 1
    # 89.5 s = 44 full records + 1.5 s sealed at the jump; 30 after it; GAP; 0.5 s; END

    rec = decrypt_recording(path, [central], strict=True)
    assert rec.complete and rec.error is None and rec.end_reason == "hangup"
    assert rec.start_sample == start
    assert rec.header == {**HEADER, "codec": "alaw", "sample_rate": 8000}
    assert rec.gaps == [Gap(start + len(first), start + jump_to, "unrecorded"),
                        Gap(start + jump_to + len(second), start + gap_end, "card data")]
    expected = np.concatenate([_g711(first), np.zeros(4000, np.int16), _g711(second),
                               np.zeros(20 * RATE, np.int16), _g711(first[:4000])])
    assert np.array_equal(rec.pcm, expected)


def test_plain_header_is_readable_without_a_key(small_recording):
    path, _ = small_recording
    assert read_plain_header(path) == {**HEADER, "codec": "alaw", "sample_rate": 8000}
    assert path.read_bytes().startswith(b'EDGEREC1\n{"call_id":"call-7","codec":"alaw",')


def test_records_split_at_the_flush_interval_and_at_jumps(tmp_path, central):
    path = tmp_path / "r.rec"
    writer = RecordingWriter(path, recipients=[central.recipient], header=HEADER,
                             flush_interval_s=0.1, sync=False)
    writer.write_audio(0, _speechlike(2000))  # 800 + 800 + 400
    writer.write_audio(2000, _speechlike(100))  # contiguous: joins the 400
    writer.write_audio(5000, _speechlike(100))  # jump: seals 500, starts a new record
    writer.close("end")
    lengths = np.diff(_record_offsets(path.read_bytes())).tolist()
    overhead = 8 + 9 + 16  # frame prefix + record head + tag
    assert lengths[:-1] == [overhead + n for n in (800, 800, 500, 100)]


def test_empty_recording_is_complete(tmp_path, central):
    path = tmp_path / "empty.rec"
    RecordingWriter(path, recipients=[central.recipient], header=HEADER).close("no answer")
    rec = decrypt_recording(path, [central], strict=True)
    assert rec.complete and rec.end_reason == "no answer" and len(rec.pcm) == 0


def test_timeline_only_moves_forward(tmp_path, central):
    writer = RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient], header=HEADER)
    writer.write_audio(1000, _speechlike(160))
    with pytest.raises(ValueError, match="only moves forward"):
        writer.write_audio(1100, _speechlike(160))
    with pytest.raises(ValueError, match="only moves forward"):
        writer.write_gap(0, 5000, "x")
    with pytest.raises(ValueError, match="1-D int16"):
        writer.write_audio(2000, np.zeros(160, np.float32))
    writer.abort(discard=True)


@pytest.mark.parametrize("interval_s", [0.0, 9.0])
def test_flush_interval_is_bounded_by_the_record_cap(tmp_path, central, interval_s):
    assert MAX_FLUSH_SAMPLES / RATE < 9.0
    with pytest.raises(ValueError, match="flush_interval_s"):
        RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient], header=HEADER,
                        flush_interval_s=interval_s)


def test_header_must_say_alaw_at_8000(tmp_path, central):
    with pytest.raises(ValueError, match="codec"):
        RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient],
                        header={**HEADER, "codec": "ulaw"})


# --- lifecycle ---------------------------------------------------------------------------
def test_close_is_idempotent_and_writes_after_close_fail(tmp_path, central):
    writer = RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient], header=HEADER)
    writer.write_audio(0, _speechlike(800))
    summary = writer.close("hangup")
    assert writer.close("again") == summary
    with pytest.raises(RecordingError, match="already closed"):
        writer.write_audio(800, _speechlike(160))


def test_existing_part_or_final_file_is_never_overwritten(tmp_path, central):
    path = tmp_path / "r.rec"
    writer = RecordingWriter(path, recipients=[central.recipient], header=HEADER)
    with pytest.raises(RecordingIOError, match=r"r\.rec\.part"):
        RecordingWriter(path, recipients=[central.recipient], header=HEADER)
    writer.close("end")
    with pytest.raises(RecordingIOError, match="already exists"):
        RecordingWriter(path, recipients=[central.recipient], header=HEADER)


def test_exception_in_context_leaves_a_recoverable_part(tmp_path, central):
    path = tmp_path / "r.rec"
    pcm = _speechlike(3 * RATE)
    with pytest.raises(RuntimeError), RecordingWriter(
            path, recipients=[central.recipient], header=HEADER, flush_interval_s=1) as writer:
        _feed(writer, 0, pcm)
        raise RuntimeError("line died")
    assert not path.exists()
    summary = recover(part_path_for(path), path)
    assert summary.records == 3 and summary.truncated_bytes == 0
    rec = decrypt_recording(path, [central])
    assert not rec.complete and rec.error is None
    assert np.array_equal(rec.pcm, _g711(pcm))
    with pytest.raises(RecordingFormatError, match="no END record"):
        decrypt_recording(path, [central], strict=True)


# --- keys ---------------------------------------------------------------------------------
def test_device_cannot_decrypt_without_an_identity(small_recording):
    path, _ = small_recording
    with pytest.raises(NoMatchingIdentity, match=r"small\.rec"):
        decrypt_recording(path, [])
    with pytest.raises(agecrypt.NoMatchingIdentity):  # same error seen from the age layer
        decrypt_recording(path, [Identity.generate()])


def test_each_recipient_decrypts_alone(tmp_path, central, escrow):
    path = tmp_path / "r.rec"
    pcm = _speechlike(4000)
    with RecordingWriter(path, recipients=[central.recipient, escrow.recipient],
                         header=HEADER) as writer:
        _feed(writer, 0, pcm)
    for identity in (central, escrow):
        rec = decrypt_recording(path, [identity], strict=True)
        assert rec.complete and np.array_equal(rec.pcm, _g711(pcm))


# --- tampering ---------------------------------------------------------------------------
def _region_offsets(data: bytes) -> dict[str, int]:
    records = _record_offsets(data)
    age_start = data.index(b"\n", data.index(b"\n") + 1) + 1
    return {"magic": 3, "plain header json": data.index(b"rec-0001"),
            "age header stanza": data.index(b"-> X25519 ") + 15,
            "age header mac": data.index(b"--- ") + 10, "nonce": records[0] - 5,
            "record length": records[1] + 2, "record crc": records[1] + 6,
            "ciphertext": records[1] + 40, "end record": records[-2] + 20,
            "age version": age_start + 20}


@pytest.mark.parametrize("region", ["magic", "plain header json", "age header stanza",
                                    "age header mac", "nonce", "record length", "record crc",
                                    "ciphertext", "end record", "age version"])
def test_flipped_byte_in_each_region_is_detected(small_recording, central, region):
    path, _ = small_recording
    data = bytearray(path.read_bytes())
    data[_region_offsets(bytes(data))[region]] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError):
        decrypt_recording(path, [central], strict=True)


def test_flipped_byte_anywhere_is_detected(small_recording, central):
    path, _ = small_recording
    original = path.read_bytes()
    for offset in range(len(original)):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(bytes(tampered))
        try:
            rec = decrypt_recording(path, [central])
        except RecordingError:
            continue
        assert not rec.complete and rec.error, f"flip at offset {offset} went unnoticed"


def test_payload_damage_keeps_the_audio_verified_before_it(small_recording, central):
    path, pcm = small_recording
    data = bytearray(path.read_bytes())
    records = _record_offsets(bytes(data))
    data[records[2] + 30] ^= 0x01  # third AUDIO record
    path.write_bytes(bytes(data))
    rec = decrypt_recording(path, [central])
    assert not rec.complete and "CRC-32" in rec.error
    assert np.array_equal(rec.pcm, _g711(pcm[:800]))


def test_aead_catches_what_a_recomputed_crc_hides(small_recording, central):
    path, pcm = small_recording
    data = bytearray(path.read_bytes())
    start = _record_offsets(bytes(data))[1]
    length = struct.unpack_from(">I", data, start)[0]
    data[start + 8 + 20] ^= 0x01
    struct.pack_into(">I", data, start + 4, zlib.crc32(data[start + 8:start + 8 + length]))
    path.write_bytes(bytes(data))
    rec = decrypt_recording(path, [central])
    assert "record 1 " in rec.error and "authentication" in rec.error
    assert np.array_equal(rec.pcm, _g711(pcm[:400]))
    with pytest.raises(RecordingAuthError):
        decrypt_recording(path, [central], strict=True)


def test_swapped_records_are_detected(small_recording, central):
    path, pcm = small_recording
    data = path.read_bytes()
    r = _record_offsets(data)
    swapped = data[:r[1]] + data[r[2]:r[3]] + data[r[1]:r[2]] + data[r[3]:]
    path.write_bytes(swapped)
    rec = decrypt_recording(path, [central])
    assert not rec.complete and "record 1 " in rec.error
    assert np.array_equal(rec.pcm, _g711(pcm[:400]))


def test_removed_record_and_data_after_end_are_detected(small_recording, central):
    path, _ = small_recording
    data = path.read_bytes()
    r = _record_offsets(data)
    path.write_bytes(data[:r[1]] + data[r[2]:])
    assert decrypt_recording(path, [central]).error is not None
    path.write_bytes(data + data[r[0]:r[1]])
    rec = decrypt_recording(path, [central])
    assert not rec.complete and "after the END record" in rec.error


# --- truncation and recovery --------------------------------------------------------------
def test_truncation_anywhere_in_the_last_two_records_recovers_a_prefix(tmp_path, central):
    pcm = _speechlike(2000)
    source = tmp_path / "full.rec"
    with RecordingWriter(source, recipients=[central.recipient], header=HEADER,
                         flush_interval_s=0.05, sync=False) as writer:
        _feed(writer, 0, pcm)  # five 400-sample records, then END
    data = source.read_bytes()
    records = _record_offsets(data)
    assert len(records) == 7
    for cut in range(records[-3], len(data)):
        kept = sum(1 for end in records[1:] if end <= cut)
        part, final = tmp_path / f"c{cut}.rec.part", tmp_path / f"c{cut}.rec"
        part.write_bytes(data[:cut])
        summary = recover(part, final)
        assert (summary.records, summary.size_bytes) == (kept, records[kept])
        assert summary.truncated_bytes == cut - records[kept]
        assert summary.sha256 == hashlib.sha256(data[:records[kept]]).hexdigest()
        rec = decrypt_recording(final, [central])
        assert not rec.complete and rec.error is None and rec.end_reason is None
        assert np.array_equal(rec.pcm, _g711(pcm[:400 * kept])), f"cut at {cut}"
        final.unlink()


def test_torn_tail_of_zeros_is_removed(tmp_path, central):
    pcm = _speechlike(5 * RATE)
    writer = RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient], header=HEADER,
                             flush_interval_s=1)
    _feed(writer, 0, pcm)
    crashed = _crash_copy(writer, tmp_path / "crashed.rec.part")
    intact_size = crashed.stat().st_size
    with crashed.open("ab") as f:
        f.write(bytes(4096))  # ext4 after power loss: size updated, blocks zero
    rec = decrypt_recording(crashed, [central])
    assert not rec.complete and "out of range" in rec.error
    assert np.array_equal(rec.pcm, _g711(pcm))
    summary = recover(crashed, tmp_path / "crashed.rec")
    assert summary.truncated_bytes == 4096 and summary.size_bytes == intact_size
    rec = decrypt_recording(tmp_path / "crashed.rec", [central])
    assert rec.error is None and np.array_equal(rec.pcm, _g711(pcm))


def test_recover_refuses_a_torn_header_and_an_existing_target(tmp_path, central):
    part = tmp_path / "torn.rec.part"
    part.write_bytes(b"EDGEREC1\n{}\nage-encryption.org/v1\n-> X25519 ")
    with pytest.raises(RecordingFormatError, match=r"torn\.rec\.part"):
        recover(part, tmp_path / "torn.rec")
    assert part.exists()
    (tmp_path / "taken.rec").write_bytes(b"")
    with pytest.raises(RecordingIOError, match="exists"):
        recover(part, tmp_path / "taken.rec")


@pytest.mark.parametrize("seconds", [7.02, 30.0, 31.98])
def test_power_loss_loses_at_most_the_flush_interval(tmp_path, central, seconds):
    pcm = _speechlike(round(seconds * RATE))
    writer = RecordingWriter(tmp_path / "r.rec", recipients=[central.recipient], header=HEADER,
                             flush_interval_s=2.0)
    _feed(writer, 0, pcm)
    crashed = _crash_copy(writer, tmp_path / "crashed.rec.part")
    recover(crashed, tmp_path / "crashed.rec")
    rec = decrypt_recording(tmp_path / "crashed.rec", [central])
    assert len(rec.pcm) >= len(pcm) - 2 * RATE
    assert np.array_equal(rec.pcm, _g711(pcm[:len(rec.pcm)]))


# --- the written specification ------------------------------------------------------------
def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _doc_unwrap(age_lines: list[bytes], private: X25519PrivateKey) -> bytes:
    """docs/FORMAT.md "age header": unwrap the file key and check the header MAC."""
    def b64(text: bytes) -> bytes:
        return base64.b64decode(text + b"=" * (-len(text) % 4))

    mine = private.public_key().public_bytes_raw()
    share = b64(age_lines[1].split(b" ")[2])
    secret = private.exchange(X25519PublicKey.from_public_bytes(share))
    wrap_key = _hkdf(secret, share + mine, b"age-encryption.org/v1/X25519")
    file_key = ChaCha20Poly1305(wrap_key).decrypt(bytes(12), b64(age_lines[2]), None)
    mac_key = _hkdf(file_key, b"", b"header")
    mac = hmac.new(mac_key, b"\n".join(age_lines[:3]) + b"\n---", hashlib.sha256).digest()
    assert mac == b64(age_lines[3][4:])
    return file_key


def _doc_decrypt(data: bytes, private: X25519PrivateKey) -> tuple[dict, list[tuple]]:
    """A decryptor written from docs/FORMAT.md alone (one recipient, no error handling)."""
    plain_end = data.index(b"\n", 9) + 1
    age_lines = data[plain_end:].split(b"\n")[:4]
    file_key = _doc_unwrap(age_lines, private)
    offset = plain_end + sum(len(line) + 1 for line in age_lines)
    payload_key = _hkdf(file_key, data[offset:offset + 16], b"payload")
    aead, ad = ChaCha20Poly1305(payload_key), hashlib.sha256(data[:plain_end]).digest()
    offset, records = offset + 16, []
    while offset < len(data):
        length, crc = struct.unpack_from(">II", data, offset)
        sealed = data[offset + 8:offset + 8 + length]
        assert zlib.crc32(sealed) == crc
        final = offset + 8 + length == len(data)
        nonce = len(records).to_bytes(11, "big") + (b"\x01" if final else b"\x00")
        plaintext = aead.decrypt(nonce, sealed, ad)
        records.append((plaintext[0], int.from_bytes(plaintext[1:9], "big"), plaintext[9:]))
        offset += 8 + length
    return json.loads(data[9:plain_end]), records


def test_format_doc_is_enough_for_an_independent_decryptor(tmp_path):
    private = X25519PrivateKey.generate()
    recipient = Recipient(private.public_key().public_bytes_raw())
    pcm = _speechlike(1000)
    path = tmp_path / "r.rec"
    with RecordingWriter(path, recipients=[recipient], header=HEADER,
                         flush_interval_s=0.1) as writer:
        writer.write_audio(50, pcm)
        writer.write_gap(1050, 1300, "card data")
    header, records = _doc_decrypt(path.read_bytes(), private)
    assert header["codec"] == "alaw" and header["recording_id"] == "rec-0001"
    assert [(kind, start) for kind, start, _ in records] == [(1, 50), (1, 850), (2, 1050),
                                                             (3, 1300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # an independent G.711 decoder
    audio = b"".join(audioop.alaw2lin(body, 2) for kind, _, body in records if kind == 1)
    assert np.array_equal(np.frombuffer(audio, np.int16), _g711(pcm))
    assert records[2][2] == (1300).to_bytes(8, "big") + b"card data"
    assert json.loads(records[3][2]) == {"end_sample": 1300, "reason": "end", "samples": 1000}


# --- standard outputs --------------------------------------------------------------------
def _sox_info(path: Path, flag: str) -> str:
    return subprocess.run(["sox", "--i", flag, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _wav_pcm(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


@needs_sox
def test_decrypted_wav_opens_in_sox(small_recording, central, tmp_path):
    path, pcm = small_recording
    rec = decrypt_recording(path, [central])
    wav = tmp_path / "call.wav"
    write_wav(wav, rec.pcm)
    assert not part_path_for(wav).exists()
    assert (_sox_info(wav, "-r"), _sox_info(wav, "-c"), _sox_info(wav, "-b")) == ("8000", "1",
                                                                                 "16")
    assert _sox_info(wav, "-s") == str(1600)
    raw = subprocess.run(["sox", str(wav), "-t", "s16", "-L", "-"], capture_output=True,
                         check=True).stdout
    assert np.array_equal(np.frombuffer(raw, "<i2"), np.concatenate(
        [_g711(pcm), np.zeros(400, np.int16)]))


@needs_age
@needs_sox
def test_export_is_a_standard_age_file_holding_a_wav(small_recording, central, tmp_path):
    path, pcm = small_recording
    key_file = tmp_path / "archive.txt"
    subprocess.run(["age-keygen", "-o", str(key_file)], capture_output=True, check=True)
    out = tmp_path / "call.wav.age"
    rec = export_age(path, [central], out, [load_identities(key_file)[0].recipient])
    assert rec.complete
    wav_bytes = subprocess.run(["age", "-d", "-i", str(key_file), str(out)],
                               capture_output=True, check=True).stdout
    wav = tmp_path / "x.wav"
    wav.write_bytes(wav_bytes)
    assert (_sox_info(wav, "-r"), _sox_info(wav, "-s")) == ("8000", "1600")
    assert np.array_equal(_wav_pcm(wav_bytes), rec.pcm)
    assert np.array_equal(rec.pcm[:1200], _g711(pcm))


def test_blocks_are_reserved_while_writing_and_released_at_close(tmp_path: Path) -> None:
    """Preallocation past EOF (less metadata journaled per fdatasync) never outlives close."""
    from firmware.agecrypt import Identity
    from firmware.fsutil import preallocate
    from firmware.recfile import PREALLOCATE_BYTES, RecordingWriter, recover

    probe = tmp_path / "probe"
    with probe.open("wb") as f:
        if not preallocate(f.fileno(), 0, 4096):
            pytest.skip("this file system cannot preallocate")
    identity = Identity.generate()
    pcm = np.zeros(160, dtype=np.int16)
    for crash in (False, True):
        path = tmp_path / f"r{crash}.rec"
        writer = RecordingWriter(path, recipients=[identity.recipient], header={"x": 1})
        for k in range(50 * 5):
            writer.write_audio(k * 160, pcm)
        part = writer.part_path
        st = part.stat()
        assert st.st_blocks * 512 >= PREALLOCATE_BYTES > st.st_size  # reserved past EOF
        if crash:
            writer.abort()
            recover(part, path)
        else:
            writer.close("hangup")
        st = path.stat()
        assert st.st_blocks * 512 < st.st_size + 8192  # released
