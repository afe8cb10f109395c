"""Garbage collection: what goes, what stays and why, pins, and writers racing the collector."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blob_reads import BlobReads
from s3_requests import S3Requests
from toy_experiment import State, Train

import dagger_orchestrate as dg
import dagger_store as ds
import dagger_store.marks as marks_module
from dagger_store import leases
from dagger_store.backends.base import Buffer, Entry, SupportsEntries
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.s3 import S3Backend
from dagger_store.digest import LEAF_SIZE
from dagger_store.gc import (
    BLOCKED,
    CHANGED,
    IN_USE,
    LEASED,
    PINNED,
    RECENT,
    REFERENCED,
    YOUNG,
    collect,
    delete_experiment,
)
from dagger_store.layout import BLOBS, MANIFESTS, blob_key, manifest_key, record_key
from dagger_store.pins import PinExistsError, pin, pins, unpin
from dagger_store.records import MAGIC, add_record, read_records

DAY = 24 * 3600.0
RNG = np.random.default_rng(11)
LEAF = RNG.integers(0, 256, LEAF_SIZE, dtype=np.uint8).tobytes()


def later() -> float:
    """A `now` a month ahead: every object is old, on any backend (S3 cannot backdate)."""
    return time.time() + 30 * DAY


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ds.Store]:
    if request.param == "local":
        url, options = str(tmp_path / "store"), None
    else:
        url = request.getfixturevalue("s3_url")
        options = request.getfixturevalue("s3_storage_options")
    with ds.open_store(url, storage_options=options) as opened:
        yield opened


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[ds.Store]:
    with ds.open_store(tmp_path / "store") as opened:
        yield opened


def snapshot(store: ds.Store) -> dict[str, bytes]:
    return {key: store.backend.read(key) for key in store.backend.iter_keys()}


def sizes(store: ds.Store) -> dict[str, int]:
    backend = store.backend
    assert isinstance(backend, SupportsEntries)
    return {e.key: e.size for e in backend.iter_entries()}


def objects_of(store: ds.Store, digest: ds.Digest) -> set[str]:
    """The objects a blob is stored as: itself, and the leaves of a chunked one."""
    found = {blob_path(digest)}
    if digest.is_chunked:
        found |= {blob_path(d) for d in store._read_index(digest)}
    return found


def manifest_path(key: ds.NodeKey) -> str:
    return manifest_key(key)


def age(store: ds.Store, seconds: float, keys: Sequence[str] | None = None) -> None:
    """Backdate objects of a local store by ``seconds`` (all of them by default)."""
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    for key in backend.iter_keys() if keys is None else keys:
        path = backend.root / key
        try:
            info = path.stat()
            os.utime(path, (info.st_atime, info.st_mtime - seconds))
        except FileNotFoundError:  # collected meanwhile
            pass


def assert_sound(store: ds.Store) -> None:
    report = store.verify()
    assert report.ok, report.problems


# -- what goes and what stays --------------------------------------------------------------------


def test_dry_run_reports_exactly_what_a_real_run_deletes(store: ds.Store) -> None:
    shared = store.put(b"shared by both " * 100)
    only_kept = store.put(RNG.bytes(5000))
    big_kept = store.put(LEAF + b"tail of the kept one" * 50)  # chunked: index and two leaves
    big_gone = store.put(LEAF + b"tail of the other" * 80)  # shares the first leaf only
    only_gone = store.put(RNG.bytes(3000))
    kept, gone = ds.node_key("state", {"n": 1}), ds.node_key("state", {"n": 2})
    store.commit(kept, ds.Manifest({"a": shared, "b": only_kept, "c": big_kept}))
    store.commit(gone, ds.Manifest({"a": shared, "d": only_gone, "e": big_gone}))
    loose = store.put(b"put, never named by a manifest")
    add_record(store, "exp", "def", [kept], {})
    in_use = set().union(*(objects_of(store, d) for d in (shared, only_kept, big_kept)))
    named_by_gone = objects_of(store, big_gone) | objects_of(store, only_gone)
    doomed = (named_by_gone | objects_of(store, loose)) - in_use
    assert len(doomed) == 4  # the other index and its own leaf, the small blob, the loose one
    stored = sizes(store)
    before = snapshot(store)

    young = collect(store)  # everything is new: nothing would go
    assert young.dry_run and young.manifests == () and young.blobs == ()
    assert dict(young.kept_manifests) == {REFERENCED: 1, RECENT: 1}
    assert dict(young.kept_blobs) == {IN_USE: len(in_use | doomed) - 1, YOUNG: 1}

    now = later()
    dry = collect(store, now=now)
    assert dry.dry_run and dry.ok
    assert dry.manifests == (gone,)
    assert dry.manifest_bytes == stored[manifest_path(gone)]
    assert set(dry.blobs) == doomed and len(dry.blobs) == len(doomed)
    assert dry.blob_bytes == sum(stored[k] for k in doomed)
    assert dry.deleted_bytes == dry.manifest_bytes + dry.blob_bytes
    assert dict(dry.kept_manifests) == {REFERENCED: 1}
    assert dict(dry.kept_blobs) == {IN_USE: len(in_use)}
    assert str(dry).startswith("dry run, nothing deleted: would delete 1 manifests")
    assert snapshot(store) == before  # a dry run deletes nothing

    real = collect(store, now=now, dry_run=False)
    assert not real.dry_run
    assert (real.manifests, set(real.blobs), real.manifest_bytes, real.blob_bytes) == (
        dry.manifests, set(dry.blobs), dry.manifest_bytes, dry.blob_bytes,
    )  # fmt: skip
    assert dict(real.kept_manifests) == dict(dry.kept_manifests)
    assert dict(real.kept_blobs) == dict(dry.kept_blobs)
    after = snapshot(store)
    assert set(after) == set(before) - doomed - {manifest_path(gone)}
    assert all(after[k] == before[k] for k in after)
    assert store.get_manifest(kept).blobs["c"] == big_kept
    assert store.get(big_kept) == LEAF + b"tail of the kept one" * 50
    assert store.missing([kept, gone]) == [gone]
    assert_sound(store)

    again = collect(store, now=now, dry_run=False)  # nothing left to collect
    assert again.manifests == () and again.blobs == ()


def test_grace_and_keep_recent_measure_ages(local_store: ds.Store) -> None:
    store = local_store
    old_blob, named_blob = store.put(b"old and named" * 10), store.put(b"named by a recent one")
    old_loose, young_loose = store.put(b"old loose" * 10), store.put(b"young loose")
    old_key, recent_key = ds.node_key("state", {"age": "old"}), ds.node_key("state", {"age": "new"})
    store.commit(old_key, ds.Manifest({"x": old_blob}))
    store.commit(recent_key, ds.Manifest({"x": named_blob}))
    tmp = Path(store.backend.root) / ".tmp"  # type: ignore[attr-defined]
    tmp.mkdir(exist_ok=True)
    (tmp / "tmp-killed-writer").write_bytes(b"half a blob")
    (tmp / "tmp-writing-now").write_bytes(b"a blob in the making")
    age(store, 8 * DAY)  # everything is 8 days old, then some less so:
    age(store, -7.5 * DAY, [manifest_path(recent_key), objects_of(store, young_loose).pop()])
    os.utime(tmp / "tmp-killed-writer", (0, time.time() - 2 * DAY))

    report = collect(store, dry_run=False)  # grace 24 h, keep_recent 7 days
    assert report.manifests == (old_key,)
    assert set(report.blobs) == objects_of(store, old_blob) | objects_of(store, old_loose)
    assert report.temp_files == (".tmp/tmp-killed-writer",)
    assert report.temp_bytes == len(b"half a blob")
    assert dict(report.kept_manifests) == {RECENT: 1}
    assert dict(report.kept_blobs) == {IN_USE: 1, YOUNG: 1}
    assert sorted(os.listdir(tmp)) == ["tmp-writing-now"]
    assert store.get(named_blob) == b"named by a recent one"
    assert "1 stale temp files" in str(report)
    assert_sound(store)


def test_roots_keep_manifests_and_everything_they_name(store: ds.Store) -> None:
    keys = {why: ds.node_key("state", {"root": why}) for why in ("record", "pin", "lease", "none")}
    digests = {why: store.put(why.encode() * 1000) for why in keys}
    for why, key in keys.items():
        store.commit(key, ds.Manifest({"v": digests[why]}))
    add_record(store, "exp", "def", [keys["record"]], {"note": "roots"})
    pin(store, "paper-figures", [keys["pin"]])
    lease = leases.acquire(store, keys["lease"], "a-long-run", 60 * DAY)
    assert lease is not None
    now = later()

    report = collect(store, now=now, dry_run=False)
    assert report.manifests == (keys["none"],)
    assert dict(report.kept_manifests) == {REFERENCED: 1, PINNED: 1, LEASED: 1}
    assert set(report.blobs) == objects_of(store, digests["none"])
    kept = [keys[why] for why in ("record", "pin", "lease")]
    assert set(store.manifests(kept)) == set(kept)
    assert_sound(store)

    # Take every root away, and everything goes.
    unpin(store, "paper-figures")
    leases.release(store, lease)
    assert delete_experiment(store, "exp") == 1
    report = collect(store, now=now, dry_run=False)
    assert set(report.manifests) == set(kept)
    assert list(store.backend.iter_keys(MANIFESTS)) == []
    assert list(store.backend.iter_keys(BLOBS)) == []
    assert_sound(store)


def test_deleting_one_of_two_experiments_frees_exactly_its_own_blobs(tmp_path: Path) -> None:
    lab = str(tmp_path / "lab")
    first = dg.Experiment(tmp_path / "first", state_class=State, store=lab)
    Train(nb_epochs=1, lr=0.1)(first.spawn_new_tree(dataset_name="digits", seed=0))
    first.run()
    second = dg.Experiment(tmp_path / "second", state_class=State, store=lab)
    Train(nb_epochs=1, lr=0.2)(second.spawn_new_tree(dataset_name="digits", seed=0))
    second.run()
    store = ds.open_store(lab)

    def nodes_and_objects(name: str) -> tuple[set[ds.NodeKey], set[str]]:
        nodes = {ds.NodeKey(h) for r in read_records(store, name) for h in r["keys"]}
        found: set[str] = set()
        for manifest in store.manifests(nodes).values():
            for digest in manifest.blobs.values():
                found |= objects_of(store, digest)
        return nodes, found

    first_nodes, first_objects = nodes_and_objects(first.name)
    second_nodes, second_objects = nodes_and_objects(second.name)
    assert len(first_nodes & second_nodes) == 1  # the shared root
    assert first_objects & second_objects and first_objects - second_objects

    records = len(read_records(store, first.name))
    assert delete_experiment(store, first.name) == records == 2  # its definition and its run
    assert read_records(store, first.name) == []
    report = collect(store, now=later(), dry_run=False)
    assert set(report.manifests) == first_nodes - second_nodes
    assert set(report.blobs) == first_objects - second_objects
    assert report.blob_bytes > 0
    assert_sound(store)
    graph = dg.Experiment.restore(tmp_path / "second").graph
    assert len(graph) == 2
    for node in graph.nodes:
        assert node.restore().model  # every state of the other experiment still loads
    with pytest.raises(ds.NotFoundError, match="no experiment"):
        delete_experiment(store, first.name)


# -- writers racing the collector ----------------------------------------------------------------


class _Minimal:
    """A local store's backend that can list with ages, and nothing more."""

    remote = False

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.url = inner.url

    def trusted_by_location(self) -> bool:
        return self.inner.trusted_by_location()

    def read(self, key: str) -> bytes:
        return self.inner.read(key)

    def write_once(self, key: str, *parts: Buffer) -> bool:
        return self.inner.write_once(key, *parts)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return self.inner.exists_many(keys)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return self.inner.iter_keys(prefix)

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        return self.inner.iter_entries(prefix)


