"""The object store's staging parts: ranges counted without reading back equal a fresh
read; the assembled object is the ciphertext whichever worker took which chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sync.central.objects import ObjectStore

DEVICE, RID = "dev-a", "0190d6e4-7c1a-7000-8000-000000000001"


def _begin(root: Path, worker: str = "w1", size: int = 300) -> ObjectStore:
    store = ObjectStore(root, worker)
    store.begin(DEVICE, RID, {"recording_id": RID, "size": size, "sha256": "0" * 64})
    return store


def test_own_records_are_held_as_a_fresh_reader_sees_them(tmp_path: Path) -> None:
    store = _begin(tmp_path)
    store.append(DEVICE, RID, 100, b"b" * 100)
    assert store.held(DEVICE, RID) == [(100, 200)]
    store.append(DEVICE, RID, 0, b"a" * 100)
    assert store.held(DEVICE, RID) == [(0, 200)]
    assert ObjectStore(tmp_path, "w2").held(DEVICE, RID) == [(0, 200)]


def test_another_workers_records_are_read_incrementally(tmp_path: Path) -> None:
    mine, theirs = _begin(tmp_path, size=301), ObjectStore(tmp_path, "w2")
    mine.append(DEVICE, RID, 0, b"a" * 100)
    assert mine.held(DEVICE, RID) == [(0, 100)]
    theirs.append(DEVICE, RID, 200, b"c" * 100)
    assert mine.held(DEVICE, RID) == [(0, 100)]  # a new log is seen at the next listing...
    assert mine.held(DEVICE, RID, fresh=True) == [(0, 100), (200, 300)]  # ...or on demand
    theirs.append(DEVICE, RID, 300, b"d")
    assert mine.held(DEVICE, RID) == [(0, 100), (200, 301)]  # then read incrementally


def test_init_is_read_again_when_replaced(tmp_path: Path) -> None:
    store = _begin(tmp_path)
    assert store.load_init(DEVICE, RID)["size"] == 300  # type: ignore[index]
    ObjectStore(tmp_path, "w2").begin(DEVICE, RID, {"recording_id": RID, "size": 4000,
                                                   "sha256": "1" * 64})
    assert store.load_init(DEVICE, RID)["size"] == 4000  # type: ignore[index]


def test_assembled_sha256_in_and_out_of_order(tmp_path: Path) -> None:
    data = bytes(range(256)) + b"x" * 44
    for order in ([0, 100, 200], [200, 0, 100, 100]):
        store = _begin(tmp_path / str(order[0]))
        for offset in order:
            store.append(DEVICE, RID, offset, data[offset:offset + 100])
        tmp, digest = store.assemble(DEVICE, RID, len(data))
        assert tmp.read_bytes() == data
        assert digest == hashlib.sha256(data).hexdigest()


def test_group_committed_records_are_held_only_after_the_commit(tmp_path: Path) -> None:
    """A chunk written for a group commit is not claimed (not in `have`) until its
    fdatasync: neither by its own worker nor by a fresh reader's view of its log."""
    store = _begin(tmp_path)
    store.append(DEVICE, RID, 0, b"a" * 100)
    store.append(DEVICE, RID, 100, b"b" * 100, sync=False)
    store.append(DEVICE, RID, 200, b"c" * 100, sync=False)
    assert store.held(DEVICE, RID) == [(0, 100)]
    store.commit()
    assert store.held(DEVICE, RID) == [(0, 300)]
    assert ObjectStore(tmp_path, "w2").held(DEVICE, RID) == [(0, 300)]


