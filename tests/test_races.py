"""Races on one store between real processes and threads: one writer wins, nothing tears.

Processes start with the "spawn" context (forking a threaded pytest is unsafe) and line up on a
barrier right before the contested call, so they collide as closely as the OS lets them. Tests
assert outcomes only (who won, which bytes are stored, which files exist), never timings; every
wait has a generous bound so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import threading
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dagger_store import LEAF_SIZE, Digest, Manifest, NodeKey, Store, node_key, open_store
from dagger_store.digest import blob_digest, leaf_digest, leaf_views, tree_digest
from dagger_store.layout import BLOBS, MARKER, MARKER_TEXT, blob_key

SPAWN = mp.get_context("spawn")
# A bound on every wait: far above what any step takes, so only a hang or a dead peer reaches it.
WAIT = 120.0
PROCESSES = 6
S3_PROCESSES = 4
THREADS = 8
ROUNDS = 5


class CommitOutcome(NamedTuple):
    """What one racer saw in one round of a commit race (manifests as their stored bytes)."""

    won: bool
    returned: bytes  # Commit.manifest
    mine: bytes  # the manifest this racer tried to commit
    read_back: bytes  # get_manifest right after the commit returned


# -- data both sides can rebuild -----------------------------------------------------------------


def race_key(round_: int) -> NodeKey:
    return node_key("race", {"round": round_})


def writer_payload(writer: int, round_: int) -> bytes:
    """A blob only this writer puts in this round."""
    return f"writer {writer} of round {round_}\n".encode() * 4096


def big_blob(kind: str) -> bytes:
    """More than two leaves: incompressible (stored raw) or compressible (stored zstd)."""
    if kind == "random":
        return random.Random(7).randbytes(20 * 2**20)
    # 8 MiB is not a multiple of 3, so each leaf starts at another phase: three distinct leaves.
    return b"abc" * (7 * 2**20)


def expected_objects(data: bytes) -> set[str]:
    """The blob keys a chunked put of ``data`` must leave: one per distinct leaf, one index."""
    leaves = [leaf_digest(view) for view in leaf_views(memoryview(data))]
    assert len(leaves) > 1
    digests = [*leaves, tree_digest(len(data), leaves)]
    return {blob_key(d) for d in digests}


def files_under(root: Path, sub: str) -> set[str]:
    base = root / sub
    return {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()}


# -- running racers ------------------------------------------------------------------------------


def _guarded(
    target: Callable[..., Any], index: int, barrier: Any, results: Any, args: tuple[Any, ...]
) -> None:
    """Run one racer; report its value or its traceback, and never leave peers at the barrier."""
    try:
        value = target(index, barrier, *args)
    except BaseException:
        barrier.abort()
        results.put((index, False, traceback.format_exc()))
    else:
        results.put((index, True, value))


def run_processes(target: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(index, barrier, *args[index])`` in one spawned process each; their values."""
    results = SPAWN.Queue()
    barrier = SPAWN.Barrier(len(args))
    procs = [
        SPAWN.Process(target=_guarded, args=(target, i, barrier, results, a), daemon=True)
        for i, a in enumerate(args)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            reports = sorted(results.get(timeout=WAIT) for _ in procs)
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            pytest.fail(f"a racer neither reported nor finished within {WAIT:.0f} s: {codes}")
    finally:
        for proc in procs:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        results.join_thread()
    failures = [f"racer {i}:\n{value}" for i, ok, value in reports if not ok]
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return [value for _, _, value in reports]


def run_threads(target: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """As run_processes, with threads of this process."""
    barrier = threading.Barrier(len(args))

    def guarded(index: int) -> Any:
        try:
            return target(index, barrier, *args[index])
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(len(args)) as pool:
        futures = [pool.submit(guarded, i) for i in range(len(args))]
        return [f.result(timeout=WAIT) for f in futures]


def location(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, Any]:
    """A fresh store URL and its storage options (S3 fixtures only when S3 is asked for)."""
    if where == "local":
        return str(tmp_path / "store"), None
    if where == "memory":
        return f"memory://races-{uuid.uuid4().hex}", None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")


# -- racers (module level, so spawned processes can import them) ---------------------------------


def commit_racer(
    index: int, barrier: Any, url: str, options: Any, rounds: int
) -> list[CommitOutcome]:
    """Each round: put my own blob, wait for everyone, commit my manifest under the shared key."""
    with open_store(url, storage_options=options) as store:
        return commit_rounds(store, index, barrier, rounds)


def commit_rounds(store: Store, index: int, barrier: Any, rounds: int) -> list[CommitOutcome]:
    outcomes = []
    for round_ in range(rounds):
        blob = store.put(writer_payload(index, round_))
        mine = Manifest({"weights": blob}, {"writer": index, "round": round_})
        barrier.wait(WAIT)
        commit = store.commit(race_key(round_), mine)
        assert commit.key == race_key(round_)
        read_back = store.get_manifest(race_key(round_)).encode()
        outcomes.append(
            CommitOutcome(commit.won, commit.manifest.encode(), mine.encode(), read_back)
        )
    return outcomes


def put_racer(index: int, barrier: Any, url: str, kinds: Sequence[str]) -> list[str]:
    """For each kind: build the same big blob, wait for everyone, put it."""
    with open_store(url) as store:
        return put_rounds(store, index, barrier, kinds)


def put_rounds(store: Store, index: int, barrier: Any, kinds: Sequence[str]) -> list[str]:
    digests = []
    for kind in kinds:
        data = big_blob(kind)
        barrier.wait(WAIT)
        digests.append(str(store.put(data)))
    return digests


def open_racer(index: int, barrier: Any, urls: Sequence[str], options: Any) -> list[str]:
    """For each URL: wait for everyone, then open (creating) the store there; errors as text."""
    errors = []
    for url in urls:
        barrier.wait(WAIT)
        try:
            open_store(url, storage_options=options).close()
        except Exception as exc:
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
    return errors


# -- checks --------------------------------------------------------------------------------------


def assert_one_winner(
    per_racer: Sequence[Sequence[CommitOutcome]], rounds: int, store: Store
) -> None:
    for round_ in range(rounds):
        rows = [outcomes[round_] for outcomes in per_racer]
        winners = [i for i, row in enumerate(rows) if row.won]
        assert len(winners) == 1, f"round {round_}: writers {winners} all report won=True"
        stored = rows[winners[0]].mine
        assert Manifest.decode(stored, key="winner").meta["writer"] == winners[0]
        for i, row in enumerate(rows):
            assert row.returned == stored, f"round {round_}: racer {i} was handed another manifest"
            assert row.read_back == stored, f"round {round_}: racer {i} reads another manifest"
            if i != winners[0]:
                assert row.mine != stored
        assert store.get_manifest(race_key(round_)).encode() == stored
    assert sorted(store.manifest_keys()) == sorted(race_key(r) for r in range(rounds))
    assert store.verify().ok


# -- tests ---------------------------------------------------------------------------------------


def test_processes_commit_different_manifests_under_one_key(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    open_store(url).close()
    per_racer = run_processes(commit_racer, [(url, None, ROUNDS)] * PROCESSES)
    with open_store(url) as store:
        assert_one_winner(per_racer, ROUNDS, store)
        # Every racer's blob is stored, winner's or not: blobs are durable before the commit.
        everyone = [
            blob_digest(writer_payload(w, r)) for w in range(PROCESSES) for r in range(ROUNDS)
        ]
        assert store.has_blobs(everyone) == [True] * len(everyone)
    assert not os.listdir(tmp_path / "store" / ".tmp"), "a racer left a temp file behind"


def test_processes_commit_race_on_s3(s3_url: str, s3_storage_options: dict[str, Any]) -> None:
    open_store(s3_url, storage_options=s3_storage_options).close()
    rounds = 3
    per_racer = run_processes(commit_racer, [(s3_url, s3_storage_options, rounds)] * S3_PROCESSES)
    with open_store(s3_url, storage_options=s3_storage_options) as store:
        assert_one_winner(per_racer, rounds, store)


def test_processes_put_one_chunked_blob_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    open_store(root).close()
    kinds = ("random", "compressible")
    per_racer = run_processes(put_racer, [(str(root), kinds)] * PROCESSES)
    with open_store(root) as store:
        expected: set[str] = set()
        for column, kind in enumerate(kinds):
            data = big_blob(kind)
            assert len(data) > 2 * LEAF_SIZE
            digests = {row[column] for row in per_racer}
            assert len(digests) == 1, f"racers disagree on the digest of the {kind} blob"
            digest = Digest.parse(digests.pop())
            assert digest.is_chunked and digest.size == len(data)
            assert store.get(digest) == data
            expected |= expected_objects(data)
        assert len(expected) == 8  # three leaves and an index, twice
        assert files_under(root, BLOBS) == expected
        report = store.verify()
        assert report.ok, report.problems
        assert report.blobs == len(expected)
    assert not os.listdir(root / ".tmp"), "a racer left a temp file behind"


@pytest.mark.parametrize("where", ["memory", "local", "s3"])
def test_threads_race_on_one_store(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url, options = location(where, tmp_path, request)
    with open_store(url, storage_options=options) as store:
        per_racer = run_threads(
            lambda i, barrier: commit_rounds(store, i, barrier, ROUNDS), [()] * THREADS
        )
        assert_one_winner(per_racer, ROUNDS, store)

        before = set(store.backend.iter_keys(BLOBS))
        digests = run_threads(
            lambda i, barrier: put_rounds(store, i, barrier, ["random"]), [()] * THREADS
        )
        assert len({d for (d,) in digests}) == 1
        data = big_blob("random")
        assert store.get(Digest.parse(digests[0][0])) == data
        assert set(store.backend.iter_keys(BLOBS)) - before == expected_objects(data)
        assert store.verify().ok
    if where == "local":
        assert not os.listdir(tmp_path / "store" / ".tmp")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_processes_create_one_store_at_once(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base, options = location(where, tmp_path, request)
    # Nested, not yet existing locations: the racers also race to make the parent folders.
    urls = [f"{base}/round-{r}/nested/store" for r in range(ROUNDS if where == "local" else 3)]
    racers = PROCESSES if where == "local" else S3_PROCESSES
    errors = run_processes(open_racer, [(urls, options)] * racers)
    assert errors == [[]] * racers
    for url in urls:
        with open_store(url, storage_options=options) as store:
            assert list(store.backend.iter_keys()) == [MARKER]
            assert store.backend.read(MARKER) == MARKER_TEXT