class _NoTouch(_Minimal):
    """...and delete, but not touch: a writer's dedup hits stay as old as they were."""

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        return self.inner.delete(key, modified_before=modified_before)


@pytest.mark.parametrize("size", [1000, 300_000, LEAF_SIZE + 1000])  # written blind, asked, chunked
def test_put_touches_what_it_reuses_so_gc_keeps_it(local_store: ds.Store, size: int) -> None:
    value = RNG.bytes(size)
    digest = local_store.put(value)
    stored_as = objects_of(local_store, digest)
    key = ds.node_key("state", {"size": size})
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)
    for touching in (False, True):
        age(local_store, 3600)  # an old, unreferenced blob: garbage
        with ds.Store(backend if touching else _NoTouch(backend)) as writer:
            assert writer.put(value) == digest  # deduplicated: nothing written
            report = collect(local_store, grace=60, dry_run=False)  # before the writer commits
            if touching:  # the touch gave the blob a fresh grace period
                assert report.blobs == ()
                assert dict(report.kept_blobs) == {YOUNG: len(stored_as)}
                assert writer.commit(key, ds.Manifest({"v": digest})).won
            else:  # without it, the collector takes what the writer is about to name
                assert set(report.blobs) == stored_as
                with pytest.raises(ds.IncompleteManifestError):
                    writer.commit(key, ds.Manifest({"v": digest}))
                local_store.put(value)  # put it back for the round with touches
    assert local_store.get(digest) == value
    assert_sound(local_store)


