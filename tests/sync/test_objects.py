"""The object store's chunk logs: ranges counted without reading back equal a fresh read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sync.central.objects import ObjectStore

DEVICE, RID = "dev-a", "0190d6e4-7c1a-7000-8000-000000000001"


def _begin(root: Path, worker: str = "w1") -> ObjectStore:
    store = ObjectStore(root, worker)
    store.begin(DEVICE, RID, {"recording_id": RID, "size": 300, "sha256": "0" * 64})
    return store


def test_own_records_are_held_as_a_fresh_reader_sees_them(tmp_path: Path) -> None:
    store = _begin(tmp_path)
    store.append(DEVICE, RID, 100, b"b" * 100)
    assert store.held(DEVICE, RID) == [(100, 200)]
    store.append(DEVICE, RID, 0, b"a" * 100)
    assert store.held(DEVICE, RID) == [(0, 200)]
    assert ObjectStore(tmp_path, "w2").held(DEVICE, RID) == [(0, 200)]


def test_another_workers_records_are_read_incrementally(tmp_path: Path) -> None:
    mine, theirs = _begin(tmp_path), ObjectStore(tmp_path, "w2")
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
