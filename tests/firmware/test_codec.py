from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest

from firmware.codec import alaw_decode, alaw_encode

ALL_INT16 = np.arange(65536, dtype=np.uint16).view(np.int16)
ALL_CODES = bytes(range(256))
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


def _sox(args: list[str], data: bytes) -> bytes:
    return subprocess.run(["sox", "-D", *args], input=data, capture_output=True,
                          check=True).stdout


def test_encode_matches_audioop_for_every_int16_value():
    assert alaw_encode(ALL_INT16) == _audioop().lin2alaw(ALL_INT16.tobytes(), 2)


def test_decode_matches_audioop_for_every_code():
    assert alaw_decode(ALL_CODES).tobytes() == _audioop().alaw2lin(ALL_CODES, 2)


def test_known_codes_from_g711_table():
    # G.711 Table 1a: 0xD5/0x55 are the smallest positive/negative steps, 0xAA/0x2A the largest.
    codes = alaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16))
    assert codes == bytes([0xD5, 0x55, 0xAA, 0x2A])
    assert alaw_decode(codes).tolist() == [8, -8, 32256, -32256]


def test_every_code_survives_decode_then_encode():
    assert alaw_encode(alaw_decode(ALL_CODES)) == ALL_CODES


def test_quantisation_error_is_at_most_half_a_step():
    error = np.abs(alaw_decode(alaw_encode(ALL_INT16)).astype(np.int32) - ALL_INT16)
    linear = ALL_INT16.astype(np.int32)
    magnitude = np.where(linear >= 0, linear, -linear - 1)
    # G.711 Table 1a on the 16-bit scale: step 16 below 512, then doubling per segment.
    step = np.maximum(16, 2 ** (np.floor(np.log2(np.maximum(magnitude, 1))) - 4))
    assert (error <= step / 2).all()


def test_decode_returns_a_writable_int16_copy():
    pcm = alaw_decode(b"\xd5\x55")
    pcm[0] = 1
    assert pcm.dtype == np.int16
    assert alaw_decode(b"\xd5").tolist() == [8]


def test_rejects_anything_but_1d_int16():
    with pytest.raises(ValueError, match="1-D int16"):
        alaw_encode(np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError, match="1-D int16"):
        alaw_encode(np.zeros((2, 2), dtype=np.int16))


@needs_sox
def test_sox_decodes_our_alaw_file_identically(tmp_path):
    source = tmp_path / "in.al"
    source.write_bytes(ALL_CODES * 3)
    out = subprocess.run(["sox", "-t", "al", "-r", "8000", "-c", "1", str(source),
                          "-t", "s16", "-L", "-"], capture_output=True, check=True).stdout
    assert np.frombuffer(out, dtype="<i2").tolist() == alaw_decode(ALL_CODES * 3).tolist()


@needs_sox
def test_sox_encoder_agrees_after_rounding_to_13_bits():
    # sox rounds 16-bit input to the 13-bit G.711 scale; the reference coder truncates.
    out = _sox(["-t", "s16", "-L", "-r", "8000", "-c", "1", "-", "-t", "al", "-"],
               ALL_INT16.tobytes())
    rounded = np.clip(np.floor((ALL_INT16.astype(np.int32) + 4) / 8) * 8, -32768, 32760)
    assert out == alaw_encode(rounded.astype(np.int16))