class _VanishingOnce(LocalBackend):
    """The first touch finds its key collected since the write said it existed."""

    vanished = False

    def touch(self, key: str) -> bool:
        if not self.vanished:
            self.vanished = True
            self.delete(key)
            return False
        return super().touch(key)


def test_put_writes_again_what_vanished_between_write_and_touch(tmp_path: Path) -> None:
    with ds.Store(_VanishingOnce(tmp_path)) as store:
        digest = store.put(b"small: written blind")
        assert store.put(b"small: written blind") == digest  # exists, then gone at the touch
        assert store.backend.vanished  # type: ignore[attr-defined]
        assert store.get(digest) == b"small: written blind"


def test_a_slow_writer_reusing_old_blobs_never_loses_one(local_store: ds.Store) -> None:
    """A writer puts (deduplicating against old garbage) and commits while gc runs in a loop.

    The guarantee is for writers that commit within the grace period of their puts. This one
    takes ~0.1 s; a round that a stalled machine (fsync under load) stretches past the grace
    period is not judged: it may lose blobs, as documented.
    """
    grace = 2.0
    store = local_store
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    touches: list[bool] = []
    touch = backend.touch

    def counting_touch(key: str) -> bool:
        touches.append(touch(key))
        return touches[-1]

    backend.touch = counting_touch  # type: ignore[method-assign]
    rounds = 8
    in_time: list[tuple[ds.NodeKey, dict[ds.Digest, bytes]]] = []
    late: list[ds.NodeKey] = []
    failures: list[BaseException] = []

    def writer() -> None:
        rng = np.random.default_rng(5)
        for i in range(rounds):
            key = ds.node_key("state", {"round": i})
            # Written blind (<= 256 KiB) and asked about first (larger); three of the four are
            # old garbage by the time this run computes them again, one stays garbage.
            values = [rng.bytes(n) for n in (100, 2000, 300_000, 600_000)]
            started = time.monotonic()
            try:
                old = [store.put(v) for v in values]
                age(store, DAY, [blob_path(d) for d in old])
                started = time.monotonic()
                digests = []
                for value in values[:3]:
                    digests.append(store.put(value))  # deduplicated: touched, not written
                    time.sleep(0.02)  # slow, but well within the grace period
                store.commit(key, ds.Manifest({str(n): d for n, d in enumerate(digests)}))
            except BaseException as exc:
                if time.monotonic() - started <= grace:
                    failures.append(exc)
                else:
                    late.append(key)
                continue
            if time.monotonic() - started <= grace:
                in_time.append((key, dict(zip(digests, values, strict=False))))
            else:
                late.append(key)

    thread = threading.Thread(target=writer)
    thread.start()
    reports = []
    while thread.is_alive():
        reports.append(collect(store, grace=grace, dry_run=False))
        assert reports[-1].ok, reports[-1].problems
    thread.join()
    reports.append(collect(store, grace=grace, dry_run=False))
    assert not failures, failures
    if len(in_time) < rounds // 2:
        pytest.skip(f"the machine stalled {len(late)} of {rounds} rounds past the grace period")
    assert any(touches)  # the writer did deduplicate against old blobs
    assert len(reports) > rounds  # and gc ran alongside it
    deleted = {k for r in reports for k in r.blobs}
    assert len(deleted) >= rounds  # taking the garbage nobody reused
    for key, values in in_time:
        manifest = store.get_manifest(key)  # complete: every blob it names exists
        for digest in manifest.blobs.values():
            assert store.get(digest) == values[digest]
    problems = store.verify().problems
    assert all(any(k.hex in p for k in late) for p in problems), problems


