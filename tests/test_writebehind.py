"""Write-behind (dagger_orchestrate/writebehind.py): what a run computed in its own process is
written in groups while the next nodes compute, and children read their parents from memory.

What a person relies on: a child computed from its parent in memory sees exactly what it would
see had the parent been read from the store; what is staged is written as a plain put writes
it; a node whose write fails fails, with its descendants skipped and nothing partial stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate import writebehind
from dagger_store import resident
from dagger_store.backends.base import Buffer
from dagger_store.backends.memory import MemoryBackend
from dagger_store.framing import Framing, read_header


class Rich(dg.ExperimentState):
    """Attributes whose layout a careless hand-off would change."""

    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs: Any) -> None:
        rng = np.random.default_rng(self.seed)
        self.big = rng.standard_normal(3 * 2**20)  # 24 MB: chunked, staged in mapped memory
        self.shared = rng.standard_normal(1000)
        self.alias = self.shared  # the same array twice: stored twice, loaded as two
        self.fortran = np.asfortranarray(rng.standard_normal((300, 40)))
        self.frozen = np.arange(5000.0)
        self.frozen.flags.writeable = False
        self.pair = (np.arange(3), "label")
        self.zeros = np.zeros(2**18)  # 2 MB that compress to nothing


class Observe(dg.Recipe):
    """Records what it finds in its parent's state, then changes the state a little."""

    PROPERTIES = ["step"]

    def run(self, state: dg.ExperimentState) -> dg.ExperimentState:
        s: Any = state
        s.seen = {
            "alias_is_shared": s.alias is s.shared,
            "fortran": bool(s.fortran.flags.f_contiguous),
            "writeable": bool(s.frozen.flags.writeable),
            "pair": type(s.pair).__name__,
            "big_sum": float(s.big.sum()),
        }
        s.shared += self.step  # in place: through `alias` too only if they are one array
        s.big[:10] = self.step
        return state


def _tree(exp: dg.Experiment) -> Any:
    return Observe(step=2)(Observe(step=1)(exp.spawn_new_tree(seed=3)))


def _stored(exp: dg.Experiment, key: ds.NodeKey) -> dict[str, Any]:
    state = exp.graph.node(key).restore()
    return {name: getattr(state, name) for name in vars(state) if not name.startswith("_")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
        elif isinstance(x, tuple):
            assert np.array_equal(x[0], y[0]) and x[1:] == y[1:], name
        else:
            assert x == y, name


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_child_computed_from_memory_matches_one_computed_from_the_store(
    tmp_path: Path, scheduler: str
) -> None:
    # One run computes the whole chain, its children reading their parents from memory.
    together = dg.Experiment(tmp_path / "together", state_class=Rich)
    leaf = _tree(together)
    assert len(together.run(scheduler, progress=False).executed) == 3
    # Here every node is computed in a run of its own, reading its parent from the store.
    apart = dg.Experiment(tmp_path / "apart", state_class=Rich)
    node = apart.spawn_new_tree(seed=3)
    for step in (1, 2):
        apart.run(scheduler, progress=False)
        node = Observe(step=step)(node)
    apart.run(scheduler, progress=False)
    assert node.key == leaf.key
    for key in (leaf.key, leaf.node.parent):
        assert key is not None
        _same(_stored(together, key), _stored(apart, key))
    seen = _stored(together, leaf.key)["seen"]
    assert seen == {**seen, "alias_is_shared": False, "fortran": False, "writeable": True}
    assert seen["pair"] == "tuple"


def test_staged_blobs_are_written_as_a_put_writes_them(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=Rich)
    root = exp.spawn_new_tree(seed=3)
    exp.run(progress=False)
    manifest = exp.store.get_manifest(root.key)
    backend = exp.store.backend

    def framing_of(name: str) -> Framing:
        digest = manifest.blobs[name]
        return read_header(backend.read(f"v1/blobs/{digest.hex[:2]}/{digest.hex}")[:8], name)

    assert framing_of("zeros") is Framing.ZSTD  # compressed where it pays
    assert framing_of("shared") is Framing.RAW
    assert framing_of("big") is Framing.INDEX
    assert exp.store.verify().problems == ()
    # Values small enough live in the manifest itself: no blob of their own.
    assert "inline" in manifest.meta["attributes"]["seed"] and "seed" not in manifest.blobs


# -- a store whose blob writes fail on demand --------------------------------------------------


class Flaky(MemoryBackend):
    failing = False

    def write_once(self, key: str, *parts: Buffer) -> bool:
        if self.failing and key.startswith("v1/blobs/"):
            raise ds.BackendError(f"injected: no space left for {key}", key=key)
        return super().write_once(key, *parts)


_FLAKY: dict[str, Flaky] = {}


def _open_flaky(url: str, storage_options: Mapping[str, Any]) -> Flaky:
    return _FLAKY.setdefault(url, Flaky(url))


def test_a_node_whose_write_fails_fails_alone_and_its_descendants_are_skipped(
    tmp_path: Path,
) -> None:
    ds.register_backend("flakytest", _open_flaky)
    url = "flakytest://wb"
    exp = dg.Experiment(tmp_path / "exp", state_class=Rich, store=url)
    leaf = _tree(exp)
    _FLAKY[url].failing = True
    with pytest.raises(dg.RunError, match="injected: no space left") as caught:
        exp.run(progress=False)
    report = caught.value.report
    root_key = leaf.node.parent
    assert root_key is not None
    assert len(report.failed) == 1 and len(report.skipped) == 2 and not report.executed
    assert exp.store.has_manifests([leaf.key]) == [False]
    # Space again: the next run computes and writes everything.
    _FLAKY[url].failing = False
    assert len(exp.run(progress=False).executed) == 3
    assert exp.store.verify().problems == ()


# -- S3: requests per node ---------------------------------------------------------------------


class Tiny(dg.ExperimentState):
    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.value = np.zeros(128)  # 1 KB: inline in the manifest


class Step(dg.Recipe):
    PROPERTIES = ["i"]

    def run(self, state: dg.ExperimentState) -> dg.ExperimentState:
        state.value = state.value + self.i  # type: ignore[attr-defined]
        return state


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_tiny_node_costs_a_few_s3_requests_and_they_overlap(
    tmp_path: Path,
    fault_proxy: Any,
    proxy_storage_options: dict[str, Any],
    s3_url: str,
    scheduler: str,
) -> None:
    exp = dg.Experiment(
        tmp_path / "exp", state_class=Tiny, store=s3_url, storage_options=proxy_storage_options
    )
    root = exp.spawn_new_tree(seed=0)
    for i in range(10):
        trained = Step(i=i)(root)
        for j in range(9):
            Step(i=100 + j)(trained)
    exp.run(scheduler, progress=False)  # the root, so that the rest is a sweep of 100 nodes
    before = fault_proxy.forwarded
    fault_proxy.peak_in_flight = 0
    for i in range(10, 20):
        trained = Step(i=i)(root)
        for j in range(9):
            Step(i=100 + j)(trained)
    report = exp.run(scheduler, progress=False)
    assert len(report.executed) == 100
    # Before write-behind, 15 a node: lease listing, lease, existence, parent manifest, blobs,
    # their existence again, manifest, lease listing, lease deletion... Now at most the lease,
    # one existence question and the manifest, and the run's records.
    assert fault_proxy.forwarded - before <= 5 * 100
    assert fault_proxy.peak_in_flight > 1  # a group's requests go side by side
    assert exp.run(scheduler, progress=False).executed == ()


# -- large arrays lent copy-on-write (dagger_store/resident.py) --------------------------------


class Carried(dg.ExperimentState):
    """A data set every node carries, and a model every recipe changes."""

    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs: Any) -> None:
        rng = np.random.default_rng(self.seed)
        self.data = rng.standard_normal(2**20)  # 8 MB
        self.model = rng.standard_normal(2**18)  # 2 MB


