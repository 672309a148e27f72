"""G.711 A-law (ITU-T G.711, 1988) for 16-bit linear audio.

A-law is what the European PSTN carries: 8 bits per sample at 8 kHz (64 kbit/s). The
quantiser works on 13-bit linear magnitudes split into eight segments (chords) of
16 steps; even bits are inverted on the wire (XOR 0x55, G.711 Table 1a note).

Both directions are table lookups built once per process: a 65536-entry encode table
indexed by the int16 samples viewed as uint16, and a 256-entry decode table.
"""

from __future__ import annotations

import functools

import numpy as np

# ITU-T G.711 Table 1a: upper end of each segment on the 12-bit magnitude scale
# (16-bit input shifted right by 3, sign removed).
_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
# ITU-T G.711 Table 1a: even-bit inversion; the sign bit is 1 for positive values.
_XOR_POSITIVE = 0xD5
_XOR_NEGATIVE = 0x55


def _encode_values(linear: np.ndarray) -> np.ndarray:
    """A-law code of each int32 value in the int16 range."""
    value_13 = linear >> 3  # 16-bit to 13-bit, rounding toward minus infinity
    positive = value_13 >= 0
    magnitude = np.where(positive, value_13, -value_13 - 1)
    segment = np.searchsorted(_SEGMENT_ENDS, magnitude, side="left").astype(np.int32)
    shift = np.maximum(segment, 1)
    mantissa = (magnitude >> shift) & 0x0F
    code = (segment << 4) | mantissa
    mask = np.where(positive, _XOR_POSITIVE, _XOR_NEGATIVE)
    return (code ^ mask).astype(np.uint8)


@functools.cache
def _encode_table() -> np.ndarray:
    """uint8[65536]: A-law code for every int16 sample, indexed by its uint16 view."""
    linear = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    table = _encode_values(linear)
    table.flags.writeable = False
    return table


@functools.cache
def _decode_table() -> np.ndarray:
    """int16[256]: the linear value (segment mid-point) of every A-law code."""
    code = np.arange(256, dtype=np.int32) ^ _XOR_NEGATIVE
    segment = (code >> 4) & 0x07
    step = ((code & 0x0F) << 4) + 8  # mid-point of the step, 16-bit scale
    linear = np.where(segment == 0, step, (step + 0x100) << np.maximum(segment - 1, 0))
    signed = np.where(code & 0x80, linear, -linear).astype(np.int16)
    signed.flags.writeable = False
    return signed


def alaw_encode(pcm: np.ndarray) -> bytes:
    """Encode 1-D int16 linear samples to A-law bytes (one byte per sample)."""
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"alaw_encode takes a 1-D int16 array, not {pcm.ndim}-D {pcm.dtype}")
    return _encode_table()[pcm.view(np.uint16)].tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    """Decode A-law bytes to int16 linear samples (a new, writable array)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return _decode_table()[codes]
