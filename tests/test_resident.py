"""Large staged blobs in sealed memory files (dagger_store/resident.py): lent copy-on-write,
recognised unchanged when put back.

What a person relies on: an array lent out of a region is theirs to change, and no one else
(a sibling, the region, the store) sees the change; put back unchanged it names the same blob
without being hashed again, put back changed it is hashed and stored as what it now holds;
where the mechanism is missing, everything works as before, copying.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dagger_store as ds
from dagger_orchestrate.codecs import empty
from dagger_store import recycled, resident
from dagger_store.digest import LEAF_SIZE, blob_digest
from dagger_store.layout import blob_key
from dagger_store.staging import RawLeaf

pytestmark = pytest.mark.skipif(
    not resident.available(),
    reason="regions need Linux memfd sealing and a readable /proc/self/pagemap",
)

BIG = 3 * LEAF_SIZE + 8 * 17  # bytes: three leaves and a short fourth


def _array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(BIG // 8)


def _open(tmp_path: Path) -> ds.Store:
    return ds.open_store(str(tmp_path / "store"))


def _staged_put(store: ds.Store, value: object, known: set[str] | None = None):  # type: ignore[no-untyped-def]
    with store.staged(known if known is not None else set()) as stage:
        digest = store.put(value)
    return digest, stage


def _lent(store: ds.Store, stage: Any, digest: ds.Digest, count: int) -> list[np.ndarray]:
    """``count`` arrays lent out of the region ``stage`` staged blob ``digest`` in."""
    with store.reading(stage.objects):
        mapped = [store.get_private(digest) for _ in range(count)]
    assert all(m is not None for m in mapped)
    return [np.frombuffer(m, dtype=np.float64) for m in mapped]  # type: ignore[arg-type]


def test_a_staged_array_is_lent_copy_on_write_and_put_back_unchanged_without_hashing(
    tmp_path: Path, hashed_leaves: list[int]
) -> None:
    store = _open(tmp_path)
    original = _array()
    digest, stage = _staged_put(store, original)
    assert digest == blob_digest(memoryview(original).cast("B"))
    assert any(isinstance(v, RawLeaf) for v in stage.objects.values())
    with store.reading(stage.objects):
        lent = store.get_private(digest)
    assert lent is not None
    array = np.frombuffer(lent, dtype=np.float64)
    assert array.flags.writeable and np.array_equal(array, original)

    hashed_leaves.clear()
    again, second = _staged_put(store, array, known=set(stage.objects))
    assert again == digest and hashed_leaves == []  # named again, not a byte hashed
    assert second.objects == {} and set(stage.objects) <= second.named


def test_a_lent_array_changed_in_one_place_is_hashed_and_stored_as_it_now_is(
    tmp_path: Path,
) -> None:
    store = _open(tmp_path)
    original = _array()
    digest, stage = _staged_put(store, original)
    mine, sibling = _lent(store, stage, digest, 2)
    mine[len(mine) // 2] = 42.0  # one page written
    assert sibling[len(mine) // 2] != 42.0 and np.array_equal(sibling, original)
    changed, second = _staged_put(store, mine, known=set(stage.objects))
    assert changed != digest
    assert changed == blob_digest(memoryview(mine).cast("B"))
    # The unchanged sibling still names the original; the region itself never changed.
    same, _ = _staged_put(store, sibling, known=set(stage.objects))
    assert same == digest
    with store.reading(stage.objects):
        again = np.frombuffer(store.get_private(digest), dtype=np.float64)  # type: ignore[arg-type]
    assert np.array_equal(again, original)
    # Written, both read back from storage (verified) as they were put.
    store.write_staged(stage.objects)
    store.write_staged(second.objects)
    for value, key in ((original, digest), (mine, changed)):
        out = np.empty_like(value)
        store.get_into(key, out)
        assert np.array_equal(out, value)
    assert store.verify().problems == ()


def test_a_region_cannot_change_once_sealed(tmp_path: Path) -> None:
    store = _open(tmp_path)
    _, stage = _staged_put(store, _array())
    leaf = next(v for v in stage.objects.values() if isinstance(v, RawLeaf))
    with pytest.raises(OSError):
        os.pwrite(leaf.region._fd, b"x", 0)
    with pytest.raises(TypeError):
        leaf.payload[0] = 1


def test_a_lent_array_rewritten_is_staged_as_a_copy_and_said_rewritten(tmp_path: Path) -> None:
    """Most pages written: a model trained in place. Its next reader had better copy it, and
    a copy in recycled memory costs less than a region; a page or two written (a data set
    touched up) stays a region, lent on."""
    store = _open(tmp_path)
    original = _array()
    digest, stage = _staged_put(store, original)
    touched, rewritten = _lent(store, stage, digest, 2)
    touched[::100_000] += 1.0  # 32 of ~6,100 pages
    rewritten *= 0.5
    assert 0 < resident.written_share(memoryview(touched).cast("B")) < 0.01
    assert resident.written_share(memoryview(rewritten).cast("B")) == 1.0

    _, little = _staged_put(store, touched, known=set(stage.objects))
    assert little.rewritten == set()
    assert all(v.region is not None for v in little.objects.values() if isinstance(v, RawLeaf))

    halved, much = _staged_put(store, rewritten, known=set(stage.objects))
    assert much.rewritten == {blob_key(digest)}
    leaves = [v for v in much.objects.values() if isinstance(v, RawLeaf)]
    assert leaves and all(v.region is None for v in leaves)
    store.write_staged(much.objects)
    out = np.empty_like(original)
    store.get_into(halved, out)
    assert np.array_equal(out, original * 0.5)


def test_put_back_elsewhere_is_hashed_and_staged_again(tmp_path: Path) -> None:
    """A writer that did not stage the region (another run) cannot name it unwritten."""
    store = _open(tmp_path)
    digest, stage = _staged_put(store, _array())
    with store.reading(stage.objects):
        lent = np.frombuffer(store.get_private(digest), dtype=np.float64)  # type: ignore[arg-type]
    again, other = _staged_put(store, lent, known=set())
    assert again == digest
    assert blob_key(digest) in other.objects  # its own copy, for its own writer


def test_an_array_that_is_not_lent_is_not_taken_for_one(tmp_path: Path) -> None:
    store = _open(tmp_path)
    original = _array()
    digest, stage = _staged_put(store, original)
    with store.reading(stage.objects):
        lent = np.frombuffer(store.get_private(digest), dtype=np.float64)  # type: ignore[arg-type]
    assert resident.pristine(memoryview(lent).cast("B")) is not None
    assert resident.pristine(memoryview(lent[1:]).cast("B")) is None  # not the whole of it
    assert resident.pristine(memoryview(original).cast("B")) is None
    frozen = lent.copy()
    frozen.flags.writeable = False
    assert resident.pristine(memoryview(frozen).cast("B")) is None


def test_blobs_to_copy_are_not_lent(tmp_path: Path) -> None:
    store = _open(tmp_path)
    digest, stage = _staged_put(store, _array())
    with store.reading(stage.objects, copy={blob_key(digest)}):
        assert store.get_private(digest) is None
        out = np.empty(BIG // 8)
        store.get_into(digest, out)  # still read from memory, copied
    assert np.array_equal(out, _array())


def _staged_as_copies(store: ds.Store, original: np.ndarray, value: np.ndarray) -> None:
    """``value`` (bytes equal to ``original``) staged as one copy in recycled memory, never a
    region: not lent, its own bytes however ``value`` changes, read back exactly."""
    digest, stage = _staged_put(store, value)
    assert digest == blob_digest(memoryview(original).cast("B"))
    leaves = [v for v in stage.objects.values() if isinstance(v, RawLeaf)]
    assert len(leaves) == 4 and all(leaf.region is None for leaf in leaves)
    assert all(recycled.leased(leaf.payload) for leaf in leaves)
    value[:] = 0  # the caller's buffer changes; what was staged does not
    with store.reading(stage.objects):
        assert store.get_private(digest) is None
        out = np.empty_like(original)
        store.get_into(digest, out)
    assert np.array_equal(out, original)
    store.write_staged(stage.objects)
    out = np.empty_like(original)
    store.get_into(digest, out)
    assert np.array_equal(out, original)
    assert store.verify().problems == ()


def test_beyond_the_region_limit_large_blobs_are_staged_as_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resident, "MAX_REGIONS", 0)
    original = _array()
    _staged_as_copies(_open(tmp_path), original, original.copy())


def test_an_array_loaded_then_rewritten_is_staged_as_a_copy(tmp_path: Path) -> None:
    """A recipe that rewrites what it loaded (a model in training) will likely be followed by
    one that rewrites it again: its array is copied into recycled memory, not into a region."""
    original = _array()
    loaded = empty(original.shape, original.dtype)  # as a load makes it
    loaded[:] = original
    _staged_as_copies(_open(tmp_path), original, loaded)


def test_switched_off_by_the_environment() -> None:
    code = "from dagger_store import resident; print(resident.available())"
    env = {**os.environ, "DAGGER_RESIDENT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
