"""Fault injection with real parts: S3 (moto) behind a misbehaving proxy, and a full disk.

Every S3 request here goes over HTTP from s3fs to ``dagger_store.faultproxy`` on 127.0.0.1 and on
to the moto server; the proxy answers some of them with 503 SlowDown or 500 InternalError, resets
or hangs up connections, truncates bodies, or forwards a PUT and then drops its answer. s3fs's and
botocore's retry settings are left as a user has them. What must hold: runs complete with every
state bit-exact, reads return exact bytes or a ``StoreError``, concurrent collaborators and a
garbage collector lose nothing, and a full disk is a clear error that leaves nothing partial.
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from toy_experiment import Prune, State, Train, sparsity

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store import gc, pins
from dagger_store.faultproxy import FaultProxy

# About 6 % of requests faulted, spread over every kind.
MIXED = {
    "slowdown": 0.01,
    "internal": 0.01,
    "reset": 0.01,
    "hangup": 0.01,
    "truncate": 0.01,
    "lost_put": 0.01,
}
READ_FAULTS = ("slowdown", "internal", "reset", "hangup", "truncate")


def pruning_tree(exp: dg.Experiment, seed: int = 0, lrs: tuple[float, ...] = (0.01, 0.1)) -> Any:
    root = exp.spawn_new_tree(dataset_name="digits", seed=seed)
    for lr in lrs:
        with exp.tag(f"lr:{lr}"):
            trained = Train(lr=lr, nb_epochs=2)(root)
            sparsity(trained)
            with exp.tag("pruned"):
                sparsity(Prune(fraction=0.5)(trained))
    return root


def states(exp: dg.Experiment) -> dict[ds.NodeKey, Any]:
    return {node.key: node.restore() for node in exp.graph.nodes}


def assert_bit_exact(state: Any, expected: Any) -> None:
    for name in (*State.PROPERTIES, *State.NONHASHED_ATTRIBUTES):
        value, want = getattr(state, name), getattr(expected, name)
        if name == "data":
            value, want = {"data": value}, {"data": want}
        if isinstance(want, dict):
            assert sorted(value) == sorted(want), name
            for part in want:
                a, b = value[part], want[part]
                assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{name}[{part}]"
                assert a.tobytes() == b.tobytes(), f"{name}[{part}] differs"
        else:
            assert value == want and type(value) is type(want), name


def assert_complete(store: ds.Store, keys: list[ds.NodeKey]) -> None:
    assert store.missing(keys) == []
    report = store.verify()
    assert report.ok, report.problems
    assert report.manifests >= len(set(keys))


# -- the proxy itself ------------------------------------------------------------------------------


def test_the_proxy_misbehaves_as_told(
    fault_proxy: FaultProxy, s3_client: Any, s3_bucket: str
) -> None:
    body = bytes(range(256)) * 40
    s3_client.put_object(Bucket=s3_bucket, Key="o", Body=body)
    host, port = fault_proxy.url.removeprefix("http://").split(":")
    signed = urllib.parse.urlsplit(
        s3_client.generate_presigned_url("get_object", {"Bucket": s3_bucket, "Key": "o"})
    )

    def get() -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", f"{signed.path}?{signed.query}")
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    assert get() == (200, body)
    fault_proxy.inject({"slowdown": 1.0})
    status, error = get()
    assert status == 503 and b"<Code>SlowDown</Code>" in error
    fault_proxy.inject({"internal": 1.0})
    status, error = get()
    assert status == 500 and b"<Code>InternalError</Code>" in error
    fault_proxy.inject({"truncate": 1.0})
    with pytest.raises(http.client.IncompleteRead) as short:
        get()
    assert short.value.partial == body[: len(body) // 2]
    for kind in ("reset", "hangup"):
        fault_proxy.inject({kind: 1.0})
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            get()
    fault_proxy.inject({"internal": 1.0}, methods={"PUT"})  # GETs pass
    assert get() == (200, body)
    fault_proxy.inject({"internal": 1.0}, path="/other")
    assert get() == (200, body)
    fault_proxy.inject({"internal": 1.0}, limit=1)
    assert get()[0] == 500 and get() == (200, body)
    assert fault_proxy.faults == {
        "slowdown": 1, "internal": 2, "truncate": 1, "reset": 1, "hangup": 1
    }  # fmt: skip
    assert fault_proxy.requests["GET"] == 10
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultProxy("http://example.com:80")


def test_fault_decisions_are_reproducible(s3_endpoint: str) -> None:
    def decisions(seed: int) -> list[str | None]:
        with FaultProxy(s3_endpoint, seed=seed) as proxy:
            proxy.inject(dict.fromkeys(READ_FAULTS, 0.1))
            return [proxy._decide("GET", f"/b/{i % 7}") for i in range(200)]

    first = decisions(1)
    assert first == decisions(1) and first != decisions(2)
    assert 50 <= sum(d is not None for d in first) <= 150


# -- (a) an experiment through faults --------------------------------------------------------------


def test_an_experiment_through_faults_is_bit_exact(
    tmp_path: Path, fault_proxy: FaultProxy, proxy_storage_options: dict[str, Any], s3_url: str
) -> None:
    local = dg.Experiment(tmp_path / "local", state_class=State)
    pruning_tree(local)
    local.run()
    expected = states(local)

    fault_proxy.inject(MIXED)
    location: dict[str, Any] = {
        "store": s3_url,
        "storage_options": proxy_storage_options,
        "cache_dir": False,
    }
    remote = dg.Experiment(tmp_path / "remote", state_class=State, **location)
    pruning_tree(remote)
    report = remote.run("threads")
    assert set(report.executed) <= set(expected)
    # Restored through the faults too, by a fresh process-like view of the experiment.
    restored = dg.Experiment.restore(tmp_path / "remote", **location)
    got = states(restored)
    assert set(got) == set(expected) and len(got) == 5
    for key, state in got.items():
        assert_bit_exact(state, expected[key])
    assert restored.results()["sparsity"].equals(local.results()["sparsity"])

    faulted = sum(fault_proxy.faults.values())
    fault_proxy.inject()
    assert faulted >= 5 and len(fault_proxy.faults) >= 3, fault_proxy.faults
    assert_complete(restored.store, list(expected))


# -- (b) reads under faults ------------------------------------------------------------------------


@pytest.fixture
def blobs(fault_proxy: FaultProxy, proxy_storage_options: dict[str, Any], s3_url: str) -> Any:
    """A store through the proxy holding a few blobs (one chunked: two leaves), written before
    any fault; with the bytes each digest must give back."""
    store = ds.open_store(s3_url, storage_options=proxy_storage_options)
    rng = np.random.default_rng(7)
    values = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in (0, 1, 4096, 70_000)]
    values.append(np.zeros(1000, np.float32).tobytes())  # compressible: zstd framing
    values.append(rng.integers(0, 256, ds.LEAF_SIZE + 12_345, dtype=np.uint8).tobytes())
    return store, {store.put(value): value for value in values}


def test_reads_under_faults_are_exact_or_a_store_error(
    blobs: tuple[ds.Store, dict[ds.Digest, bytes]], fault_proxy: FaultProxy
) -> None:
    store, values = blobs
    fault_proxy.inject(dict.fromkeys(READ_FAULTS, 0.04), methods={"GET", "HEAD"})
    exact = errors = 0
    for _ in range(2):
        for digest, value in values.items():
            for how in ("get", "get_into"):
                try:
                    if how == "get":
                        data = bytes(store.get(digest))
                    else:
                        out = np.empty(digest.size, np.uint8)
                        store.get_into(digest, out)
                        data = out.tobytes()
                except ds.StoreError:
                    errors += 1
                    continue
                assert data == value, f"wrong bytes from {how} of {digest}"
                exact += 1
    assert fault_proxy.faults, "no fault was injected"
    assert exact >= 20  # the retries s3fs and botocore make by default carry almost every read


@pytest.fixture
def no_retry_options(proxy_storage_options: dict[str, Any]) -> dict[str, Any]:
    return {**proxy_storage_options, "config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.mark.parametrize("kind", READ_FAULTS)
def test_a_persistent_read_fault_is_a_backend_error(
    fault_proxy: FaultProxy, no_retry_options: dict[str, Any], s3_url: str, kind: str
) -> None:
    # Retries off (as a user may set them), else every fault costs seconds of backoff.
    store = ds.open_store(s3_url, storage_options=no_retry_options)
    backend: Any = store.backend
    backend.fs.retries = 1
    digest = store.put(np.arange(9000, dtype=np.int64))
    fault_proxy.inject({kind: 1.0}, methods={"GET"})
    with pytest.raises(ds.BackendError, match=digest.hex[:16]) as caught:
        store.get(digest)
    assert "testing" not in str(caught.value)  # no credentials in messages
    assert fault_proxy.faults[kind] >= 1


def test_a_put_whose_answer_is_lost_is_found_on_retry(
    fault_proxy: FaultProxy, proxy_storage_options: dict[str, Any], s3_url: str
) -> None:
    store = ds.open_store(s3_url, storage_options=proxy_storage_options)
    value = np.arange(5000, dtype=np.int64).tobytes()
    fault_proxy.inject({"lost_put": 1.0}, methods={"PUT"}, path="/v1/blobs/", limit=1)
    puts = fault_proxy.requests["PUT"]
    digest = store.put(value)  # landed, answer lost; the retry finds it taken: stored all the same
    assert fault_proxy.faults["lost_put"] == 1 and fault_proxy.requests["PUT"] - puts >= 2
    assert bytes(store.get(digest)) == value
    assert store.verify().ok


def test_a_pin_whose_answer_is_lost_is_still_pinned(
    fault_proxy: FaultProxy, proxy_storage_options: dict[str, Any], s3_url: str
) -> None:
    store = ds.open_store(s3_url, storage_options=proxy_storage_options)
    key = ds.node_key("state", {"seed": 0})
    store.commit(key, ds.Manifest({"w": store.put(b"weights")}, {}))
    fault_proxy.inject({"lost_put": 1.0}, methods={"PUT"}, path="/v1/pins/", limit=1)
    try:
        pins.pin(store, "best", [key])
    finally:
        assert fault_proxy.faults["lost_put"] == 1
        assert pins.pins(store) == {"best": [key]}  # the pin landed either way


def test_a_commit_whose_answer_is_lost_is_committed(
    fault_proxy: FaultProxy, proxy_storage_options: dict[str, Any], s3_url: str
) -> None:
    store = ds.open_store(s3_url, storage_options=proxy_storage_options)
    key = ds.node_key("state", {"seed": 1})
    manifest = ds.Manifest({"w": store.put(b"weights")}, {"note": "mine"})
    fault_proxy.inject({"lost_put": 1.0}, methods={"PUT"}, path="/v1/manifests/", limit=1)
    commit = store.commit(key, manifest)
    assert fault_proxy.faults["lost_put"] == 1
    assert commit.manifest == manifest and store.get_manifest(key) == manifest
    assert commit.won


# -- (c) two collaborators and a garbage collector at once -----------------------------------------


def only_gc_took_uncommitted_blobs(error: BaseException) -> bool:
    """A RunError whose every failure is a blob that a collection with grace 0 deleted between
    its put and the commit naming it: the commit refused (IncompleteManifestError), a manifest
    committed meanwhile found incomplete, or its state's blob not found when a Function loads
    it (NotFoundError "no blob"). Documented (gc.py, README: writers must commit within
    ``grace`` of their puts), clear, and repaired by the re-run the message asks for."""
    return isinstance(error, dg.RunError) and all(
        "IncompleteManifestError" in failure or "NotFoundError: no blob" in failure
        for failure in error.failures
    )


@pytest.mark.parametrize("grace", [0.0, 60.0])
def test_collaborators_and_gc_through_faults_lose_nothing(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    proxy_storage_options: dict[str, Any],
    s3_url: str,
    grace: float,
) -> None:
    location: dict[str, Any] = {
        "store": s3_url,
        "storage_options": proxy_storage_options,
        "cache_dir": False,
    }
    alice = dg.Experiment(tmp_path / "alice", state_class=State, **location)
    bob = dg.Experiment(tmp_path / "bob", state_class=State, **location)
    pruning_tree(alice, lrs=(0.1,))
    pruning_tree(bob, lrs=(0.1, 0.3))  # the root and the lr=0.1 branch are shared
    fault_proxy.inject(MIXED)
    store = ds.open_store(s3_url, storage_options=proxy_storage_options)

    done = threading.Event()
    failures: list[BaseException] = []
    collections: list[gc.GcReport] = []

    def collector() -> None:
        while not done.is_set():
            try:  # keep_recent 0: only the experiments' records keep their manifests
                collections.append(gc.collect(store, grace=grace, keep_recent=0, dry_run=False))
            except BaseException as exc:
                failures.append(exc)
            done.wait(0.1)

    def collaborate(exp: dg.Experiment) -> None:
        try:
            exp.run("threads")
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=collaborate, args=(e,)) for e in (alice, bob)]
    sweeper = threading.Thread(target=collector)
    sweeper.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    sweeper.join()
    assert collections
    if grace:  # writers commit within the grace period: nothing may fail at all
        assert not failures, failures
    else:
        assert all(only_gc_took_uncommitted_blobs(f) for f in failures), failures
        for exp in (alice, bob):  # the re-run the error asks for, still through the faults
            exp.run("threads")

    fault_proxy.inject()
    gc.collect(store, grace=0, keep_recent=0, dry_run=False)  # records keep every node
    keys = [n.key for e in (alice, bob) for n in e.graph.nodes]
    assert len(set(keys)) == 5
    assert_complete(store, keys)
    for exp in (alice, bob):
        again = dg.Experiment.restore(exp.path, **location)
        assert len(again.run().executed) == 0
        assert len(states(again)) == len(exp.graph.nodes)


_GC_STORE: list[ds.Store] = []


@dg.Function
def collect_garbage(state: State) -> int:
    """A collaborator's collection (grace 0, keep_recent 0), run from inside a run."""
    return len(gc.collect(_GC_STORE[0], grace=0, keep_recent=0, dry_run=False).manifests)


