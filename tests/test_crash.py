"""Crashes, holes and corruption: a store is never left torn, and bad bytes never reach a caller.

Writers are real processes ("spawn" context) killed with SIGKILL, so no cleanup code runs. A
killed writer reports its progress through a pipe (one small message per finished step, which a
kill cannot split); kill points are seeded, and assertions hold wherever the kill lands.
Corruption is planted by editing the store's files directly, never through the store.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import re
import resource
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from blake3 import blake3

from dagger_store import (
    LEAF_SIZE,
    Digest,
    IncompleteManifestError,
    IntegrityError,
    Manifest,
    NodeKey,
    NotFoundError,
    Store,
    framing,
    node_key,
    open_store,
)
from dagger_store.backends.local import LocalBackend
from dagger_store.digest import blob_digest
from dagger_store.framing import HEADER_SIZE, Framing
from dagger_store.layout import BLOBS, MANIFESTS, MARKER, blob_key, manifest_key

SPAWN = mp.get_context("spawn")
# A bound on every wait: far above what any step takes, so only a hang or a dead child reaches it.
WAIT = 120.0
_HEX = re.compile(r"[0-9a-f]{64}")


# -- data both sides can rebuild -----------------------------------------------------------------


def crash_blob(seed: int) -> bytes:
    """Three leaves (17 to 20 MiB): even seeds incompressible (raw), odd seeds compressible."""
    rng = random.Random(seed)
    size = 2 * LEAF_SIZE + (seed % 4 + 1) * 2**20
    if seed % 2 == 0:
        return rng.randbytes(size)
    # A 64 KiB block repeated: leaves 0 and 1 are equal, so one leaf object serves both.
    block = rng.randbytes(64 * 1024)
    return (block * (size // len(block) + 1))[:size]


def node_blobs(run: int, i: int) -> dict[str, bytes]:
    rng = random.Random(1000 * run + i)
    return {"small": rng.randbytes(4096), "large": rng.randbytes(LEAF_SIZE + 2**20)}


def crash_key(run: int, i: int) -> NodeKey:
    return node_key("crash", {"run": run, "i": i})


def expected_manifest(run: int, i: int) -> Manifest:
    blobs = {name: blob_digest(data) for name, data in node_blobs(run, i).items()}
    return Manifest(blobs, {"run": run, "i": i})


def blob_path(root: Path, digest: Digest) -> Path:
    return root / blob_key(digest)


def manifest_path(root: Path, key: NodeKey) -> Path:
    return root / manifest_key(key)


def overwrite(path: Path, data: bytes) -> None:
    """Replace a stored object's bytes in place (objects are stored read-only)."""
    path.chmod(0o644)
    path.write_bytes(data)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    overwrite(path, bytes(data))


def truncate(path: Path, size: int) -> None:
    overwrite(path, path.read_bytes()[:size])


# -- children (module level, so spawned processes can import them) -------------------------------


def put_until_killed(root: str, first_seed: int, conn: Any) -> None:
    """Put crash blobs one after another, reporting each finished one, until killed."""
    with open_store(root) as store:
        conn.send(("ready",))
        for seed in range(first_seed, first_seed + 8):
            digest = store.put(crash_blob(seed))
            conn.send(("done", seed, str(digest)))
        conn.send(("idle",))
        signal.pause()


def commit_until_killed(root: str, run: int, conn: Any) -> None:
    """Put a node's blobs, then commit its manifest, node after node, until killed."""
    with open_store(root) as store:
        conn.send(("ready",))
        for i in range(8):
            blobs = {name: store.put(data) for name, data in node_blobs(run, i).items()}
            conn.send(("blobs", i))
            commit = store.commit(crash_key(run, i), Manifest(blobs, {"run": run, "i": i}))
            conn.send(("committed", i, commit.won))
        conn.send(("idle",))
        signal.pause()


