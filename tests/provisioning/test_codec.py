"""Frame codec: COBS, CRC32, header, chunked items; fuzzed with hypothesis."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning import codec as c

frames = st.builds(
    c.Frame, type=st.integers(0, 255), request_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=600), flags=st.sampled_from([c.Flag.NONE, c.Flag.RESPONSE]),
    mac=st.sampled_from([b"", b"m" * c.MAC_BYTES]))


@given(st.binary(max_size=2000))
def test_cobs_round_trip_has_no_zero(data: bytes) -> None:
    encoded = c.cobs_encode(data)
    assert 0 not in encoded
    assert c.cobs_decode(encoded) == data


@given(frames)
def test_frame_round_trip(frame: c.Frame) -> None:
    flags = frame.flags | c.Flag.MAC if frame.mac else frame.flags
    decoded = c.FrameDecoder().feed(c.encode_frame(frame))
    assert decoded == [c.Frame(frame.type, frame.request_id, frame.payload, flags, frame.mac)]


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    for item in c.FrameDecoder(max_frame=512).feed(data):
        assert isinstance(item, c.Frame | c.CodecError)
        if isinstance(item, c.CodecError):
            assert str(item)


@given(st.binary(max_size=300), frames)
def test_resynchronises_after_garbage(garbage: bytes, frame: c.Frame) -> None:
    items = c.FrameDecoder().feed(garbage + b"\x00" + c.encode_frame(frame))
    good = [i for i in items if isinstance(i, c.Frame)]
    assert good and good[-1].request_id == frame.request_id and good[-1].payload == frame.payload


@given(frames, st.data())
def test_single_bit_flip_is_detected(frame: c.Frame, data: st.DataObject) -> None:
    wire = bytearray(c.encode_frame(frame))
    index = data.draw(st.integers(0, len(wire) - 2))
    wire[index] ^= 1 << data.draw(st.integers(0, 7))
    good = [i for i in c.FrameDecoder().feed(bytes(wire)) if isinstance(i, c.Frame)]
    assert good == []


def test_oversized_stretch_is_dropped_with_a_clear_error() -> None:
    items = c.FrameDecoder(max_frame=128).feed(b"\x01" * 5000 + b"\x00")
    assert len(items) == 1 and "longer than" in str(items[0])


def test_unpack_names_the_field() -> None:
    with pytest.raises(c.CodecError, match="ItemReadReq"):
        c.unpack(c.pack(c.Empty()), c.ItemReadReq)


@given(st.binary(max_size=5000), st.integers(1, 700))
def test_item_chunks_reassemble_and_check_hash(data: bytes, step: int) -> None:
    assembler = c.ItemAssembler(c.item_info("chain", data))
    for offset in range(0, len(data), step):
        assembler.add(offset, data[offset:offset + step])
        assembler.add(offset, data[offset:offset + step])  # a retried chunk
    assert assembler.complete() == data


def test_item_with_wrong_hash_or_hole_is_refused() -> None:
    info = c.ItemInfo(name="certificate", size=4, sha256=hashlib.sha256(b"abcd").digest())
    assembler = c.ItemAssembler(info)
    with pytest.raises(c.CodecError, match="chunk at 2"):
        assembler.add(2, b"cd")
    assembler.add(0, b"abce")
    with pytest.raises(c.CodecError, match="SHA-256"):
        assembler.complete()
    with pytest.raises(c.CodecError, match="size"):
        c.ItemAssembler(c.ItemInfo(name="x", size=c.MAX_ITEM_BYTES + 1, sha256=bytes(32)))
