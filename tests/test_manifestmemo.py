"""Manifests remembered between runs on this machine (dagger_store/manifestmemo.py).

What a person relies on: a re-run that asks the same question gets the same manifests as
reading the store would give, without reading the files again; a manifest written again at its
path (deleted, then recommitted with other content) or superseded by a newer generation is
never answered from memory; a damaged memo costs speed, never an answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

import dagger_store as ds
from dagger_store import manifestmemo
from dagger_store.backends.local import LocalBackend
from dagger_store.layout import manifest_generation_key

COUNT = 300  # above the store's threshold for remembering a question


def _old(store: ds.Store, keys: list[ds.NodeKey], generation: int = 0) -> None:
    """Date the manifests' files back, as if committed a minute ago (the memo remembers only
    files older than its settling time)."""
    assert isinstance(store.backend, LocalBackend)
    for key in keys:
        path = store.backend.root / manifest_generation_key(key, generation)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 60 * 10**9))


def _committed(store: ds.Store, label: str = "v1") -> list[ds.NodeKey]:
    keys = [ds.node_key("memo-test", {"i": i}) for i in range(COUNT)]
    for i, key in enumerate(keys):
        store.commit(key, ds.Manifest({}, {"i": i, "label": label}))
    _old(store, keys)
    return keys


def _old_folders(store: ds.Store) -> None:
    """Date the manifests' folders back too (a folder is remembered once settled, as a file)."""
    assert isinstance(store.backend, LocalBackend)
    for folder in (store.backend.root / "v1" / "manifests").iterdir():
        stat = folder.stat()
        os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns - 60 * 10**9))


class _CountingReads(LocalBackend):
    reads = 0
    asked = 0  # names asked about (a folder's listing answers for them)

    def read(self, key: str) -> bytes:
        type(self).reads += 1
        return super().read(key)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        type(self).asked += len(keys)
        return super().exists_many(keys)


def _counting(path: Path) -> ds.Store:
    _CountingReads.reads = _CountingReads.asked = 0
    return ds.Store(_CountingReads(str(path)), trusted=True)


def test_a_question_asked_again_is_answered_from_memory_as_the_store_would(
    tmp_path: Path,
) -> None:
    keys = _committed(ds.open_store(str(tmp_path / "s")))
    first = _counting(tmp_path / "s").manifests(keys)  # read, then remembered
    assert _CountingReads.reads == COUNT
    again = _counting(tmp_path / "s")
    answered = again.manifests(keys)
    assert _CountingReads.reads == 0  # not a manifest file read
    assert answered == first and len(answered) == COUNT
    assert answered[keys[7]].meta["label"] == "v1"
    # Another question (one key fewer) has a memory of its own: read from the store.
    _counting(tmp_path / "s").manifests(keys[1:])
    assert _CountingReads.reads == COUNT - 1


def test_a_manifest_written_again_at_its_path_is_read_again(tmp_path: Path) -> None:
    store = ds.open_store(str(tmp_path / "s"))
    keys = _committed(store)
    _counting(tmp_path / "s").manifests(keys)
    # gc took node 3, and a colleague committed it again with other content since.
    assert isinstance(store.backend, LocalBackend)
    store.backend.delete(manifest_generation_key(keys[3], 0))
    store.commit(keys[3], ds.Manifest({}, {"i": 3, "label": "v2"}))
    # A newer generation of node 5 supersedes the one remembered.
    store.commit(keys[5], ds.Manifest({}, {"i": 5, "label": "v3"}), replaces=0)
    answered = _counting(tmp_path / "s").manifests(keys)
    assert answered[keys[3]].meta["label"] == "v2"
    assert answered[keys[5]].meta["label"] == "v3"
    assert _CountingReads.reads == 2  # only those two, from the store
    assert answered[keys[4]].meta["label"] == "v1"


def test_an_unchanged_folder_is_not_listed_and_a_generation_added_to_it_is_found(
    tmp_path: Path,
) -> None:
    store = ds.open_store(str(tmp_path / "s"))
    keys = _committed(store)
    _old_folders(store)
    first = _counting(tmp_path / "s").manifests(keys)  # read; files and folders remembered
    assert _CountingReads.asked == COUNT
    again = _counting(tmp_path / "s").manifests(keys)
    assert (_CountingReads.reads, _CountingReads.asked) == (0, 0) and again == first
    # A newer generation of node 5: its folder changes, so it is listed and the node read.
    store.commit(keys[5], ds.Manifest({}, {"i": 5, "label": "v3"}), replaces=0)
    answered = _counting(tmp_path / "s").manifests(keys)
    assert answered[keys[5]].meta["label"] == "v3"
    assert 0 < _CountingReads.asked < COUNT  # that folder's nodes only
    assert answered[keys[4]].meta["label"] == "v1"
    # Remembered as superseded: asked again, node 5 is still its newer generation.
    _old(store, [keys[5]], generation=1)
    _old_folders(store)
    _counting(tmp_path / "s").manifests(keys)
    assert _counting(tmp_path / "s").manifests(keys)[keys[5]].meta["label"] == "v3"


def test_a_damaged_memo_costs_speed_never_an_answer(tmp_path: Path) -> None:
    keys = _committed(ds.open_store(str(tmp_path / "s")))
    _counting(tmp_path / "s").manifests(keys)
    folder = Path(manifestmemo.cache_dir()) / "manifests"
    files = list(folder.iterdir())
    assert files
    for file in files:
        file.write_bytes(b"\x00not msgpack")
    answered = _counting(tmp_path / "s").manifests(keys)
    assert _CountingReads.reads == COUNT and len(answered) == COUNT


def test_signed_stores_are_not_answered_from_memory(tmp_path: Path) -> None:
    ds.open_store(str(tmp_path / "s"))  # creates the store folder
    key = ds.LabKey(b"k" * 32)
    store = ds.Store(_CountingReads(str(tmp_path / "s")), trusted=True, lab_key=key)
    keys = [ds.node_key("memo-test", {"i": i}) for i in range(COUNT)]
    for i, node in enumerate(keys):
        store.commit(node, ds.Manifest({}, {"i": i}))
    _old(store, keys)
    for _ in range(2):
        _CountingReads.reads = 0
        assert len(store.manifests(keys)) == COUNT
        assert _CountingReads.reads == COUNT


@pytest.fixture(autouse=True)
def _own_memo_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(tmp_path / "cache"))
