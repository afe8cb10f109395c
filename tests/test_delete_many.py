"""Batched deletes (SupportsDeleteMany): the test kit against broken ones, and S3's batches."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from broken_backends import (
    BrokenCase,
    assert_contract_catches,
    assert_reference_passes,
    parametrize_broken,
)
from s3_requests import S3Requests

from dagger_store.backends.base import SupportsDeleteMany
from dagger_store.backends.cached import CachedBackend
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.memory import MemoryBackend
from dagger_store.backends.s3 import LIST_ABOVE, S3Backend, open_s3_backend
from dagger_store.testing import BackendContract


@pytest.mark.parametrize("cls", [MemoryBackend, S3Backend, CachedBackend])
def test_backends_with_batched_deletes(cls: type) -> None:
    assert issubclass(cls, SupportsDeleteMany)


def test_a_folder_deletes_key_by_key() -> None:
    # No batched delete on a file system: gc's per-key deletes on the store's pool are faster.
    assert not issubclass(LocalBackend, SupportsDeleteMany)


# -- the test kit must catch broken batched deletes ----------------------------------------------


class _HastyBatches(MemoryBackend):
    """Broken: delete_many ignores modified_before (a collector would take what was reused)."""

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        return super().delete_many(keys)


class _BoastfulBatches(MemoryBackend):
    """Broken: delete_many says every key was removed, as S3's DeleteObjects would."""

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        super().delete_many(keys, modified_before=modified_before)
        return [True] * len(keys)


class _SortedBatches(MemoryBackend):
    """Broken: delete_many answers in key order, not in the order asked."""

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        return super().delete_many(sorted(keys), modified_before=modified_before)


class _CarelessBatches(MemoryBackend):
    """Broken: deletes the good keys before it finds the bad one."""

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        return [self.delete(key, modified_before=modified_before) for key in keys]


BROKEN: list[BrokenCase] = [
    (_HastyBatches, BackendContract.test_delete_many_only_what_is_older_than_asked),
    (_HastyBatches, BackendContract.test_delete_many_spares_what_was_touched_since),
    (_BoastfulBatches, BackendContract.test_delete_many_says_what_it_removed_in_order),
    (_BoastfulBatches, BackendContract.test_delete_many_answers_for_many_keys),
    (_SortedBatches, BackendContract.test_delete_many_says_what_it_removed_in_order),
    (_CarelessBatches,
     partial(BackendContract.test_delete_many_refuses_bad_keys_before_io, key="../up")),
]  # fmt: skip


@parametrize_broken(BROKEN)
def test_contract_catches_broken_batched_deletes(case: BrokenCase) -> None:
    assert_contract_catches(case)


def test_contract_passes_the_reference_batched_delete() -> None:
    assert_reference_passes(BROKEN)


# -- S3: a listing or HEADs to check ages, then one DeleteObjects per batch ----------------------


@pytest.fixture
def s3(s3_url: str, s3_storage_options: dict[str, Any]) -> S3Backend:
    return open_s3_backend(s3_url, s3_storage_options)


@pytest.fixture
def requests(s3: S3Backend) -> Iterator[S3Requests]:
    counted = S3Requests(s3)
    yield counted
    counted.close()


def write(backend: S3Backend, keys: Sequence[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(lambda k: backend.write_once(k, k.encode()), keys))


def old_enough() -> float:
    """A cutoff that what was written before this call is older than (S3 times are whole
    seconds)."""
    time.sleep(1.1)
    return float(math.floor(time.time()))


def test_s3_lists_a_dense_batch_heads_a_small_one_and_deletes_each_in_one_request(
    s3: S3Backend, requests: S3Requests, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"d/{i:03d}" for i in range(250)]
    write(s3, keys)
    cutoff = old_enough()
    assert s3.touch("d/042")  # a writer reuses one after the collector decided
    monkeypatch.setattr(s3, "delete_batch_size", 100)
    asked = [*keys[::2], "d/none"]  # 125 that exist, in two batches (100 and 26 keys)
    requests.made.clear()
    expected = [k != "d/042" for k in keys[::2]] + [False]
    assert s3.delete_many(asked, modified_before=cutoff) == expected
    # The first batch (>= LIST_ABOVE keys, in one LIST page) is checked by listing, the
    # second by HEADs; each is then one DeleteObjects of the keys still old enough.
    assert 26 < LIST_ABOVE <= 100
    assert requests.made == {"ListObjectsV2": 1, "HeadObject": 26, "DeleteObjects": 2}
    assert requests.deleted == [99, 25]
    assert set(s3.iter_keys("d/")) == set(keys[1::2]) | {"d/042"}
    assert s3.read("d/042") == b"d/042"


def test_s3_heads_what_a_listing_within_its_budget_does_not_reach(
    s3: S3Backend, requests: S3Requests, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"s/{i:03d}" for i in range(120)]
    write(s3, keys)
    monkeypatch.setattr(s3, "list_page_size", 10)  # one page (the budget) reaches 10 keys
    requests.made.clear()
    assert s3.delete_many(keys, modified_before=time.time() + 3600) == [True] * 120
    assert requests.made == {"ListObjectsV2": 1, "HeadObject": 110, "DeleteObjects": 1}
    assert requests.deleted == [120]
    assert list(s3.iter_keys("s/")) == []


def test_s3_deletes_more_than_a_request_holds_in_several(
    s3: S3Backend, requests: S3Requests
) -> None:
    keys = [f"m/{i:04d}" for i in range(1_100)]
    write(s3, keys)
    requests.made.clear()
    assert s3.delete_many(keys, modified_before=time.time() + 3600) == [True] * 1_100
    assert requests.deleted == [1_000, 100]  # S3 takes at most 1,000 keys a request
    assert "DeleteObject" not in requests.made and "HeadObject" not in requests.made
    assert list(s3.iter_keys("m/")) == []
