"""Recycled memory for loaded arrays (dagger_store/recycled.py, through codecs.empty).

What a person relies on: an array a load gives them is theirs alone, as ``np.empty``'s is:
no other array, now or later, shares a byte of it while anything (the array, a view, a
buffer) still refers to it, a forked process changing it does not change it here, and the
memory kept idle for the next load is bounded.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import pickle
from typing import Any

import numpy as np
import pytest

import dagger_orchestrate as dg
from dagger_orchestrate.codecs import empty
from dagger_store import recycled

SHAPE = (512, 1024)  # 2 MiB of float32: recycled
DTYPE = np.dtype("float32")


def _address(array: np.ndarray[Any, Any]) -> int:
    return int(array.ctypes.data)


def test_small_arrays_are_plain_numpy() -> None:
    small = empty((10, 10), DTYPE)
    assert small.base is None and small.flags.owndata and small.shape == (10, 10)


def test_a_dead_array_gives_its_memory_to_the_next() -> None:
    first = empty(SHAPE, DTYPE)
    first[:] = 1
    address = _address(first)
    idle = recycled._pool.idle_bytes
    del first
    assert recycled._pool.idle_bytes == idle + 4 * SHAPE[0] * SHAPE[1]
    second = empty(list(SHAPE), DTYPE)
    assert _address(second) == address and second.flags.writeable
    assert second.shape == SHAPE and second.dtype == DTYPE


def test_memory_is_not_given_again_while_a_view_or_buffer_refers_to_it() -> None:
    first = empty(SHAPE, DTYPE)
    first[:] = 1
    view = first[100:]
    buffer = memoryview(first[:10])
    del first
    gc.collect()
    others = [empty(SHAPE, DTYPE) for _ in range(3)]
    for other in others:
        other[:] = 2
    assert (view == 1).all()
    assert np.frombuffer(buffer, dtype=DTYPE).min() == 1
    del view
    others[0][:] = 3  # the buffer still holds the memory: it went back to no one
    assert np.frombuffer(buffer, dtype=DTYPE).max() == 1


def test_two_live_arrays_never_share_memory() -> None:
    arrays = [empty(SHAPE, DTYPE) for _ in range(4)]
    for i, array in enumerate(arrays):
        array[:] = i
    assert [float(a.mean()) for a in arrays] == [0.0, 1.0, 2.0, 3.0]
    assert len({_address(a) for a in arrays}) == 4


def test_the_idle_memory_is_bounded() -> None:
    size = 4 << 20
    arrays = [empty((size,), np.dtype("uint8")) for _ in range(12)]  # 48 MiB
    del arrays
    assert recycled._pool.idle_bytes <= recycled.POOL_BYTES


@pytest.mark.parametrize("readonly", [False, True])
def test_a_copy_is_the_bytes_on_memory_of_its_own(readonly: bool) -> None:
    source = np.random.default_rng(3).integers(0, 256, 3 * 2**20 + 5, dtype=np.uint8)
    expected = source.tobytes()
    copied = recycled.copy(memoryview(expected if readonly else source))
    assert recycled.leased(copied) and bytes(copied) == expected
    source[:] = 0  # the original changes; the copy does not
    assert bytes(copied) == expected


def _write_in_child(array: np.ndarray[Any, Any]) -> None:
    array[:] = 7


def test_a_forked_process_changes_its_own_copy() -> None:
    array = empty(SHAPE, DTYPE)
    array[:] = 1
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_write_in_child, args=(array,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert (array == 1).all()


def test_an_array_from_the_pool_behaves_as_numpy_s(tmp_path: Any) -> None:
    array = empty(SHAPE, DTYPE)
    array[:] = np.arange(SHAPE[1], dtype=DTYPE)
    assert isinstance(array.base, ctypes.Array)
    again = pickle.loads(pickle.dumps(array))
    assert np.array_equal(again, array) and again.flags.writeable
    np.save(tmp_path / "a.npy", array)
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)


class Model(dg.ExperimentState):
    PROPERTIES = ["seed"]
    NONHASHED_ATTRIBUTES = ["weights"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.weights = _weights(self.seed)


def _weights(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(DTYPE)


class Scale(dg.Recipe):
    PROPERTIES = ["factor"]

    def run(self, state: Model) -> Model:
        state.weights *= self.factor
        return state


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_chain_of_loads_sees_each_parent_exactly(tmp_path: Any, scheduler: str) -> None:
    """Each node's array comes from the pool its dead predecessors filled; every state is
    still exactly its parent's, scaled, as the store holds it."""
    exp = dg.Experiment(tmp_path / "exp", state_class=Model)
    node = exp.spawn_new_tree(seed=1)
    chain = [node]
    for _ in range(6):
        node = Scale(factor=2.0)(node)
        chain.append(node)
    exp.run(scheduler=scheduler, progress=False)
    again = dg.Experiment.restore(tmp_path / "exp", state_class=Model)
    for depth, promise in enumerate(chain):
        state = again.graph.node(promise.key).restore()
        np.testing.assert_array_equal(state.weights, _weights(1) * 2.0**depth)
