"""BackendContract: the conformance suite every backend must pass.

Subclass it once per backend in a pytest module, supply a ``backend`` fixture (a fresh, empty
backend per test) and ``plant`` (write straight into the storage, not through the backend)::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path): ...
        def plant(self, backend, key, data): ...
        def age(self, backend, key, seconds): ...   # optional: see BackendContract.age

The optional capabilities (``read_into``; ``delete``, ``delete_many``, ``iter_entries`` and
``touch`` for garbage collection) are tested on every backend that offers them.

Never silence a test in a subclass; mark it ``xfail(strict=True, reason=...)`` if a backend
truly cannot pass it.

Also here, for tests and benchmarks alike (nothing of pytest in its way): ``moto_server``, a
real S3 server on 127.0.0.1 (moto's, in a subprocess) that the S3 backend reaches over HTTP, and
``fake_aws_environ``, which keeps real AWS credentials out of reach while it runs.
"""

from __future__ import annotations

import array
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dagger_store.backends.base import (
    Backend,
    Entry,
    SupportsCreate,
    SupportsDelete,
    SupportsDeleteMany,
    SupportsEntries,
    SupportsReadInto,
    SupportsTouch,
)
from dagger_store.errors import InvalidKeyError, NotFoundError, StoreError

BAD_KEYS = ["", "/abs", "a//b", "../up", "a/../b", "a/./b", ".hidden", "a/", "sp ace", "é"]