def test_a_collection_during_a_run_keeps_its_stored_results(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    _GC_STORE[:] = [exp.store]
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    sparsity(root)
    pruned = Prune(fraction=0.5)(Train(lr=0.1, nb_epochs=1)(root))
    collect_garbage(pruned)
    exp.run()  # sync: sparsity(root) is stored before the collection runs
    again = dg.Experiment.restore(tmp_path / "exp", state_class=State)
    # The .def record, written before anything ran, names every result this run stores: the
    # collection (keep_recent 0) found nothing unreferenced, and sparsity's result survived.
    assert again.load_result(collect_garbage, pruned.key) == 0
    root_node = next(n for n in again.graph.nodes if n.key == root.key)
    assert again.load_result(sparsity, root_node) == 0.0


# -- a full disk -----------------------------------------------------------------------------------


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file until at most ``leave`` bytes are free on ``folder``'s filesystem."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("disk", ["small_tmpfs", "small_ext4"])
def test_a_full_disk_is_a_clear_error_and_nothing_partial(
    disk: str, request: pytest.FixtureRequest
) -> None:
    """On tmpfs the value is written through the page cache; on ext4, around it (directio)."""
    folder: Path = request.getfixturevalue(disk)
    store = ds.open_store(folder / "store")
    kept = store.put(b"before the disk filled")
    filler = fill(folder, leave=64 * 1024)
    value = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    with pytest.raises(ds.BackendError, match=r"(?i)no space|full") as caught:
        store.put(value)
    assert isinstance(caught.value, ds.StoreError)
    keys = list(store.backend.iter_keys())
    assert not any(k.startswith(".tmp") for k in keys)
    assert store.has_blobs([kept]) == [True]
    report = store.verify()
    assert report.ok and report.blobs == 1, report.problems

    filler.unlink()
    digest = store.put(value)
    assert bytes(store.get(digest)) == value and store.verify().ok
    assert store.backend._direct is (disk == "small_ext4")  # type: ignore[attr-defined]


def test_a_run_on_a_full_disk_fails_clearly_and_reruns(small_tmpfs: Path) -> None:
    exp = dg.Experiment(small_tmpfs / "exp", state_class=State)
    root = pruning_tree(exp, lrs=(0.1,))
    filler = fill(small_tmpfs, leave=32 * 1024)  # the root's data alone is 64 KiB
    with pytest.raises((dg.RunError, ds.BackendError)) as caught:
        exp.run()
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ds.BackendError) for e in chain), chain
    assert any("space" in str(e).lower() or "full" in str(e).lower() for e in chain), chain
    if isinstance(caught.value, dg.RunError):  # names the node that did not fit
        assert root.key.hex[:12] in str(caught.value) and "State" in str(caught.value)
    store = exp.store
    assert not any(k.startswith(".tmp") for k in store.backend.iter_keys())
    report = store.verify()
    assert report.ok, report.problems

    filler.unlink()
    again = dg.Experiment.restore(small_tmpfs / "exp", state_class=State)
    pruning_tree(again, lrs=(0.1,))
    again.run()
    keys = [n.key for n in again.graph.nodes]
    assert len(keys) == 3
    assert_complete(again.store, keys)