class Fit(dg.Recipe):
    """Changes the model; with ``poke`` >= 0, also sets one entry of the data set in place."""

    PROPERTIES = ["rate", "poke"]

    def run(self, state: dg.ExperimentState) -> dg.ExperimentState:
        s: Any = state
        s.model *= 1 - self.rate
        s.model += self.rate * s.data[: s.model.size]
        if self.poke >= 0:
            s.data[self.poke * 4096] = float(self.poke)
        return state


def _expected(seed: int, fits: list[tuple[float, int]]) -> dict[str, np.ndarray]:
    state: Any = type("Plain", (), {})()
    rng = np.random.default_rng(seed)
    state.data, state.model = rng.standard_normal(2**20), rng.standard_normal(2**18)
    for rate, poke in fits:
        Fit(rate=rate, poke=poke).run(state)
    return {"data": state.data, "model": state.model}


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_siblings_changing_a_lent_data_set_in_place_never_see_each_others_changes(
    tmp_path: Path, scheduler: str, where: str, hashed_leaves: list[int], request: Any
) -> None:
    location: dict[str, Any] = {}
    if where == "s3":  # the staged regions written through s3fs to a real S3 server
        location = {
            "store": request.getfixturevalue("s3_url"),
            "storage_options": request.getfixturevalue("s3_storage_options"),
        }
    exp = dg.Experiment(tmp_path / "exp", state_class=Carried, **location)
    root = exp.spawn_new_tree(seed=5)
    first = Fit(rate=0.5, poke=-1)(root)
    plans = {first.key: [(0.5, -1)]}
    for i in range(4):  # siblings: three poke the data set they were lent, one leaves it alone
        poke = i if i < 3 else -1
        child = Fit(rate=0.1 * (i + 1), poke=poke)(first)
        plans[child.key] = [(0.5, -1), (0.1 * (i + 1), poke)]
        grandchild = Fit(rate=0.3, poke=-1)(child)
        plans[grandchild.key] = plans[child.key] + [(0.3, -1)]
    assert len(exp.run(scheduler, progress=False).executed) == 10
    # Another Experiment reads the store, verified.
    fresh = dg.Experiment(tmp_path / "exp", state_class=Carried, **location)
    data_digests = set()
    for key, fits in plans.items():
        stored = _stored(fresh, key)
        expected = _expected(5, fits)
        assert np.array_equal(stored["data"], expected["data"]), key
        assert np.array_equal(stored["model"], expected["model"]), key
        data_digests.add(fresh.store.get_manifest(key).blobs["data"])
    assert len(data_digests) == 4  # the original and the three poked
    if resident.available():
        # Hashed where it was made (the root) and where it was poked (3): a page written
        # does not make it a rewritten array, so the pokers' children map it too. The six
        # nodes that carried a lent data set unchanged named it without hashing it.
        data_hashes = sum(1 for size in hashed_leaves if size == 8 * 2**20)
        assert data_hashes == 1 + 3, hashed_leaves
    assert fresh.store.verify().problems == ()