class BackendContract:
    """Behaviour every Backend must have; see ``dagger_store.backends.base``."""

    def plant(self, backend: Any, key: str, data: bytes) -> None:
        raise NotImplementedError  # write directly to the storage, NOT through the backend

    def age(self, backend: Any, key: str, seconds: float) -> bool:
        """Make ``key`` look ``seconds`` older, directly in the storage; False if impossible.

        Where it is impossible (S3 sets LastModified itself), the tests of modification times
        wait a little over a second instead (S3 times have one-second resolution).
        """
        return False

    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(backend.url, str) and backend.url

    def test_describes_itself(self, backend: Backend) -> None:
        assert type(backend.remote) is bool
        assert type(backend.trusted_by_location()) is bool
        assert list(backend.iter_keys()) == []  # asking writes nothing
        if isinstance(backend, SupportsCreate):
            backend.create()  # the location exists already: nothing to do, nothing written
            assert list(backend.iter_keys()) == []

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

    # -- capabilities for garbage collection: delete, iter_entries, touch -----------------------

    def _make_old(self, backend: Any, key: str) -> float:
        """Make ``key`` older than the returned instant, which lies in the past."""
        if self.age(backend, key, 3600):
            return time.time() - 1800
        time.sleep(1.1)
        return float(math.floor(time.time()))

    def _modified(self, backend: SupportsEntries, key: str) -> float:
        (entry,) = [e for e in backend.iter_entries(key.rsplit("/", 1)[0] + "/") if e.key == key]
        return entry.modified

    def test_delete_frees_the_key(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsDelete):
            pytest.skip("backend does not offer delete (no garbage collection there)")
        backend.write_once("d/gone", b"first")
        backend.write_once("d/kept", b"kept")
        assert backend.delete("d/gone")
        assert backend.exists_many(["d/gone", "d/kept"]) == [False, True]
        with pytest.raises(NotFoundError):
            backend.read("d/gone")
        assert set(backend.iter_keys("d/")) == {"d/kept"}
        assert not backend.delete("d/gone")
        assert not backend.delete("never/written")
        assert backend.write_once("d/gone", b"second")  # write-once starts afresh
        assert backend.read("d/gone") == b"second"
        assert backend.read("d/kept") == b"kept"

    def test_delete_only_what_is_older_than_asked(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsDelete):
            pytest.skip("backend does not offer delete (no garbage collection there)")
        backend.write_once("m/k", b"v")
        now = time.time()
        assert not backend.delete("m/k", modified_before=now - 3600)  # too new to go
        assert backend.read("m/k") == b"v"
        assert backend.delete("m/k", modified_before=now + 3600)
        assert backend.exists_many(["m/k"]) == [False]
        assert not backend.delete("m/k", modified_before=now + 3600)

    def test_entries_list_exactly_the_keys_with_sizes(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsEntries):
            pytest.skip("backend does not offer iter_entries")
        values = {"e/a": b"", "e/b/c": b"x" * 10, "e/b/d": bytes(range(256)) * 40, "top": b"t"}
        before = time.time()
        for key, value in values.items():
            backend.write_once(key, value)
        backend.write_once("top", b"a losing write changes nothing")
        after = time.time()
        entries = list(backend.iter_entries())
        assert all(isinstance(e, Entry) for e in entries)
        assert sorted((e.key, e.size) for e in entries) == sorted(
            (k, len(v)) for k, v in values.items()
        )
        for entry in entries:  # the storage's clock, at one-second resolution on S3
            assert before - 2 <= entry.modified <= after + 2, entry
        assert {e.key for e in backend.iter_entries("e/b/")} == {"e/b/c", "e/b/d"}
        assert list(backend.iter_entries("nothing/")) == []
        assert {e.key for e in entries} == set(backend.iter_keys())

    def test_touch_moves_modified_forward(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsTouch) or not isinstance(backend, SupportsEntries):
            pytest.skip("backend does not offer touch and iter_entries")
        backend.write_once("t/k", b"value")
        cutoff = self._make_old(backend, "t/k")
        assert self._modified(backend, "t/k") < cutoff
        assert backend.touch("t/k")
        assert cutoff <= self._modified(backend, "t/k") <= time.time() + 2
        assert backend.read("t/k") == b"value"
        assert not backend.write_once("t/k", b"other")
        assert backend.read("t/k") == b"value"
        assert not backend.touch("t/missing")
        assert backend.exists_many(["t/missing"]) == [False]

    def test_a_touched_key_survives_a_delete_decided_before(self, backend: Backend) -> None:
        if not isinstance(backend, SupportsTouch) or not isinstance(backend, SupportsDelete):
            pytest.skip("backend does not offer touch and delete")
        backend.write_once("g/k", b"reused")
        cutoff = self._make_old(backend, "g/k")  # a collector lists it now: older than cutoff
        assert backend.touch("g/k")  # then a writer reuses it
        assert not backend.delete("g/k", modified_before=cutoff)
        assert backend.read("g/k") == b"reused"

    @pytest.mark.parametrize("key", ["", "../up", "a//b", ".hidden", "a/"])
    def test_capabilities_refuse_bad_keys(self, backend: Backend, key: str) -> None:
        if isinstance(backend, SupportsDelete):
            with pytest.raises(InvalidKeyError):
                backend.delete(key)
            with pytest.raises(InvalidKeyError):
                backend.delete(key, modified_before=time.time() + 3600)
        if isinstance(backend, SupportsTouch):
            with pytest.raises(InvalidKeyError):
                backend.touch(key)

    # -- batched deletes (SupportsDeleteMany) ----------------------------------------------------

    def _deletes_many(self, backend: Backend) -> SupportsDeleteMany:
        if not isinstance(backend, SupportsDeleteMany):
            pytest.skip("backend does not offer delete_many (gc deletes key by key there)")
        return backend

    def test_delete_many_says_what_it_removed_in_order(self, backend: Backend) -> None:
        many = self._deletes_many(backend)
        for key in ("b/1", "b/2", "b/3"):
            backend.write_once(key, b"v")
        assert many.delete_many(["b/3", "b/none", "b/1", "b/3"]) == [True, False, True, False]
        assert backend.exists_many(["b/1", "b/2", "b/3"]) == [False, True, False]
        assert set(backend.iter_keys("b/")) == {"b/2"}
        assert many.delete_many([]) == []
        assert many.delete_many(["b/1"]) == [False]
        assert backend.write_once("b/1", b"again")  # write-once starts afresh
        assert backend.read("b/1") == b"again"

    def test_delete_many_only_what_is_older_than_asked(self, backend: Backend) -> None:
        many = self._deletes_many(backend)
        keys = ["o/a", "o/b/c", "o/d"]
        for key in keys:
            backend.write_once(key, key.encode())
        now = time.time()
        assert many.delete_many(keys, modified_before=now - 3600) == [False] * 3  # too new
        assert backend.exists_many(keys) == [True] * 3
        later = now + 3600
        assert many.delete_many([*keys, "o/none"], modified_before=later) == [True] * 3 + [False]
        assert list(backend.iter_keys("o/")) == []

    def test_delete_many_spares_what_was_touched_since(self, backend: Backend) -> None:
        many = self._deletes_many(backend)
        if not isinstance(backend, SupportsTouch):
            pytest.skip("backend does not offer touch")
        backend.write_once("g/old", b"garbage")
        backend.write_once("g/reused", b"reused")
        # A collector lists both now, older than cutoff; then a writer reuses one.
        if self.age(backend, "g/old", 3600) and self.age(backend, "g/reused", 3600):
            cutoff = time.time() - 1800
        else:
            time.sleep(1.1)
            cutoff = float(math.floor(time.time()))
        assert backend.touch("g/reused")
        assert many.delete_many(["g/old", "g/reused"], modified_before=cutoff) == [True, False]
        assert backend.read("g/reused") == b"reused"
        assert backend.exists_many(["g/old"]) == [False]

    def test_delete_many_answers_for_many_keys(self, backend: Backend) -> None:
        many = self._deletes_many(backend)
        keys = [f"n/{i % 3}/{i:03d}" for i in range(150)]
        for key in keys[::2]:
            backend.write_once(key, b"v")
        later = time.time() + 3600
        assert many.delete_many(keys, modified_before=later) == [i % 2 == 0 for i in range(150)]
        assert list(backend.iter_keys("n/")) == []

    @pytest.mark.parametrize("key", ["", "../up", "a//b", ".hidden", "a/"])
    def test_delete_many_refuses_bad_keys_before_io(self, backend: Backend, key: str) -> None:
        many = self._deletes_many(backend)
        backend.write_once("ok", b"v")
        with pytest.raises(InvalidKeyError):
            many.delete_many(["ok", key])
        with pytest.raises(InvalidKeyError):
            many.delete_many(["ok", key], modified_before=time.time() + 3600)
        assert backend.exists_many(["ok"]) == [True]


