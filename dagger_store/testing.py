"""BackendContract: the conformance suite every backend must pass.

Subclass it once per backend in a pytest module, supply a ``backend`` fixture (a fresh, empty
backend per test) and ``plant`` (write straight into the storage, not through the backend)::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path): ...
        def plant(self, backend, key, data): ...

Never silence a test in a subclass; mark it ``xfail(strict=True, reason=...)`` if a backend
truly cannot pass it.
"""

from __future__ import annotations

import array
import threading
from typing import Any

import pytest

from dagger_store.backends.base import Backend, SupportsReadInto
from dagger_store.errors import InvalidKeyError, NotFoundError, StoreError

BAD_KEYS = ["", "/abs", "a//b", "../up", "a/../b", "a/./b", ".hidden", "a/", "sp ace", "é"]


class BackendContract:
    """Behaviour every Backend must have; see ``dagger_store.backends.base``."""

    def plant(self, backend: Any, key: str, data: bytes) -> None:
        raise NotImplementedError  # write directly to the storage, NOT through the backend

    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(backend.url, str) and backend.url

    def test_write_once_keeps_first_value(self, backend: Backend) -> None:
        assert backend.write_once("k", b"first")
        assert not backend.write_once("k", b"second")
        assert backend.read("k") == b"first"

    def test_read_missing_is_not_found(self, backend: Backend) -> None:
        with pytest.raises(NotFoundError) as info:
            backend.read("no/such/key")
        assert isinstance(info.value, LookupError)
        assert info.value.key == "no/such/key"

    def test_parts_are_concatenated(self, backend: Backend) -> None:
        doubles = memoryview(array.array("d", [1.5, -2.25]))  # a non-byte buffer format
        assert backend.write_once("a/b", b"head:", bytearray(b"mid:"), doubles)
        assert backend.read("a/b") == b"head:mid:" + doubles.tobytes()

    def test_empty_and_binary_values_round_trip(self, backend: Backend) -> None:
        every_byte = bytes(range(256)) * 4
        assert backend.write_once("empty", b"")
        assert backend.write_once("bin", every_byte)
        assert backend.read("empty") == b""
        assert backend.read("bin") == every_byte

    def test_large_value_round_trips(self, backend: Backend) -> None:
        data = bytes(range(251)) * (3 * 2**20 // 251)
        assert backend.write_once("big", memoryview(data))
        assert backend.read("big") == data

    def test_reads_what_was_planted(self, backend: Backend) -> None:
        self.plant(backend, "x/planted", b"from outside")
        assert backend.read("x/planted") == b"from outside"
        assert backend.exists_many(["x/planted"]) == [True]
        assert not backend.write_once("x/planted", b"overwrite?")
        assert backend.read("x/planted") == b"from outside"

    def test_exists_many_keeps_order(self, backend: Backend) -> None:
        for key in ("p/1", "p/3"):
            backend.write_once(key, b"v")
        assert backend.exists_many(["p/1", "p/2", "p/3", "p/1"]) == [True, False, True, True]
        assert backend.exists_many([]) == []

    def test_exists_many_answers_for_many_keys(self, backend: Backend) -> None:
        keys = [f"many/{i:03d}" for i in range(120)]
        for key in keys[::2]:
            backend.write_once(key, b"v")
        assert backend.exists_many(keys) == [i % 2 == 0 for i in range(120)]

    def test_iter_keys_lists_exactly_what_was_written(self, backend: Backend) -> None:
        written = {"v1/blobs/aa/aa01", "v1/blobs/bb/bb02", "v1/manifests/cc/cc03", "top"}
        for key in written:
            backend.write_once(key, b"v")
        backend.write_once("top", b"again")  # a losing write leaves nothing behind
        assert set(backend.iter_keys()) == written
        assert set(backend.iter_keys("v1/blobs/")) == {"v1/blobs/aa/aa01", "v1/blobs/bb/bb02"}
        assert set(backend.iter_keys("v1/manifests/cc/")) == {"v1/manifests/cc/cc03"}
        assert set(backend.iter_keys("nothing/")) == set()

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_are_refused_before_io(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            backend.write_once(key, b"v")
        with pytest.raises(InvalidKeyError):
            backend.read(key)
        with pytest.raises(InvalidKeyError):
            backend.exists_many(["fine", key])
        assert list(backend.iter_keys()) == []

    def test_concurrent_writers_one_winner(self, backend: Backend) -> None:
        results: list[bool] = []
        barrier = threading.Barrier(8)

        def race(i: int) -> None:
            barrier.wait()
            results.append(backend.write_once("race", f"writer {i}".encode() * 1000))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
        value = backend.read("race")
        assert value in {f"writer {i}".encode() * 1000 for i in range(8)}

    def test_read_into_fills_from_offset(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsReadInto):
            pytest.skip("backend does not offer read_into; Store falls back to read")
        backend.write_once("r", bytes(range(100)))
        out = bytearray(10)
        assert backend.read_into("r", 20, memoryview(out)) == 10
        assert out == bytes(range(20, 30))
        tail = bytearray(10)
        assert backend.read_into("r", 95, memoryview(tail)) == 5
        assert tail[:5] == bytes(range(95, 100))
        with pytest.raises(NotFoundError):
            backend.read_into("missing", 0, memoryview(bytearray(1)))

    def test_errors_belong_to_the_tree(self, backend: Backend) -> None:
        for key in ("nope", "../x"):
            with pytest.raises(StoreError):
                backend.read(key)
