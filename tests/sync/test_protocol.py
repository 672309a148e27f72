"""The upload protocol codec: round trips, range arithmetic, the chunk size rule, and one-line
errors for malformed messages."""

from __future__ import annotations

import json

import pytest

from sync import protocol as p

RID = "01890a5d-ac96-774b-bcce-b302099a8057"
SHA = "ab" * 32


def test_ranges_merge_and_missing() -> None:
    assert p.merge_ranges([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert p.missing_ranges(15, [(0, 4), (5, 12)]) == [(4, 5), (12, 15)]
    assert p.missing_ranges(10, []) == [(0, 10)]
    assert p.missing_ranges(10, [(0, 10)]) == []
    assert p.missing_ranges(0, []) == []
    assert p.split_ranges([(0, 10), (20, 25)], 4) == [(0, 4), (4, 8), (8, 10), (20, 24),
                                                      (24, 25)]
    assert p.covered([(0, 4), (4, 8)], (2, 7)) and not p.covered([(0, 4)], (3, 5))


def test_chunk_size_rule() -> None:
    topic = 100
    assert p.chunk_size(120 * 1024, topic, None) == 120 * 1024
    assert p.chunk_size(120 * 1024, topic, 256 * 1024) == 120 * 1024
    clamped = p.chunk_size(120 * 1024, topic, 16 * 1024)
    assert clamped % 1024 == 0
    assert clamped + p.CHUNK_HEADER.size + topic + p.PUBLISH_OVERHEAD_BYTES <= 16 * 1024
    assert p.chunk_size(2048 * 1024, topic, None) == p.MAX_CHUNK_BYTES
    with pytest.raises(p.ProtocolError, match="maximum packet size 300"):
        p.chunk_size(120 * 1024, topic, 300)


def test_chunk_round_trip_and_damage() -> None:
    payload = p.encode_chunk(RID, 1 << 33, b"hello")
    assert len(payload) == p.CHUNK_HEADER.size + 5 == 45
    chunk = p.decode_chunk(payload)
    assert (chunk.recording_id, chunk.offset, chunk.data) == (RID, 1 << 33, b"hello")
    assert p.chunk_offset(payload) == 1 << 33 and p.chunk_recording_id(payload) == RID
    with pytest.raises(p.ProtocolError, match="CRC-32") as caught:
        p.decode_chunk(payload[:-1] + b"X")
    assert caught.value.code == "bad_chunk"
    with pytest.raises(p.ProtocolError, match="length"):
        p.decode_chunk(payload + b"extra")
    with pytest.raises(p.ProtocolError, match="magic"):
        p.decode_chunk(b"XXXX" + payload[4:])


def init_payload(**changes: object) -> bytes:
    manifest = {"recording_id": RID, "device_id": "dev-a", "size": 10, "sha256": SHA}
    raw = {"v": 1, "recording_id": RID, "size": 10, "sha256": SHA, "chunk_size": 4096,
           "manifest": manifest, "manifest_sig": "A" * 86 + "=="}
    raw.update(changes)
    return json.dumps(raw).encode()


def test_init_round_trip() -> None:
    init = p.decode_init(init_payload())
    assert init.size == 10 and len(init.manifest_sig) == 64
    assert p.decode_init(init.encode()) == init


@pytest.mark.parametrize(("changes", "needle"), [
    ({"v": 2}, "v: 2"),
    ({"size": "10"}, "size: expected int"),
    ({"size": True}, "size: expected int, got a boolean"),
    ({"size": p.MAX_RECORDING_BYTES + 1}, "exceeds"),
    ({"sha256": "AB" * 32}, "sha256: not 64 lower-case hex"),
    ({"recording_id": "nope"}, "not a UUID"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"manifest_sig": "!!"}, "not base64"),
    ({"manifest": {"recording_id": RID, "device_id": "dev-a", "size": 11, "sha256": SHA}},
     "differs from the init"),
])
def test_init_errors_are_one_line(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(p.ProtocolError, match=needle) as caught:
        p.decode_init(init_payload(**changes))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff", b"[]", b"1", b"x" * 70_000])
def test_not_json_objects(payload: bytes) -> None:
    for decode in (p.decode_init, p.decode_fin, p.decode_ack, p.decode_receipt,
                   p.decode_erasure, p.decode_audit_batch):
        with pytest.raises(p.ProtocolError):
            decode(payload)


def test_ack_round_trip_and_checks() -> None:
    ack = p.Ack(RID, p.STORED, [(0, 10)], 10, SHA)
    assert p.decode_ack(ack.encode()) == ack
    partial = p.Ack(RID, p.PARTIAL, [(0, 4)], error="bad_chunk", bad_offset=4)
    assert p.decode_ack(partial.encode()) == partial
    with pytest.raises(p.ProtocolError, match="rejected needs an error"):
        p.decode_ack(json.dumps({"v": 1, "recording_id": RID, "state": "rejected",
                                 "have": []}).encode())
    with pytest.raises(p.ProtocolError, match=r"have\[0\]"):
        p.decode_ack(json.dumps({"v": 1, "recording_id": RID, "state": "partial",
                                 "have": [[5, 2]]}).encode())
    with pytest.raises(p.ProtocolError, match="not a known code"):
        p.decode_ack(json.dumps({"v": 1, "recording_id": RID, "state": "partial",
                                 "have": [], "error": "oops"}).encode())
    routed = p.Ack(RID, p.PARTIAL, [(0, 4)], worker="ingest-2")
    assert p.decode_ack(routed.encode()) == routed
    for worker in ("a/b", "+", "", 7, "x" * 65):
        with pytest.raises(p.ProtocolError, match="worker"):
            p.decode_ack(json.dumps({"v": 1, "recording_id": RID, "state": "partial",
                                     "have": [], "worker": worker}).encode())


def test_topics() -> None:
    topic = p.parse_topic(p.rec_topic("dev-a", "up", RID, "chunk"))
    assert topic == p.Topic("dev-a", "up", ("rec", RID, "chunk"))
    # a chunk routed to one worker stands for the same up topic
    routed = p.routed_topic("dev-a", "ingest-2", RID, "chunk")
    assert routed == f"er/v1/dev-a/to/ingest-2/rec/{RID}/chunk"
    assert p.parse_topic(routed) == topic
    for bad in ("er/v2/dev-a/up/x", "er/v1/../up/x", "er/v1/dev-a/sideways/x", "er/v1",
                "er/v1/dev-a/to", "er/v1/dev-a/to/+/rec/x/chunk"):
        with pytest.raises(p.ProtocolError):
            p.parse_topic(bad)
