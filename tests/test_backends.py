"""Every backend against the one contract, the test kit against broken backends, S3 details."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import s3fs

from dagger_store.backends.base import Buffer
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.memory import MemoryBackend
from dagger_store.backends.s3 import MAX_IN_FLIGHT, S3Backend, open_s3_backend
from dagger_store.errors import BackendError, NotFoundError, StoreOpenError
from dagger_store.testing import BackendContract

SECRET_OPTIONS = {"key": "AKIADAGGERKEYID", "secret": "dagger-secret-never-print-me"}


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()

    def plant(self, backend: MemoryBackend, key: str, data: bytes) -> None:
        backend._values[key] = data


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend(tmp_path)

    def plant(self, backend: LocalBackend, key: str, data: bytes) -> None:
        path = backend.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class TestS3Backend(BackendContract):
    @pytest.fixture
    def backend(self, s3_url: str, s3_storage_options: dict[str, Any], s3_client: Any) -> S3Backend:
        self.client = s3_client
        return open_s3_backend(s3_url, s3_storage_options)

    def plant(self, backend: S3Backend, key: str, data: bytes) -> None:
        bucket, _, prefix = backend.root.partition("/")
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

    def test_iter_keys_skips_placeholders_and_other_prefixes(self, backend: S3Backend) -> None:
        bucket, _, prefix = backend.root.partition("/")
        self.plant(backend, "a/real", b"v")
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/a/", Body=b"")  # console "folder"
        self.client.put_object(Bucket=bucket, Key=f"{prefix}-sibling/x", Body=b"v")
        self.client.put_object(Bucket=bucket, Key="outside", Body=b"v")
        assert list(backend.iter_keys()) == ["a/real"]

    def test_iter_keys_pages_through_long_listings(
        self, backend: S3Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        keys = {f"p/{i:02d}" for i in range(23)}
        for key in keys:
            self.plant(backend, key, b"")
        monkeypatch.setattr(backend, "list_page_size", 5)  # S3 pages hold 1000: test with fewer
        listed = list(backend.iter_keys("p/"))
        assert sorted(listed) == sorted(keys) and len(listed) == len(keys)

    def test_read_into_past_the_end_reads_nothing(self, backend: S3Backend) -> None:
        backend.write_once("r", b"0123456789")
        backend.write_once("empty", b"")
        out = memoryview(bytearray(4))
        assert backend.read_into("r", 10, out) == 0
        assert backend.read_into("empty", 0, out) == 0
        assert backend.read_into("r", 3, out[:0]) == 0
        with pytest.raises(NotFoundError):
            backend.read_into("missing", 0, out[:0])

    def test_exists_many_is_one_concurrent_round(
        self, backend: S3Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        keys = [f"c/{i:03d}" for i in range(300)]
        for key in keys[::3]:
            self.plant(backend, key, b"v")
        monkeypatch.setattr(backend, "list_page_size", 5)  # 100 keys: too many pages to list
        requests = _Requests.count(backend, monkeypatch)
        assert backend.exists_many(keys) == [i % 3 == 0 for i in range(300)]
        # One listing page shows the folder is too big to list within budget; then HEADs only,
        # never a LIST per miss as fs.exists would do.
        assert requests.made == {"list_objects_v2": 1, "head_object": 300}
        assert 1 < requests.peak <= MAX_IN_FLIGHT
        assert requests.peak >= MAX_IN_FLIGHT // 2, f"only {requests.peak} HEADs at once"

    def test_a_large_batch_in_a_small_folder_is_one_listing(
        self, backend: S3Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        keys = [f"v1/manifests/{i % 7:02x}/{i:04d}" for i in range(300)]
        for key in keys[::3]:
            self.plant(backend, key, b"v")
        self.plant(backend, "v1/blobs/aa/other-namespace", b"v")
        requests = _Requests.count(backend, monkeypatch)
        assert backend.exists_many(keys) == [i % 3 == 0 for i in range(300)]
        assert requests.made == {"list_objects_v2": 1}
        assert backend.exists_many(keys[:99]) == [i % 3 == 0 for i in range(99)]  # small: HEADs
        assert requests.made == {"list_objects_v2": 1, "head_object": 99}

    def test_each_call_is_one_request(
        self, backend: S3Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.plant(backend, "k", b"0123456789")
        requests = _Requests.count(backend, monkeypatch)
        assert backend.read("k") == b"0123456789"
        assert requests.made == {"get_object": 1}  # s3fs would HEAD for the size first
        assert backend.read_into("k", 2, memoryview(bytearray(3))) == 3
        assert requests.made == {"get_object": 2}
        assert not backend.write_once("k", b"other")
        assert backend.write_once("new", b"v")
        assert requests.made == {"get_object": 2, "put_object": 2}  # no HEAD before a PUT

    def test_deleted_bucket_is_an_error_not_a_miss(self, backend: S3Backend) -> None:
        self.client.delete_bucket(Bucket=backend.root.partition("/")[0])
        with pytest.raises(BackendError, match="does not exist"):
            backend.read("k")
        with pytest.raises(BackendError, match="does not exist"):
            backend.write_once("k", b"v")


class _Requests:
    """Counts the requests s3fs makes, and the most in flight at once, around its ``_call_s3``.

    Our own instrumentation, not a mock: every request still goes to the moto server.
    """

    def __init__(self) -> None:
        self.made: Counter[str] = Counter()
        self.in_flight = self.peak = 0

    @classmethod
    def count(cls, backend: S3Backend, monkeypatch: pytest.MonkeyPatch) -> _Requests:
        requests = cls()
        call_s3 = backend.fs._call_s3

        async def counting_call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
            requests.made[method] += 1
            requests.in_flight += 1
            requests.peak = max(requests.peak, requests.in_flight)
            try:
                return await call_s3(method, *args, **kwargs)
            finally:
                requests.in_flight -= 1

        monkeypatch.setattr(backend.fs, "_call_s3", counting_call_s3)
        return requests


# --- the test kit must catch broken backends --------------------------------------------------


class _OverwritingBackend(MemoryBackend):
    """Broken: the last writer wins and every writer believes it created the key."""

    def write_once(self, key: str, *parts: Buffer) -> bool:
        with self._lock:
            self._values[key] = b"".join(parts)
        return True


class _ForgetfulBackend(MemoryBackend):
    """Broken: exists_many answers for the distinct keys, sorted, instead of in order."""

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return super().exists_many(sorted(set(keys)))


class _LaxBackend(MemoryBackend):
    """Broken: writes under any string, without checking the key."""

    def write_once(self, key: str, *parts: Buffer) -> bool:
        with self._lock:
            if key in self._values:
                return False
            self._values[key] = b"".join(parts)
            return True


class _PlaceholderBackend(MemoryBackend):
    """Broken: lists a directory placeholder next to the real keys."""

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        yield from super().iter_keys(prefix)
        yield "v1/"


BROKEN: list[tuple[type[MemoryBackend], Callable[[BackendContract, Any], None]]] = [
    (_OverwritingBackend, BackendContract.test_write_once_keeps_first_value),
    (_OverwritingBackend, BackendContract.test_reads_what_was_planted),
    (_OverwritingBackend, BackendContract.test_concurrent_writers_one_winner),
    (_ForgetfulBackend, BackendContract.test_exists_many_keeps_order),
    (_PlaceholderBackend, BackendContract.test_iter_keys_lists_exactly_what_was_written),
    (_LaxBackend, partial(BackendContract.test_bad_keys_are_refused_before_io, key="../up")),
]


@pytest.mark.parametrize(
    ("broken", "contract_test"),
    BROKEN,
    ids=[f"{cls.__name__}-{getattr(test, '__name__', 'bad_keys')}" for cls, test in BROKEN],
)
def test_contract_catches_broken_backend(
    broken: type[MemoryBackend], contract_test: Callable[[BackendContract, Any], None]
) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        contract_test(TestMemoryBackend(), broken())


def test_contract_passes_the_reference_backend() -> None:
    for _, contract_test in BROKEN:
        contract_test(TestMemoryBackend(), MemoryBackend())


# --- opening S3 stores -------------------------------------------------------------------------


def _assert_no_secret(error: BaseException) -> None:
    for value in SECRET_OPTIONS.values():
        assert value not in str(error)
        assert value not in getattr(error, "url", "")


def test_open_missing_bucket(s3_endpoint: str) -> None:
    url = "s3://dagger-no-such-bucket/store"
    with pytest.raises(StoreOpenError) as info:
        open_s3_backend(url, {"endpoint_url": s3_endpoint, **SECRET_OPTIONS})
    message = str(info.value)
    assert "'dagger-no-such-bucket' does not exist" in message
    assert s3_endpoint in message and "create it" in message
    assert info.value.url == url
    _assert_no_secret(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://ab",
        "s3://Upper-Case",
        "s3://under_score",
        "s3://-leading-dash",
        "s3://trailing-dot.",
        "s3://two..dots",
        "s3://192.168.1.20",
        "s3://" + "x" * 64,
        "s3://good-bucket/../escape",
        "s3://good-bucket//double",
        "gs://good-bucket",
        "s3://",
    ],
)
def test_open_refuses_malformed_urls_before_any_request(url: str, closed_endpoint: str) -> None:
    with pytest.raises(StoreOpenError) as info:  # the endpoint is closed: no request was made
        open_s3_backend(url, {"endpoint_url": closed_endpoint, **SECRET_OPTIONS})
    assert info.value.url == url
    assert "bucket" in str(info.value) or "prefix" in str(info.value)


def test_open_refuses_credentials_in_the_url() -> None:
    url = f"s3://{SECRET_OPTIONS['key']}:{SECRET_OPTIONS['secret']}@good-bucket/store"
    with pytest.raises(StoreOpenError, match="storage_options") as info:
        open_s3_backend(url, {})
    _assert_no_secret(info.value)


def test_open_unreachable_endpoint(closed_endpoint: str) -> None:
    # One attempt: botocore's default retries turn a refused connection into ~3 s of waiting.
    retries = {"retries": {"total_max_attempts": 1}}
    options = {"endpoint_url": closed_endpoint, "config_kwargs": retries}
    with pytest.raises(StoreOpenError) as info:
        open_s3_backend("s3://some-bucket", {**options, **SECRET_OPTIONS})
    message = str(info.value)
    assert "cannot reach" in message and closed_endpoint in message and "endpoint_url" in message
    _assert_no_secret(info.value)


def test_open_refused_credentials(s3_strict_endpoint: str) -> None:
    with pytest.raises(StoreOpenError) as info:
        open_s3_backend("s3://some-bucket", {"endpoint_url": s3_strict_endpoint, **SECRET_OPTIONS})
    message = str(info.value)
    assert "refused the credentials" in message and "check" in message
    _assert_no_secret(info.value)


def test_open_keeps_the_prefix(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    backend = open_s3_backend(f"s3://{s3_bucket}/deep/store/", s3_storage_options)
    assert backend.url == f"s3://{s3_bucket}/deep/store"
    assert backend.write_once("k", b"v")
    top = open_s3_backend(f"s3://{s3_bucket}", s3_storage_options)
    assert list(top.iter_keys()) == ["deep/store/k"]


def test_forbidden_is_an_error_not_a_miss(s3_strict_endpoint: str) -> None:
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_strict_endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
        **SECRET_OPTIONS,
    )
    backend = S3Backend(fs, "some-bucket/store")
    for call in (
        lambda: backend.exists_many(["a", "b"]),
        lambda: backend.read("a"),
        lambda: backend.write_once("a", b"v"),
        lambda: list(backend.iter_keys()),
    ):
        with pytest.raises(BackendError) as info:
            call()
        assert "check the credentials" in str(info.value)
        assert isinstance(info.value, OSError)
        _assert_no_secret(info.value)