# -- a real S3 server on loopback ------------------------------------------------------------------

# What moto accepts: no real account is ever reached with these.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would take botocore to a real profile, session or endpoint instead.
REAL_AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
MOTO_STARTUP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class MotoServer:
    """A running moto S3 server: where it listens, its process id, and its log file."""

    endpoint: str
    pid: int
    log: Path

    @property
    def storage_options(self) -> dict[str, Any]:
        """``open_store``'s storage_options for this server, with the fake credentials."""
        return {
            "endpoint_url": self.endpoint,
            "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def fake_aws_environ() -> Iterator[None]:
    """``os.environ`` with the fake credentials and without ``REAL_AWS_VARIABLES``, restored
    on exit: clients made meanwhile can never use a real account."""
    saved = {name: os.environ.get(name) for name in (*FAKE_CREDENTIALS, *REAL_AWS_VARIABLES)}
    try:
        for name in REAL_AWS_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(FAKE_CREDENTIALS)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# moto's FakeKey computes its ETag lazily, reading the key's shared buffer without the key's
# lock; a copy of that key at the same moment (a touch is a copy onto itself) then reads the
# buffer from its end and stores an EMPTY object. Real S3 has no such race, so the server we test
# against must not either: moto_server runs with the ETag read under the lock.
_MOTO_WITH_LOCKED_ETAGS = """
import sys
try:
    from moto.s3 import models
    from moto.server import main
except ImportError as exc:
    sys.exit(f"moto_server needs the test extra (pip install 'moto[server]'): {exc}")
unlocked = models.FakeKey.etag.fget
def etag(key):
    with key.lock:
        return unlocked(key)
models.FakeKey.etag = property(etag)
sys.exit(main())
"""


@contextmanager
def moto_server(log_dir: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[MotoServer]:
    """Run moto's S3 server (``moto[server]``, with its ETag race closed) on 127.0.0.1.

    It accepts any credentials (``FAKE_CREDENTIALS`` are in its environment, and nothing of
    ``REAL_AWS_VARIABLES``) unless ``extra_env`` says otherwise (``INITIAL_NO_AUTH_ACTION_COUNT=0``
    makes it check them: every request is then refused). It logs every request to a file in
    ``log_dir``, not a pipe, which a full buffer would block. Stopped on exit.

    Raises
    ------
    RuntimeError
        The server did not answer within ``MOTO_STARTUP_TIMEOUT`` seconds or exited; the
        message holds its log.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = Path(log_dir) / f"moto-{port}.log"
    env = {k: v for k, v in os.environ.items() if k not in REAL_AWS_VARIABLES}
    env.update(FAKE_CREDENTIALS)
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _MOTO_WITH_LOCKED_ETAGS, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_for(process, endpoint, log_path)
        yield MotoServer(endpoint, process.pid, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for(process: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> None:
    deadline = time.monotonic() + MOTO_STARTUP_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            state = (
                f"exited with {process.returncode}"
                if process.poll() is not None
                else f"did not answer within {MOTO_STARTUP_TIMEOUT:.0f} s"
            )
            raise RuntimeError(
                f"moto_server on {endpoint} {state}; its output ({log_path}):\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.05)
