"""Shared by the tests that prove the backend test kit catches broken backends.

test_backends.py and test_delete_many.py each list broken MemoryBackend subclasses with the
contract test that must fail on them; the contract class and the checks live here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from dagger_store.backends.memory import MemoryBackend
from dagger_store.testing import BackendContract

# A broken backend class and the contract test that must fail on an instance of it.
BrokenCase = tuple[type[MemoryBackend], Callable[[BackendContract, Any], None]]


class MemoryContract(BackendContract):
    """The contract on memory backends (not collected: no Test prefix)."""

    def plant(self, backend: MemoryBackend, key: str, data: bytes) -> None:
        backend._values[key] = data
        backend._modified[key] = time.time()

    def age(self, backend: MemoryBackend, key: str, seconds: float) -> bool:
        backend._modified[key] -= seconds
        return True


def parametrize_broken(cases: list[BrokenCase]) -> pytest.MarkDecorator:
    """One test per case, named after the broken class and the contract test (a partial has no
    name: the only partials bind bad keys)."""
    return pytest.mark.parametrize(
        "case",
        cases,
        ids=[f"{cls.__name__}-{getattr(test, '__name__', 'bad_keys')}" for cls, test in cases],
    )


def assert_contract_catches(case: BrokenCase) -> None:
    broken, contract_test = case
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        contract_test(MemoryContract(), broken())


def assert_reference_passes(cases: list[BrokenCase]) -> None:
    """Each contract test used above passes on the real MemoryBackend, so a failure on a broken
    one is the breakage, not the test."""
    for _, contract_test in cases:
        contract_test(MemoryContract(), MemoryBackend())