@pytest.mark.skipif(not resident.available(), reason="regions need Linux memfd sealing")
def test_a_model_rewritten_by_one_child_is_copied_by_its_siblings_the_data_set_lent_to_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first child is lent everything; it rewrites the model (every page) and leaves the
    data set alone, so its siblings are lent the data set and copy the model: a model mapped
    and rewritten whole costs about four copies."""
    lent: list[tuple[int, bool]] = []  # (size, lent) of each large blob a task asked for
    real = ds.Store.get_private

    def recording(self: ds.Store, digest: ds.Digest) -> Any:
        mapped = real(self, digest)
        lent.append((digest.size, mapped is not None))
        return mapped

    monkeypatch.setattr(ds.Store, "get_private", recording)
    exp = dg.Experiment(tmp_path / "exp", state_class=Carried)
    root = exp.spawn_new_tree(seed=7)
    children = [Fit(rate=0.1 * (i + 1), poke=-1)(root) for i in range(3)]
    assert len(exp.run("sync", progress=False).executed) == 4
    data, model = 8 * 2**20, 2 * 2**20
    assert [was for size, was in lent if size == data] == [True, True, True]
    assert [was for size, was in lent if size == model] == [True, False, False]
    fresh = dg.Experiment(tmp_path / "exp", state_class=Carried)
    for i, child in enumerate(children):
        expected = _expected(7, [(0.1 * (i + 1), -1)])
        assert np.array_equal(_stored(fresh, child.key)["model"], expected["model"])


@pytest.mark.skipif(not resident.available(), reason="regions need Linux memfd sealing")
def test_a_data_set_written_before_its_last_reader_has_read_it_is_still_lent_on(
    tmp_path: Path, hashed_leaves: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast disk writes a node before its last reader has loaded it: the blobs that reader
    will name again (the data set it carries) must stay in memory until it is submitted, so
    that its own children map them instead of reading and hashing them again."""
    real_read = writebehind.WriteBehind.read

    def read_once_written(
        self: writebehind.WriteBehind, key: ds.NodeKey, by: ds.NodeKey | None = None
    ) -> None:
        self.written(key)  # this interleaving, every time: the parent is on disk first
        real_read(self, key, *([] if by is None else [by]))

    monkeypatch.setattr(writebehind.WriteBehind, "read", read_once_written)
    exp = dg.Experiment(tmp_path / "exp", state_class=Carried)
    first = Fit(rate=0.5, poke=-1)(exp.spawn_new_tree(seed=6))
    second = Fit(rate=0.2, poke=-1)(first)
    third = Fit(rate=0.1, poke=-1)(second)
    assert len(exp.run("sync", progress=False).executed) == 4
    # The data set hashed where it was made (the root) alone: the others were lent it and
    # left it alone.
    assert sum(1 for size in hashed_leaves if size == 8 * 2**20) == 1, hashed_leaves
    fresh = dg.Experiment(tmp_path / "exp", state_class=Carried)
    stored, expected = _stored(fresh, third.key), _expected(6, [(0.5, -1), (0.2, -1), (0.1, -1)])
    assert np.array_equal(stored["data"], expected["data"])
    assert np.array_equal(stored["model"], expected["model"])


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_beyond_the_retention_budget_children_read_their_parents_from_the_store(
    tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget of one region: the others are dropped once written, and read back verified.
    monkeypatch.setattr(writebehind, "RETAIN_BYTES", 2 * 2**20)
    exp = dg.Experiment(tmp_path / "exp", state_class=Carried)
    root = exp.spawn_new_tree(seed=9)
    plans = {}
    for i in range(6):
        child = Fit(rate=0.1 * (i + 1), poke=i % 2 * i)(root)
        plans[Fit(rate=0.2, poke=-1)(child).key] = [(0.1 * (i + 1), i % 2 * i), (0.2, -1)]
    assert len(exp.run(scheduler, progress=False).executed) == 13
    fresh = dg.Experiment(tmp_path / "exp", state_class=Carried)
    for key, fits in plans.items():
        stored, expected = _stored(fresh, key), _expected(9, fits)
        assert np.array_equal(stored["data"], expected["data"]), key
        assert np.array_equal(stored["model"], expected["model"]), key
    assert fresh.store.verify().problems == ()