def read_with_little_memory(root: str, digest_text: str, results: Any) -> None:
    """Read a blob and verify the store under a 3 GiB address-space limit; report outcomes.

    The limit turns a huge allocation into a MemoryError here instead of swapping the machine.
    """
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    digest = Digest.parse(digest_text)
    outcomes: list[str] = []
    try:
        with open_store(root) as store:
            for attempt in (
                lambda: store.get(digest),
                lambda: store.get_into(digest, bytearray(digest.size)),
                lambda: store.verify(),
            ):
                try:
                    value = attempt()
                except BaseException as exc:
                    outcomes.append(type(exc).__name__)
                else:
                    ok = getattr(value, "ok", None)
                    outcomes.append("returned" if ok is None else f"verify ok={ok}")
    except BaseException:
        outcomes.append(traceback.format_exc())
    results.put(outcomes)


# -- driving a child to its death ----------------------------------------------------------------


class Child:
    """A spawned child with a one-way progress pipe; ``kill`` is SIGKILL, so nothing cleans up."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.messages: list[tuple[Any, ...]] = []
        self._recv, send = SPAWN.Pipe(duplex=False)
        self.process = SPAWN.Process(target=target, args=(*args, send), daemon=True)
        self.process.start()
        send.close()  # the child's copy is now the only writer: its death reads as EOF

    def wait_for(self, *head: Any, count: int = 1) -> None:
        """Collect messages until ``count`` of them start with ``head``."""
        deadline = time.monotonic() + WAIT
        while sum(m[: len(head)] == head for m in self.messages) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not self._recv.poll(left):
                pytest.fail(f"child never reported what was awaited; it said {self.messages}")
            try:
                self.messages.append(self._recv.recv())
            except EOFError:
                pytest.fail(
                    f"child exited ({self.process.exitcode}) early; it said {self.messages}"
                )

    def kill(self) -> None:
        self.process.kill()
        self.process.join(WAIT)
        assert self.process.exitcode == -signal.SIGKILL, (
            f"child ended with {self.process.exitcode} before it was killed: {self.messages}"
        )
        while True:  # what it reported before it died
            try:
                self.messages.append(self._recv.recv())
            except EOFError:
                break
        self._recv.close()


def wait_for_new_file(folder: Path, before: set[str]) -> None:
    """Poll until a file that was not in ``before`` appears in ``folder`` (a write in flight)."""
    deadline = time.monotonic() + WAIT
    while not (set(os.listdir(folder)) if folder.exists() else set()) - before:
        if time.monotonic() > deadline:
            pytest.fail(f"no new file appeared in {folder}")
        time.sleep(0.0005)


# -- soundness -----------------------------------------------------------------------------------


def check_object(root: Path, rel: str) -> None:
    """Independently of Store: the object at ``rel`` is whole and matches the name it is under."""
    area, shard, name = rel.rsplit("/", 2)
    assert _HEX.fullmatch(name) and shard == name[:2], f"stray file {rel}"
    data = (root / rel).read_bytes()
    if area + "/" == MANIFESTS:
        manifest = Manifest.decode(data, key=rel)
        for digest in manifest.blobs.values():
            assert blob_path(root, digest).is_file(), f"manifest {rel} names absent {digest}"
        return
    assert area + "/" == BLOBS, f"stray file {rel}"
    codec = framing.read_header(data, rel)
    payload = memoryview(data)[HEADER_SIZE:]
    if codec is Framing.INDEX:
        digest = framing.decode_index(payload, name, rel)
        for leaf in framing.index_leaves(payload, digest):
            assert blob_path(root, leaf).is_file(), f"index {rel} names absent leaf {leaf}"
        return
    raw = zstandard.ZstdDecompressor().decompress(payload) if codec is Framing.ZSTD else payload
    assert codec in (Framing.RAW, Framing.ZSTD)
    assert blake3(raw).hexdigest() == name, f"object {rel} does not match its name"


def assert_sound(root: Path) -> None:
    """The store opens, verifies clean, and holds only whole objects (orphans only in .tmp/)."""
    with open_store(root) as store:
        report = store.verify()
        assert report.problems == ()
    assert sorted(p.name for p in root.iterdir()) in (
        [".tmp", MARKER, "v1"],
        [".tmp", MARKER],
        [MARKER],
    )
    objects = 0
    for dirpath, _, filenames in os.walk(root / "v1"):
        for name in filenames:
            check_object(root, (Path(dirpath) / name).relative_to(root).as_posix())
            objects += 1
    assert objects == report.blobs + report.manifests


# -- tests: SIGKILL ------------------------------------------------------------------------------


def test_sigkill_mid_put_leaves_no_partial_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    open_store(root).close()
    rng = random.Random(20240611)
    completed: dict[int, Digest] = {}
    for run in range(6):
        first_seed = 2 * run  # runs overlap: a later child re-puts what an earlier one lost
        temp_files = set(os.listdir(root / ".tmp")) if (root / ".tmp").exists() else set()
        child = Child(put_until_killed, str(root), first_seed)
        child.wait_for("ready")
        child.wait_for("done", count=rng.randint(0, 1))
        if run % 2:
            # Kill while a leaf is being written: a temp file of this child exists.
            wait_for_new_file(root / ".tmp", temp_files)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        child.kill()

        done = {m[1]: Digest.parse(m[2]) for m in child.messages if m[0] == "done"}
        completed |= done
        assert_sound(root)
        in_flight = max(done, default=first_seed - 1) + 1
        with open_store(root) as store:
            for seed, digest in completed.items():
                assert store.get(digest) == crash_blob(seed)
            # The blob being written when the child died is all there or not there at all.
            data = crash_blob(in_flight)
            if store.has_blobs([blob_digest(data)]) == [True]:
                assert store.get(blob_digest(data)) == data
            else:
                with pytest.raises(NotFoundError):
                    store.get(blob_digest(data))
            # And putting it again completes it, whatever the child left behind.
            digest = store.put(data)
            assert store.get(digest) == data
        completed[in_flight] = digest
    assert_sound(root)


def test_sigkill_mid_commit_leaves_complete_manifests_only(tmp_path: Path) -> None:
    root = tmp_path / "store"
    open_store(root).close()
    rng = random.Random(4242)
    # (message that arms the kill, extra delay): right after the blobs of a node are durable,
    # right after a commit, and at seeded moments inside a put or a commit.
    kill_points = [
        (("blobs", 0), 0.0),
        (("committed", 1), 0.0),
        (("blobs", 1), rng.uniform(0.0, 0.01)),
        (("committed", 0), rng.uniform(0.0, 0.2)),
        (("ready",), rng.uniform(0.1, 0.5)),
    ]
    for run, (arm, delay) in enumerate(kill_points):
        child = Child(commit_until_killed, str(root), run)
        child.wait_for(*arm)
        time.sleep(delay)
        child.kill()

        keys = [crash_key(run, i) for i in range(8)]
        reported = {m[1] for m in child.messages if m[0] == "committed"}
        assert all(m[2] for m in child.messages if m[0] == "committed")  # no one else commits
        with_blobs = {m[1] for m in child.messages if m[0] == "blobs"}
        stored = {i for i, key in enumerate(keys) if manifest_path(root, key).exists()}
        # Every reported commit is stored; at most the one in flight at the kill also landed.
        assert reported <= stored
        assert stored - reported <= with_blobs - reported
        assert len(stored - reported) <= 1

        assert_sound(root)
        with open_store(root) as store:
            assert store.missing(keys) == [k for i, k in enumerate(keys) if i not in stored]
            for i, key in enumerate(keys):
                if i in stored:
                    assert store.get_manifest(key) == expected_manifest(run, i)
                else:
                    with pytest.raises(NotFoundError):
                        store.get_manifest(key)
            for i in stored:
                manifest = store.get_manifest(keys[i])
                for name, data in node_blobs(run, i).items():
                    assert store.get(manifest.blobs[name]) == data
    with open_store(root) as store:
        assert len(list(store.manifest_keys())) == store.verify().manifests


# -- tests: a manifest with holes is never a hit -------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "store") as store:
        yield store


def store_root(store: Store) -> Path:
    assert isinstance(store.backend, LocalBackend)
    return store.backend.root


def test_commit_with_an_absent_blob_raises_and_writes_nothing(store: Store) -> None:
    present = store.put(b"present" * 1000)
    absent = blob_digest(b"never put" * 1000)
    key = node_key("holes", {"case": "commit"})
    before = sorted(store.backend.iter_keys())
    with pytest.raises(IncompleteManifestError) as caught:
        store.commit(key, Manifest({"a": present, "b": absent}))
    assert caught.value.missing == (str(absent),)
    assert sorted(store.backend.iter_keys()) == before
    assert store.missing([key]) == [key]
    with pytest.raises(NotFoundError):
        store.get_manifest(key)


def test_commit_naming_a_chunked_blob_without_its_index_raises(store: Store) -> None:
    # What a writer killed between the last leaf and the index leaves behind.
    data = crash_blob(0)
    digest = store.put(data)
    blob_path(store_root(store), digest).unlink()
    key = node_key("holes", {"case": "no index"})
    with pytest.raises(IncompleteManifestError):
        store.commit(key, Manifest({"w": digest}))
    assert not manifest_path(store_root(store), key).exists()
    assert store.missing([key]) == [key]
    assert store.verify().ok  # leaves without an index are harmless leftovers


def test_planted_manifest_naming_an_absent_blob_is_not_a_hit(store: Store) -> None:
    present = store.put(b"present" * 1000)
    absent_data = b"lost" * 100_000
    absent = blob_digest(absent_data)
    holes = node_key("holes", {"case": "planted"})
    whole = node_key("holes", {"case": "whole"})
    store.commit(whole, Manifest({"a": present}))
    # Bypass commit: write the manifest straight through the backend.
    planted = Manifest({"a": present, "b": absent}, {"planted": True})
    assert store.backend.write_once(manifest_key(holes), planted.encode())

    assert store.missing([holes, whole]) == [holes]
    with pytest.raises(IncompleteManifestError) as caught:
        store.get_manifest(holes)
    assert caught.value.missing == (str(absent),)
    report = store.verify()
    assert len(report.problems) == 1 and holes.hex in report.problems[0]
    # A later commit neither overwrites the planted manifest nor reports it as a hit.
    with pytest.raises(IncompleteManifestError):
        store.commit(holes, Manifest({"a": present}))
    assert store.backend.read(manifest_key(holes)) == planted.encode()
    # Putting the absent blob (recomputing the node) makes the manifest whole.
    assert store.put(absent_data) == absent
    assert store.missing([holes, whole]) == []
    assert store.get_manifest(holes) == planted
    assert store.verify().ok


def test_manifest_naming_a_chunked_blob_that_lost_a_leaf_is_not_a_hit(store: Store) -> None:
    # Regression: has_blobs once asked only for a chunked blob's index, not for its leaves.
    data = crash_blob(0)
    digest = store.put(data)
    key = node_key("holes", {"case": "lost leaf"})
    assert store.commit(key, Manifest({"w": digest})).won
    leaf = framing.index_leaves(
        memoryview(blob_path(store_root(store), digest).read_bytes())[HEADER_SIZE:], digest
    )[-1]
    blob_path(store_root(store), leaf).unlink()
    assert not store.verify().ok
    with pytest.raises(NotFoundError):
        store.get(digest)
    assert store.missing([key]) == [key]
    assert store.has_blobs([digest]) == [False]
    with pytest.raises(IncompleteManifestError):
        store.get_manifest(key)


# -- tests: corruption ---------------------------------------------------------------------------

CORRUPTIBLE = {
    # name: (data, the codec the store must pick for it)
    "raw-small": (random.Random(1).randbytes(64 * 1024), Framing.RAW),  # get_into reads it whole
    "raw-large": (random.Random(2).randbytes(3 * 2**20), Framing.RAW),  # get_into reads in place
    "zstd": (b"abc" * 1_000_000, Framing.ZSTD),
}


def put_leaf(store: Store, kind: str) -> tuple[bytes, Digest, Path]:
    data, codec = CORRUPTIBLE[kind]
    digest = store.put(data)
    path = blob_path(store_root(store), digest)
    assert framing.read_header(path.read_bytes(), str(path)) is codec
    return data, digest, path


def assert_unreadable(store: Store, digest: Digest, path: Path) -> None:
    with pytest.raises(IntegrityError):
        store.get(digest)
    with pytest.raises(IntegrityError):
        store.get_into(digest, bytearray(digest.size))
    problems = store.verify().problems
    rel = path.relative_to(store_root(store)).as_posix()
    assert [p for p in problems if rel in p], f"verify missed {rel}: {problems}"


@pytest.mark.parametrize("kind", sorted(CORRUPTIBLE))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_a_leaf_is_an_integrity_error(store: Store, kind: str, where: str) -> None:
    data, digest, path = put_leaf(store, kind)
    size = path.stat().st_size
    offset = {"first": HEADER_SIZE, "middle": (HEADER_SIZE + size) // 2, "last": size - 1}[where]
    original = path.read_bytes()
    flip(path, offset)
    assert_unreadable(store, digest, path)
    overwrite(path, original)
    assert store.get(digest) == data
    assert store.verify().ok


@pytest.mark.parametrize("kind", sorted(CORRUPTIBLE))
@pytest.mark.parametrize("keep", ["all but one", "half", "header only", "part of header", "none"])
def test_truncated_leaf_is_an_integrity_error(store: Store, kind: str, keep: str) -> None:
    _, digest, path = put_leaf(store, kind)
    size = path.stat().st_size
    truncate(
        path,
        {
            "all but one": size - 1,
            "half": size // 2,
            "header only": HEADER_SIZE,
            "part of header": 4,
            "none": 0,
        }[keep],
    )
    assert_unreadable(store, digest, path)


@pytest.mark.parametrize(
    "offset",
    [0, 8 + 5, 8 + 32 + 7, -1],
    ids=["magic", "checksum", "payload", "last byte"],
)
def test_flipped_byte_in_a_manifest_is_an_integrity_error(store: Store, offset: int) -> None:
    key = node_key("corrupt", {"what": "manifest"})
    store.commit(key, Manifest({"w": store.put(b"weights" * 1000)}, {"description": "x"}))
    path = manifest_path(store_root(store), key)
    flip(path, offset % path.stat().st_size)
    with pytest.raises(IntegrityError):
        store.get_manifest(key)
    problems = store.verify().problems
    assert len(problems) == 1 and key.hex in problems[0]


def chunked(store: Store) -> tuple[bytes, Digest, Path]:
    data = random.Random(3).randbytes(2 * LEAF_SIZE + 12345)
    digest = store.put(data)
    return data, digest, blob_path(store_root(store), digest)


# Index layout: 8-byte header, 8-byte big-endian size, then 32 bytes per leaf.
@pytest.mark.parametrize(
    "offset",
    [0, HEADER_SIZE + 6, HEADER_SIZE + 7, HEADER_SIZE + 8, HEADER_SIZE + 8 + 32 + 17, -1],
    ids=["magic", "size", "size low byte", "first leaf", "second leaf", "last leaf end"],
)
def test_flipped_byte_in_an_index_is_an_integrity_error(store: Store, offset: int) -> None:
    _, digest, path = chunked(store)
    flip(path, offset % path.stat().st_size)
    assert_unreadable(store, digest, path)


def test_corrupt_leaf_of_a_chunked_blob_is_an_integrity_error(store: Store) -> None:
    _, digest, path = chunked(store)
    leaves = framing.index_leaves(memoryview(path.read_bytes())[HEADER_SIZE:], digest)
    leaf_path = blob_path(store_root(store), leaves[1])
    flip(leaf_path, leaf_path.stat().st_size // 2, 0x01)
    with pytest.raises(IntegrityError):
        store.get(digest)
    with pytest.raises(IntegrityError):
        store.get_into(digest, bytearray(digest.size))
    problems = store.verify().problems
    assert len(problems) == 1 and leaves[1].hex in problems[0]


def test_verify_lists_each_corrupted_object(store: Store) -> None:
    root = store_root(store)
    _, raw, raw_path = put_leaf(store, "raw-large")
    _, packed, packed_path = put_leaf(store, "zstd")
    _, big, index_path = chunked(store)
    sound = store.put(b"left alone" * 1000)
    key = node_key("corrupt", {"what": "all"})
    store.commit(key, Manifest({"raw": raw, "packed": packed, "big": big, "sound": sound}))
    other = node_key("corrupt", {"what": "other"})
    store.commit(other, Manifest({"sound": sound}))
    assert store.verify().ok

    flip(raw_path, HEADER_SIZE + 100)
    truncate(packed_path, packed_path.stat().st_size - 3)
    flip(index_path, HEADER_SIZE + 8 + 3)
    flip(manifest_path(root, key), -1)
    report = store.verify()
    corrupted = [raw_path, packed_path, index_path, manifest_path(root, key)]
    assert len(report.problems) == len(corrupted), report.problems
    for path in corrupted:
        assert [p for p in report.problems if path.name in p], f"verify missed {path}"
    assert report.blobs == len(list(store.backend.iter_keys(BLOBS)))
    assert report.manifests == 2
    assert store.get(sound) == b"left alone" * 1000
    assert store.get_manifest(other) == Manifest({"sound": sound})


def run_with_little_memory(root: Path, digest: Digest) -> list[str]:
    results = SPAWN.Queue()
    child = SPAWN.Process(
        target=read_with_little_memory, args=(str(root), str(digest), results), daemon=True
    )
    child.start()
    try:
        outcomes: list[str] = results.get(timeout=WAIT)
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
            child.join()
        results.close()
        results.join_thread()
    return outcomes


@pytest.mark.parametrize("byte", [0, 1], ids=["size top byte", "size second byte"])
def test_flipped_high_byte_of_index_size_is_an_integrity_error(store: Store, byte: int) -> None:
    # Regression: decode_index once built a list of size // LEAF_SIZE entries before checking
    # the size, so this flip raised MemoryError from get() and from verify().
    _, digest, path = chunked(store)
    flip(path, HEADER_SIZE + byte)
    outcomes = run_with_little_memory(store_root(store), digest)
    assert outcomes == ["IntegrityError", "IntegrityError", "verify ok=False"]


def zstd_content_size_offset(payload: bytes) -> tuple[int, int]:
    """Where a zstd frame keeps its content size in ``payload``: (offset, length)."""
    assert payload[:4] == b"\x28\xb5\x2f\xfd"
    descriptor = payload[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    length = [1 if single_segment else 0, 2, 4, 8][fcs_flag]
    offset = 5 + (0 if single_segment else 1) + [0, 1, 2, 4][dict_flag]
    assert length, "the frame records no content size"
    return offset, length


def test_corrupt_zstd_content_size_is_an_integrity_error(store: Store) -> None:
    # Regression: python-zstandard ignores max_output_size when the frame states its content
    # size, so this flip once made get() and verify() allocate ~4 GiB (MemoryError here).
    _, digest, path = put_leaf(store, "zstd")
    payload = path.read_bytes()[HEADER_SIZE:]
    offset, length = zstd_content_size_offset(payload)
    flip(path, HEADER_SIZE + offset + length - 1)  # little-endian: the top byte
    corrupted = path.read_bytes()[HEADER_SIZE:]
    assert zstandard.frame_content_size(corrupted) > 3 << 30
    outcomes = run_with_little_memory(store_root(store), digest)
    assert outcomes == ["IntegrityError", "IntegrityError", "verify ok=False"]