def test_a_blob_touched_after_the_listing_is_kept(
    local_store: ds.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = local_store
    reused, garbage = store.put(b"reused while the collector decided"), store.put(b"garbage")
    age(store, DAY)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    listing = backend.iter_entries

    def listing_then_a_put(prefix: str = "") -> Iterator[Entry]:
        yield from listing(prefix)
        if prefix == BLOBS:  # a writer's put deduplicates against it right after we listed
            assert store.put(b"reused while the collector decided") == reused

    monkeypatch.setattr(backend, "iter_entries", listing_then_a_put)
    report = collect(store, dry_run=False)
    assert set(report.blobs) == objects_of(store, garbage)
    assert dict(report.kept_blobs) == {CHANGED: 1}
    assert store.get(reused) == b"reused while the collector decided"


def blob_path(digest: ds.Digest) -> str:
    return blob_key(digest)


# -- refusing to guess ---------------------------------------------------------------------------


def test_an_unreadable_manifest_stops_the_blob_sweep(store: ds.Store) -> None:
    key = ds.node_key("state", {"corrupt": True})
    store.backend.write_once(manifest_path(key), b"DAGM not really a manifest")
    add_record(store, "exp", "def", [key], {})
    loose = store.put(b"garbage, but who knows what the unreadable manifest named")
    report = collect(store, now=later(), dry_run=False)
    assert report.blobs == () and not report.ok
    assert dict(report.kept_blobs) == {BLOCKED: 1}
    assert key.hex in report.problems[0] and "problem:" in str(report)
    assert store.get(loose)


def test_a_corrupt_record_stops_the_collection_before_anything_goes(store: ds.Store) -> None:
    key = ds.node_key("state", {"named by": "a record nobody can read"})
    store.commit(key, ds.Manifest({"v": store.put(b"kept by an unreadable record" * 10)}))
    store.put(b"garbage, but the collection never gets that far")
    add_record(store, "exp", "def", [], {})
    broken = record_key("exp", "def", time.time_ns(), "f" * 32)
    header = MAGIC + bytes([1, 0, 0, 0])  # a record's header; its checksum does not match
    store.backend.write_once(broken, header + bytes(32) + b"\x81\xa4keys\x91\xd9\x40" + b"a" * 64)
    before = snapshot(store)
    for dry_run in (True, False):
        with pytest.raises(ds.IntegrityError, match="refused, nothing deleted") as info:
            collect(store, now=later(), dry_run=dry_run)
        assert info.value.key == broken
        assert broken in str(info.value) and "fails its checksum" in str(info.value)
    assert snapshot(store) == before


@pytest.mark.slow
def test_gc_on_s3_deletes_in_batches_and_keeps_a_blob_touched_meanwhile(
    s3_url: str, s3_storage_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [b"a loose blob, %05d, " % i * 3 for i in range(1_100)]
    with ds.open_store(s3_url, storage_options=s3_storage_options) as store:
        digests = store.put_many(values)
        garbage = ds.node_key("state", {"unreferenced": True})
        store.commit(garbage, ds.Manifest({"v": digests[0]}))
        time.sleep(2.1)  # older than a grace period of a second, to S3's whole seconds
        backend = store.backend
        assert isinstance(backend, S3Backend)
        listing = backend.iter_entries

        def listing_then_a_put(prefix: str = "") -> Iterator[Entry]:
            yield from listing(prefix)
            # A writer's put deduplicates against it right after we listed it (gc lists S3 in
            # 16 key ranges: here the range holding it).
            if prefix == BLOBS + digests[7].hex[0]:
                assert store.put(values[7]) == digests[7]

        monkeypatch.setattr(backend, "iter_entries", listing_then_a_put)
        requests = S3Requests(backend)
        report = collect(store, grace=1, keep_recent=1, dry_run=False)
        requests.close()
        assert report.ok and report.manifests == (garbage,)
        assert set(report.blobs) == {blob_path(d) for d in digests} - {blob_path(digests[7])}
        assert dict(report.kept_blobs) == {CHANGED: 1}
        # One DeleteObjects for the manifest; the blobs in a batch of 1,000 keys and one of the
        # other 100, less the one spared when its batch was checked again.
        spared_in_first = sorted(blob_path(d) for d in digests).index(blob_path(digests[7])) < 1000
        blob_batches = [999, 100] if spared_in_first else [1_000, 99]
        assert sorted(requests.deleted) == sorted([1, *blob_batches])
        assert "DeleteObject" not in requests.made
        assert store.get(digests[7]) == values[7]
        assert [e.key for e in listing(BLOBS)] == [blob_path(digests[7])]


def test_collect_needs_listing_and_deleting(local_store: ds.Store) -> None:
    local_store.put(b"v")
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)
    with ds.Store(_Minimal(backend)) as lister:
        assert collect(lister, now=later()).blobs  # a dry run only lists
        with pytest.raises(TypeError, match="cannot delete"):
            collect(lister, now=later(), dry_run=False)
    with pytest.raises(ValueError, match=">= 0"):
        collect(local_store, grace=-1)


# -- pins ----------------------------------------------------------------------------------------


def test_pins_are_named_write_once_and_removable(store: ds.Store) -> None:
    a, b = ds.node_key("state", {"p": 1}), ds.node_key("state", {"p": 2})
    assert pins(store) == {}
    pin(store, "paper-v1", [b, a, a])
    pin(store, "best_model", [b])
    assert pins(store) == {"best_model": [b], "paper-v1": sorted([a, b])}
    with pytest.raises(PinExistsError, match="unpin 'paper-v1' first") as info:
        pin(store, "paper-v1", [a])
    assert isinstance(info.value, ds.StoreError) and info.value.name == "paper-v1"
    unpin(store, "paper-v1")
    assert list(pins(store)) == ["best_model"]
    with pytest.raises(ds.NotFoundError, match="no pin called 'paper-v1'"):
        unpin(store, "paper-v1")
    pin(store, "paper-v1", [a])  # a name is free again once unpinned
    assert pins(store)["paper-v1"] == [a]


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../up", "x" * 129])
def test_bad_pin_names_are_refused(local_store: ds.Store, name: str) -> None:
    with pytest.raises(ds.InvalidKeyError, match="pin name"):
        pin(local_store, name, [ds.node_key("state", {})])


def test_pins_take_node_keys_only(local_store: ds.Store) -> None:
    with pytest.raises(TypeError, match="NodeKey"):
        pin(local_store, "p", ["ab" * 32])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        pin(local_store, "p", [])
    assert pins(local_store) == {}


# -- what manifests name is remembered between collections (dagger_store/marks.py) -------------


@pytest.fixture
def settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember manifests at once, not after SETTLE seconds: S3 objects cannot be backdated."""
    monkeypatch.setattr(marks_module, "SETTLE", 0.0)


def named_node(store: ds.Store, name: str, payload: bytes) -> tuple[ds.NodeKey, ds.Digest]:
    key = ds.node_key("state", {"name": name})
    digest = store.put(payload)
    store.commit(key, ds.Manifest({"w": digest}))
    return key, digest


def test_a_later_collection_reads_only_new_manifests(store: ds.Store, settle_at_once: None) -> None:
    a, _ = named_node(store, "a", b"a" * 100)
    b, _ = named_node(store, "b", b"b" * 100)
    c, c_blob = named_node(store, "c", b"c" * 100)
    add_record(store, "exp", "def", [a, b], {})
    first = collect(store, now=later(), dry_run=False)
    assert first.manifests == (c,) and len(first.blobs) == 1

    reads = BlobReads(store.backend)
    again = collect(store, now=later())
    assert again.ok and again.manifests == () and again.blobs == ()
    assert reads.manifests == []  # a and b: remembered

    d, d_blob = named_node(store, "d", b"d" * 100)
    add_record(store, "exp", "def", [d], {})
    reads.manifests.clear()
    third = collect(store, now=later(), dry_run=False)
    assert third.ok and third.blobs == () and reads.manifests == [manifest_key(d)]
    assert store.missing([a, b, d]) == [] and store.has_blobs([c_blob, d_blob]) == [False, True]


def test_a_path_holding_another_manifest_now_is_read_again(
    store: ds.Store, settle_at_once: None
) -> None:
    a, old_blob = named_node(store, "a", b"first version")
    add_record(store, "exp", "def", [a], {})
    assert collect(store, now=later(), dry_run=False).ok  # remembers a's manifest
    # Deleted (as gc deletes an unreferenced node) and committed again, naming another blob of
    # the same size: the manifest has the same size, but not the same modification time.
    time.sleep(1.1)  # S3 times are in whole seconds
    assert store.backend.delete(manifest_key(a))  # type: ignore[attr-defined]
    new_blob = store.put(b"second versio")
    store.commit(a, ds.Manifest({"w": new_blob}))

    reads = BlobReads(store.backend)
    report = collect(store, now=later(), dry_run=False)
    assert reads.manifests == [manifest_key(a)]
    assert report.blobs == (f"v1/blobs/{old_blob.hex[:2]}/{old_blob.hex}",)
    assert store.missing([a]) == [] and store.get_manifest(a).blobs == {"w": new_blob}


def test_unreadable_memories_mean_reading_everything(local_store: ds.Store) -> None:
    store = local_store
    a, _ = named_node(store, "a", b"a" * 100)
    add_record(store, "exp", "def", [a], {})
    path = manifest_key(a)
    os.utime(
        Path(store.backend.root) / path,  # type: ignore[attr-defined]
        (0, time.time() - 60),
    )  # settled: remembered
    assert collect(store, dry_run=False).ok
    memory = Path(marks_module._path(store.url))
    assert memory.is_file() and path in marks_module.Marks.load(store.url).manifests
    memory.write_bytes(b"torn")
    reads = BlobReads(store.backend)
    assert collect(store).ok and reads.manifests == [path]  # read again, then remembered
    reads.manifests.clear()
    assert collect(store).ok and reads.manifests == []