def test_object_is_assembled_from_every_workers_part(tmp_path: Path) -> None:
    """Chunks split over three workers (one duplicated): the finishing worker's object is
    the whole ciphertext, and its own part became the object (no staging part left)."""
    data = bytes(range(256)) * 4
    w1 = _begin(tmp_path, size=len(data))
    w2, w3 = ObjectStore(tmp_path, "w2"), ObjectStore(tmp_path, "w3")
    w2.append(DEVICE, RID, 0, data[:300])
    w3.append(DEVICE, RID, 300, data[300:700])
    w1.append(DEVICE, RID, 700, data[700:])
    w2.append(DEVICE, RID, 600, data[600:800])  # overlaps two others
    assert w1.held(DEVICE, RID, fresh=True) == [(0, len(data))]
    path, digest = w1.assemble(DEVICE, RID, len(data))
    assert path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    # a worker that took no chunk at all assembles it too
    other = tmp_path / "other"
    w4 = _begin(other, "w4", size=len(data))
    ObjectStore(other, "w5").append(DEVICE, RID, 0, data)
    w4.held(DEVICE, RID, fresh=True)
    path, digest = w4.assemble(DEVICE, RID, len(data))
    assert (path.read_bytes(), digest) == (data, hashlib.sha256(data).hexdigest())


def test_a_record_whose_bytes_did_not_survive_is_not_held(tmp_path: Path) -> None:
    """A crash can leave a record on disk without its chunk's bytes, and half a record at
    the end: neither is claimed, later records still count, and the restarted worker
    writes on after the last whole record."""
    store = _begin(tmp_path)
    store.append(DEVICE, RID, 0, b"a" * 100)
    store.append(DEVICE, RID, 100, b"b" * 100)
    store.append(DEVICE, RID, 200, b"c" * 100)
    part = store.own_part(DEVICE, RID)
    with part.open("r+b") as handle:
        handle.seek(150)
        handle.write(b"x")  # the second chunk's bytes are not what its record says
        handle.seek(0, 2)
        handle.write(b"\x00" * 7)  # a torn record
    assert ObjectStore(tmp_path, "w2").held(DEVICE, RID) == [(0, 100), (200, 300)]
    again = ObjectStore(tmp_path, "w1")  # the worker restarted
    again.append(DEVICE, RID, 100, b"b" * 100)
    assert again.held(DEVICE, RID, fresh=True) == [(0, 300)]
    assert ObjectStore(tmp_path, "w3").held(DEVICE, RID) == [(0, 300)]
    path, digest = again.assemble(DEVICE, RID, 300)
    expected = b"a" * 100 + b"b" * 100 + b"c" * 100
    assert (path.read_bytes(), digest) == (expected, hashlib.sha256(expected).hexdigest())


def test_a_replaced_upload_is_read_from_its_start(tmp_path: Path) -> None:
    """Another worker began the upload again (a new init): its old view of our part is
    not carried over to the new file."""
    mine, theirs = _begin(tmp_path), ObjectStore(tmp_path, "w2")
    mine.append(DEVICE, RID, 0, b"a" * 300)
    assert theirs.held(DEVICE, RID, fresh=True) == [(0, 300)]
    theirs.begin(DEVICE, RID, {"recording_id": RID, "size": 300, "sha256": "1" * 64})
    fresh = ObjectStore(tmp_path, "w1")
    fresh.append(DEVICE, RID, 100, b"b" * 100)
    assert theirs.held(DEVICE, RID, fresh=True) == [(100, 200)]


def test_a_part_gone_before_the_commit_costs_only_its_own_records(tmp_path: Path) -> None:
    """Another worker stored one recording (its staging folder removed) while this worker
    had unsynced chunks of it and of another recording in one group commit: the other
    recording's chunks are still durable and held."""
    other = "0190d6e4-7c1a-7000-8000-000000000002"
    store = _begin(tmp_path)
    store.begin(DEVICE, other, {"recording_id": other, "size": 300, "sha256": "0" * 64})
    store.append(DEVICE, RID, 0, b"a" * 100, sync=False)
    store.append(DEVICE, other, 0, b"b" * 100, sync=False)
    ObjectStore(tmp_path, "w2").discard(DEVICE, RID)  # stored elsewhere, folder removed
    store.commit()
    assert store.held(DEVICE, other) == [(0, 100)]
    assert ObjectStore(tmp_path, "w3").held(DEVICE, other) == [(0, 100)]
