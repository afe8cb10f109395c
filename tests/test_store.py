"""Store behaviour on every backend: blobs, dedup, compression, manifests, batching, bad input."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

import dagger_store as ds
from dagger_store.digest import LEAF_SIZE, blob_digest
from dagger_store.framing import Framing
from dagger_store.plain import MAX_INT, MIN_INT, is_plain
from dagger_store.units import format_bytes

RNG = np.random.default_rng(7)
NOISE = RNG.integers(0, 256, 2 * LEAF_SIZE + 12345, dtype=np.uint8).tobytes()


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ds.Store]:
    if request.param == "memory":
        url, options = f"memory://{request.node.name}-{os.getpid()}", None
    elif request.param == "local":
        url, options = str(tmp_path / "store"), None
    else:
        url, options = (
            request.getfixturevalue("s3_url"),
            request.getfixturevalue("s3_storage_options"),
        )
    with ds.open_store(url, storage_options=options) as opened:
        yield opened


def blob_objects(store: ds.Store) -> set[str]:
    return set(store.backend.iter_keys("v1/blobs/"))


def stored_codec(store: ds.Store, digest: ds.Digest) -> Framing:
    return Framing(store.backend.read(f"v1/blobs/{digest.hex[:2]}/{digest.hex}")[5])


# -- blobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 4096, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 2 * LEAF_SIZE, len(NOISE)]
)
def test_put_get_round_trip(store: ds.Store, size: int) -> None:
    data = NOISE[:size]
    digest = store.put(data)
    assert digest == blob_digest(data)
    assert digest.size == size
    assert store.get(digest) == data
    out = bytearray(size)
    store.get_into(digest, out)
    assert out == data


def test_numpy_arrays_go_in_and_out_without_pickling(store: ds.Store) -> None:
    arrays = [
        RNG.standard_normal((300, 700)).astype(np.float32),
        RNG.standard_normal(10).astype(np.float16),
        np.array([True, False, True]),
        np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),  # no buffer format
        np.arange(12, dtype=np.complex128).reshape(3, 4),
        np.zeros((0, 5), np.float32),
    ]
    for array in arrays:
        digest = store.put(array)
        assert digest == blob_digest(array.tobytes())
        out = np.empty_like(array)
        store.get_into(digest, out)
        np.testing.assert_array_equal(out, array)


def test_strided_views_store_their_logical_bytes(store: ds.Store) -> None:
    matrix = RNG.standard_normal((64, 64))
    for view in (matrix[:, ::2], matrix.T):
        assert store.put(view) == blob_digest(np.ascontiguousarray(view).tobytes())
    assert store.put(memoryview(matrix)[::2]) == blob_digest(matrix[::2].tobytes())


def test_existing_content_is_never_written_again(store: ds.Store) -> None:
    first = store.put(NOISE)
    objects = blob_objects(store)
    assert len(objects) == 3 + 1  # three leaves and the index
    assert store.put(bytearray(NOISE)) == first
    assert store.put(NOISE[:LEAF_SIZE]) == blob_digest(NOISE[:LEAF_SIZE])
    assert blob_objects(store) == objects  # the first leaf was a blob of its own already


def test_put_many_equals_put_one_by_one(store: ds.Store) -> None:
    values = [NOISE[:100], b"", NOISE, np.arange(1000, dtype=np.float32), NOISE[:100]]
    digests = store.put_many(values)
    assert digests == [blob_digest(bytes(memoryview(v).cast("B"))) for v in values]
    assert [store.get(d) for d in digests] == [bytes(memoryview(v).cast("B")) for v in values]


def test_blobs_sharing_leaves_share_objects(store: ds.Store) -> None:
    store.put(NOISE)
    before = blob_objects(store)
    appended = store.put(NOISE + b"one more record")
    added = blob_objects(store) - before
    assert len(added) == 2  # only the changed last leaf and the new index
    assert store.get(appended) == NOISE + b"one more record"


def test_compression_only_where_it_pays(store: ds.Store) -> None:
    # zstd earns its CPU where it at least halves the bytes (framing.WORTHWHILE_RATIO).
    sparse = RNG.standard_normal(LEAF_SIZE // 4).astype(np.float32)
    sparse[RNG.random(sparse.size) < 0.9] = 0.0
    pruned = RNG.standard_normal(LEAF_SIZE // 4).astype(np.float32)
    pruned[RNG.random(pruned.size) < 0.5] = 0.0  # compresses to about 0.64: not worth it
    text = b"the same line again\n" * 100_000
    dense = RNG.standard_normal(LEAF_SIZE // 8).astype(np.float32)
    assert stored_codec(store, store.put(text)) is Framing.ZSTD
    assert stored_codec(store, store.put(sparse)) is Framing.ZSTD
    assert stored_codec(store, store.put(pruned)) is Framing.RAW
    assert stored_codec(store, store.put(dense)) is Framing.RAW
    assert stored_codec(store, store.put(NOISE[:1000])) is Framing.RAW
    digest = store.put(text)
    stored = store.backend.read(f"v1/blobs/{digest.hex[:2]}/{digest.hex}")
    assert len(stored) < len(text) / 50
    assert store.get(digest) == text


def test_compression_level_zero_stores_raw(tmp_path: Path) -> None:
    with ds.open_store(tmp_path / "s", compression_level=0) as store:
        digest = store.put(b"\0" * 100_000)
        assert stored_codec(store, digest) is Framing.RAW
        assert store.get(digest) == b"\0" * 100_000


def test_has_blobs_answers_in_order(store: ds.Store) -> None:
    present = store.put(b"present")
    absent = blob_digest(b"absent")
    assert store.has_blobs([absent, present, absent]) == [False, True, False]
    assert store.has_blobs([]) == []


def test_missing_blob_is_not_found_naming_it(store: ds.Store) -> None:
    digest = blob_digest(b"never stored")
    with pytest.raises(ds.NotFoundError, match=digest.hex):
        store.get(digest)
    with pytest.raises(ds.NotFoundError):
        store.get_into(digest, bytearray(digest.size))
    with pytest.raises(ds.NotFoundError):
        store.get(blob_digest(NOISE))  # chunked: the index is missing


def test_size_is_checked_against_the_digest(store: ds.Store) -> None:
    digest = store.put(b"twelve bytes")
    lying = ds.Digest(digest.algorithm, digest.hex, digest.size + 1)
    with pytest.raises(ds.IntegrityError):
        store.get(lying)


# -- manifests -----------------------------------------------------------------------------------


def test_commit_then_read_back(store: ds.Store) -> None:
    weights = store.put(RNG.standard_normal(1000).astype(np.float32))
    key = ds.node_key("state", {"seed": 1})
    manifest = ds.Manifest({"weights": weights}, {"description": "init", "shape": (1000,)})
    commit = store.commit(key, manifest)
    assert commit.won and commit.key == key and commit.manifest == manifest
    stored = store.get_manifest(key)
    assert stored == manifest
    assert stored.meta["shape"] == [1000]  # tuples are stored as lists
    assert list(store.manifest_keys()) == [key]


def test_first_writer_wins_and_the_loser_reads_the_winner(store: ds.Store) -> None:
    key = ds.node_key("state", {"seed": 2})
    first = ds.Manifest({"a": store.put(b"first")}, {"by": "first"})
    second = ds.Manifest({"a": store.put(b"second")}, {"by": "second"})
    assert store.commit(key, first).won
    lost = store.commit(key, second)
    assert not lost.won and lost.manifest == first
    assert store.get_manifest(key) == first


def test_commit_refuses_a_manifest_with_missing_blobs(store: ds.Store) -> None:
    key = ds.node_key("state", {"seed": 3})
    ghost = blob_digest(b"not put")
    with pytest.raises(ds.IncompleteManifestError) as info:
        store.commit(key, ds.Manifest({"x": store.put(b"here"), "y": ghost}))
    assert info.value.missing == (str(ghost),)
    assert "put every blob" in str(info.value)
    assert store.missing([key]) == [key]
    with pytest.raises(ds.NotFoundError):
        store.get_manifest(key)


def test_missing_is_batched_ordered_and_checks_completeness(store: ds.Store) -> None:
    keys = [ds.node_key("state", {"seed": i}) for i in range(30)]
    for key in keys[::3]:
        store.commit(key, ds.Manifest({"v": store.put(key.hex.encode())}))
    assert store.missing(keys) == [k for i, k in enumerate(keys) if i % 3]
    assert store.missing([]) == []
    assert store.missing(keys[:1] * 3) == []


def test_manifests_returns_the_complete_ones(store: ds.Store) -> None:
    whole, absent = ds.node_key("state", {"n": 1}), ds.node_key("state", {"n": 2})
    kept = ds.Manifest({"v": store.put(NOISE), "w": store.put(b"kept")}, {"note": "x"})
    store.commit(whole, kept)
    assert store.manifests([absent, whole, absent]) == {whole: kept}
    assert store.manifests([]) == {}


def test_verify_is_clean_on_a_sound_store(store: ds.Store) -> None:
    digest = store.put(NOISE)
    store.put(b"x" * 100_000)
    store.commit(ds.node_key("s", {}), ds.Manifest({"n": digest}))
    report = store.verify()
    assert report.ok, report.problems
    assert report.blobs == 3 + 1 + 1 and report.manifests == 1


# -- values and bad input ------------------------------------------------------------------------


def test_manifest_validates_itself() -> None:
    digest = blob_digest(b"x")
    with pytest.raises(TypeError, match=r"meta\['when'\] is a datetime"):
        import datetime

        ds.Manifest({"a": digest}, {"when": datetime.datetime.now()})
    with pytest.raises(TypeError, match="must be a Digest"):
        ds.Manifest({"a": str(digest)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="64 bits"):
        ds.Manifest({}, {"n": 2**70})
    with pytest.raises(TypeError, match="non-str key"):
        ds.Manifest({}, {"nested": {1: "a"}})
    with pytest.raises(ds.InvalidKeyError):
        ds.Manifest({"": digest})


def test_plain_data_is_what_msgpack_stores_as_it_is() -> None:
    for value in (None, True, 0, MIN_INT, MAX_INT, 1.5, "s", b"b", [1, [2.0]], {"k": {"n": []}}):
        assert is_plain(value), value
        assert msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False) == value
        ds.Manifest({}, {"v": value})  # the manifest's own rule has the same bounds
    for value in (MIN_INT - 1, MAX_INT + 1, (1,), {1: "a"}, [()], OrderedDict(a=1), np.int64(1)):
        assert not is_plain(value), value
    for value in (MIN_INT - 1, MAX_INT + 1):
        with pytest.raises(TypeError, match="64 bits"):
            ds.Manifest({}, {"v": value})


def test_sizes_read_in_binary_units() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 2**30, 5 * 2**40, 2**52)] == [
        "0 B", "1,023 B", "1.0 KiB", "1.5 KiB", "1.0 GiB", "5.0 TiB", "4,096.0 TiB",
    ]  # fmt: skip


def test_manifest_encoding_is_canonical() -> None:
    a = blob_digest(b"a")
    one = ds.Manifest({"x": a, "y": a}, {"b": 1, "a": (1, 2)})
    two = ds.Manifest({"y": a, "x": a}, {"a": [1, 2], "b": 1})
    assert one.encode() == two.encode()
    assert ds.Manifest.decode(one.encode(), key="k") == one


def test_decoding_keeps_what_another_writer_stored_and_refuses_what_is_not_plain() -> None:
    a = blob_digest(b"a")
    ours = ds.Manifest({"x": a}, {"b": {"d": 1, "c": [2.5, None]}, "a": b"raw"})
    decoded = ds.Manifest.from_payload(ours.payload(), key="k")
    assert decoded == ours and decoded.payload() == ours.payload()
    # Unsorted metadata (another writer's): read, and sorted as if made here.
    theirs = msgpack.packb({"blobs": {}, "meta": {"b": 1, "a": 2}}, use_bin_type=True)
    for trusted in (False, True):
        read = ds.Manifest.from_payload(theirs, key="k", trusted=trusted)
        assert dict(read.meta) == {"a": 2, "b": 1}
    assert list(ds.Manifest.from_payload(theirs, key="k").meta) == ["a", "b"]
    # Not plain data: refused as a FormatError where writers are not all trusted.
    for meta in ({b"bytes key": 1}, {"x": msgpack.ExtType(5, b"")}):
        bad = msgpack.packb({"blobs": {}, "meta": meta}, use_bin_type=True)
        with pytest.raises(ds.FormatError, match="not a valid manifest"):
            ds.Manifest.from_payload(bad, key="k")


def test_a_superseded_corrupt_generation_does_not_stop_a_read(tmp_path: Path) -> None:
    with ds.open_store(tmp_path / "s") as store:
        key = ds.node_key("state", {"n": 1})
        first = ds.Manifest({"v": store.put(b"old")})
        store.commit(key, first)
        newer = ds.Manifest({"v": store.put(b"new")})
        assert store.commit(key, newer, replaces=0).generation == 1
        path = tmp_path / "s" / f"v1/manifests/{key.hex[:2]}/{key.hex}"
        path.chmod(0o644)
        path.write_bytes(b"DAGM" + bytes(60))  # generation 0 now fails its checksum
        assert store.manifests([key]) == {key: newer}


@pytest.mark.parametrize("value", ["text", 42, None, 1.5, [1, 2]])
def test_put_refuses_what_is_not_bytes(store: ds.Store, value: object) -> None:
    with pytest.raises(TypeError, match="bytes"):
        store.put(value)


def test_get_into_checks_its_buffer(store: ds.Store) -> None:
    digest = store.put(b"0123456789")
    with pytest.raises(ValueError, match="exactly 10 bytes"):
        store.get_into(digest, bytearray(9))
    with pytest.raises(TypeError, match="writable"):
        store.get_into(digest, b"0123456789")
    strided = np.empty(20, np.uint8)[::2]
    with pytest.raises(TypeError, match="C-contiguous"):
        store.get_into(digest, strided)


def test_wrong_key_and_digest_types_are_refused(store: ds.Store) -> None:
    digest = store.put(b"x")
    with pytest.raises(TypeError, match="Digest"):
        store.get(str(digest))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NodeKey"):
        store.missing(["ab" * 32])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="NodeKey"):
        store.commit("../../etc", ds.Manifest({}))  # type: ignore[arg-type]
    with pytest.raises(ds.InvalidKeyError):
        ds.NodeKey("../" + "a" * 61)


# -- opening -------------------------------------------------------------------------------------


def test_open_creates_then_reopens(tmp_path: Path) -> None:
    with ds.open_store(tmp_path / "new" / "store") as store:
        digest = store.put(b"kept")
    with ds.open_store(f"file://{tmp_path}/new/store") as again:
        assert again.get(digest) == b"kept"


def test_only_making_a_store_creates_its_folder(tmp_path: Path) -> None:
    where = tmp_path / "not" / "yet"
    backend = ds.open_backend(where)
    assert not backend.remote and not where.exists()  # opening a backend creates nothing
    with pytest.raises(ds.StoreOpenError, match="no store at") as info:
        ds.open_store(where, create=False)
    assert str(where) in str(info.value) and str(where) in info.value.url
    assert not (tmp_path / "not").exists()
    with ds.open_store(backend) as store:  # a store is made: its folder first, then its marker
        assert [n for n in os.listdir(where) if not n.startswith(".")] == ["dagger-store"]
        digest = store.put(b"v")
    assert ds.open_store(where, create=False).get(digest) == b"v"


def test_the_layout_is_spelled_out_here_so_it_never_drifts(tmp_path: Path) -> None:
    """The on-storage names, literally: a change here is a format change (see layout.py)."""
    from dagger_store import leases
    from dagger_store.pins import pin
    from dagger_store.records import add_record

    root = tmp_path / "store"
    store = ds.open_store(root)
    digest = store.put(b"blob")
    key = ds.node_key("state", {"layout": 1})
    store.commit(key, ds.Manifest({"b": digest}))
    add_record(store, "exp-a", "def", [key], {})
    assert leases.acquire(store, key, "me", 60) is not None
    pin(store, "paper", [key])
    b, k = digest.hex, key.hex
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    (record,) = [f for f in files if f.startswith("v1/experiments/")]
    assert files == {
        "dagger-store",
        f"v1/blobs/{b[:2]}/{b}",
        f"v1/manifests/{k[:2]}/{k}",
        record,
        f"v1/leases/{k}/000000000000",
        "v1/pins/paper",
    }
    assert re.fullmatch(r"v1/experiments/exp-a/\d{20}-[0-9a-f]{32}\.def", record)
    assert (root / "dagger-store").read_bytes() == b"dagger-store\nlayout: v1\n"


def test_memory_stores_are_shared_by_name() -> None:
    digest = ds.open_store("memory://shared-name").put(b"v")
    assert ds.open_store("memory://shared-name").get(digest) == b"v"
    assert ds.open_store("memory://other-name").has_blobs([digest]) == [False]


@pytest.mark.parametrize("url", ["gs://bucket/x", "ftp://host/x", "hdfs:///x"])
def test_unknown_schemes_are_refused(url: str) -> None:
    with pytest.raises(ds.StoreOpenError, match="unknown scheme") as info:
        ds.open_store(url)
    assert "s3://" in str(info.value) and info.value.url == url


def test_unusable_local_paths_are_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ds.StoreOpenError, match="not a folder"):
        ds.open_store(a_file)
    with pytest.raises(ds.StoreOpenError, match="cannot create"):
        ds.open_store(a_file / "below")
    busy = tmp_path / "home"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    with pytest.raises(ds.StoreOpenError, match="not a dagger store"):
        ds.open_store(busy)
    assert sorted(os.listdir(busy)) == ["thesis.tex"]


def test_another_layout_is_refused(tmp_path: Path) -> None:
    ds.open_store(tmp_path / "s").close()
    (tmp_path / "s" / "dagger-store").unlink()
    (tmp_path / "s" / "dagger-store").write_bytes(b"dagger-store\nlayout: v9\n")
    with pytest.raises(ds.StoreOpenError, match="another layout"):
        ds.open_store(tmp_path / "s")


def test_options_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ds.StoreOpenError, match="s3:// stores only"):
        ds.open_store(tmp_path / "s", storage_options={"key": "k"})
    with pytest.raises(ds.StoreOpenError, match="remote stores"):
        ds.open_store(tmp_path / "s", cache_dir=tmp_path / "cache")


def test_read_through_cache_serves_reads_without_the_remote(
    tmp_path: Path, s3_url: str, s3_storage_options: dict[str, str]
) -> None:
    import s3fs

    cache = tmp_path / "cache"
    with ds.open_store(s3_url, storage_options=s3_storage_options) as store:
        digest = store.put(NOISE)
        small = store.put(b"small")
    with ds.open_store(s3_url, storage_options=s3_storage_options, cache_dir=cache) as store:
        assert store.get(digest) == NOISE and store.get(small) == b"small"
    fs = s3fs.S3FileSystem(**s3_storage_options, skip_instance_cache=True)
    fs.rm(s3_url.removeprefix("s3://") + "/v1", recursive=True)  # the remote loses its copy
    with ds.open_store(s3_url, storage_options=s3_storage_options, cache_dir=cache) as store:
        assert store.get(digest) == NOISE and store.get(small) == b"small"  # served locally
        assert store.has_blobs([digest]) == [False]  # existence is the remote's word


def test_a_group_of_large_objects_written_in_halves_says_which_it_created(
    tmp_path: Path,
) -> None:
    """Two or more objects of 1 MiB or more in a group go to the disk as two halves side by
    side; which were created comes back in the group's order."""
    store = ds.open_store(str(tmp_path / "s"))
    big = [bytes([i]) * (1 << 20) for i in range(4)]
    assert store._write_group([("blobs/aa/one", [big[0]]), ("blobs/aa/four", [big[3]])])
    items: list[tuple[str, list[bytes]]] = [
        ("blobs/aa/one", [big[0]]),  # there already
        ("blobs/aa/two", [big[1]]),
        ("blobs/aa/small", [b"small"]),
        ("blobs/aa/three", [big[2]]),
        ("blobs/aa/four", [big[3]]),  # there already
    ]
    assert store._write_group(items) == [False, True, True, True, False]
    for key, (data,) in items:
        assert store.backend.read(key) == data
