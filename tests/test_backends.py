"""Every backend against the one contract, the test kit against broken backends, S3 details."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import s3fs
from broken_backends import (
    BrokenCase,
    MemoryContract,
    assert_contract_catches,
    assert_reference_passes,
    parametrize_broken,
)

from dagger_store.backends import local
from dagger_store.backends.base import (
    Buffer,
    Entry,
    SupportsDelete,
    SupportsEntries,
    SupportsScratch,
    SupportsTouch,
)
from dagger_store.backends.cached import CachedBackend
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.memory import MemoryBackend
from dagger_store.backends.s3 import MAX_IN_FLIGHT, S3Backend, open_s3_backend
from dagger_store.errors import BackendError, InvalidKeyError, NotFoundError, StoreOpenError
from dagger_store.testing import BackendContract, moto_server

SECRET_OPTIONS = {"key": "AKIADAGGERKEYID", "secret": "dagger-secret-never-print-me"}


class TestMemoryBackend(MemoryContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend(tmp_path)

    def plant(self, backend: LocalBackend, key: str, data: bytes) -> None:
        path = backend.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def age(self, backend: LocalBackend, key: str, seconds: float) -> bool:
        info = (backend.root / key).stat()
        os.utime(backend.root / key, (info.st_atime, info.st_mtime - seconds))
        return True

    def test_touch_refreshes_another_users_object_by_an_equal_copy(
        self, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend.write_once("o/theirs", b"their value")
        self.age(backend, "o/theirs", 3600)
        before = (backend.root / "o/theirs").stat()

        def refused(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(1, "Operation not permitted")  # as for a non-owner

        monkeypatch.setattr(local.os, "utime", refused)
        assert backend.touch("o/theirs")
        after = (backend.root / "o/theirs").stat()
        assert after.st_mtime > before.st_mtime + 3000 and after.st_ino != before.st_ino
        assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)  # read-only still
        assert backend.read("o/theirs") == b"their value"
        assert list(backend.iter_scratch()) == []  # no temp file left behind
        assert not backend.touch("o/missing")

    def test_delete_puts_back_a_file_touched_while_it_was_judged(
        self, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend.write_once("j/k", b"reused")
        self.age(backend, "j/k", 3600)
        rename = os.rename

        def touched_just_before(src: Any, dst: Any) -> None:
            backend.touch("j/k")  # a writer reuses it between the age check and the rename
            rename(src, dst)

        monkeypatch.setattr(local.os, "rename", touched_just_before)
        assert not backend.delete("j/k", modified_before=time.time() - 1800)
        monkeypatch.undo()
        assert backend.read("j/k") == b"reused"
        assert list(backend.iter_scratch()) == []
        self.age(backend, "j/k", 3600)
        assert backend.delete("j/k", modified_before=time.time() - 1800)
        assert backend.exists_many(["j/k"]) == [False] and list(backend.iter_scratch()) == []

    def test_is_local_and_trusted_when_mine(self, backend: LocalBackend, tmp_path: Path) -> None:
        assert not backend.remote and backend.trusted_by_location()  # a folder I made
        missing = LocalBackend(tmp_path / "missing")
        assert not missing.trusted_by_location()  # nothing there to vouch for it
        missing.create()
        assert missing.trusted_by_location() and (tmp_path / "missing").is_dir()
        (tmp_path / "a-file").write_text("x")
        with pytest.raises(StoreOpenError, match="not a folder"):
            LocalBackend(tmp_path / "a-file").create()
        with pytest.raises(StoreOpenError, match="cannot create"):
            LocalBackend(tmp_path / "a-file" / "below").create()

    def test_scratch_lists_and_removes_stale_temp_files_only(self, backend: LocalBackend) -> None:
        backend.write_once("k", b"v")
        assert list(backend.iter_scratch()) == []
        tmp = backend.root / ".tmp"
        (tmp / "tmp-old").write_bytes(b"x" * 10)
        (tmp / "tmp-new").write_bytes(b"y")
        os.utime(tmp / "tmp-old", (0, time.time() - 7200))
        entries = {e.key: e for e in backend.iter_scratch()}
        assert {k: e.size for k, e in entries.items()} == {".tmp/tmp-old": 10, ".tmp/tmp-new": 1}
        cutoff = time.time() - 3600
        assert backend.delete_scratch(".tmp/tmp-old", modified_before=cutoff)
        assert not backend.delete_scratch(".tmp/tmp-new", modified_before=cutoff)
        assert not backend.delete_scratch(".tmp/tmp-old", modified_before=cutoff)
        assert [e.key for e in backend.iter_scratch()] == [".tmp/tmp-new"]
        assert list(backend.iter_keys()) == ["k"]  # scratch is never a key
        for name in ("k", ".tmp", ".tmp/../k", ".tmp/a/b", "v1/.tmp/x"):
            with pytest.raises(InvalidKeyError):
                backend.delete_scratch(name, modified_before=cutoff)


class _FarBackend(MemoryBackend):
    """Memory that calls itself remote and untrusted, as an S3 origin would."""

    remote = True

    def trusted_by_location(self) -> bool:
        return False


class TestCachedBackend(BackendContract):
    """A remote (a memory backend here) with a read-through local copy."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> CachedBackend:
        return CachedBackend(MemoryBackend("memory://remote"), LocalBackend(tmp_path))

    def plant(self, backend: CachedBackend, key: str, data: bytes) -> None:
        assert isinstance(backend.origin, MemoryBackend)
        TestMemoryBackend().plant(backend.origin, key, data)

    def age(self, backend: CachedBackend, key: str, seconds: float) -> bool:
        assert isinstance(backend.origin, MemoryBackend)
        return TestMemoryBackend().age(backend.origin, key, seconds)

    def test_describes_itself_as_its_origin(self, backend: CachedBackend, tmp_path: Path) -> None:
        assert (backend.remote, backend.trusted_by_location()) == (False, True)  # memory's
        far = CachedBackend(_FarBackend("memory://far"), LocalBackend(tmp_path / "c"))
        assert (far.remote, far.trusted_by_location()) == (True, False)

    def test_delete_removes_the_cached_copy_too(self, backend: CachedBackend) -> None:
        backend.write_once("c/k", b"v")
        assert backend.read("c/k") == b"v"
        assert backend.cache.exists_many(["c/k"]) == [True]
        assert backend.delete("c/k")
        assert backend.cache.exists_many(["c/k"]) == [False]
        with pytest.raises(NotFoundError):
            backend.read("c/k")

    def test_ages_and_touches_are_the_remotes(self, backend: CachedBackend) -> None:
        backend.write_once("c/k", b"v")
        self.age(backend, "c/k", 3600)
        assert [e.modified < time.time() - 3000 for e in backend.iter_entries()] == [True]
        assert backend.touch("c/k")
        assert [e.modified > time.time() - 60 for e in backend.iter_entries()] == [True]
        origin = backend.origin
        assert isinstance(origin, MemoryBackend)
        assert list(backend.iter_entries()) == list(origin.iter_entries())


@pytest.mark.parametrize("cls", [MemoryBackend, LocalBackend, S3Backend, CachedBackend])
def test_every_backend_can_be_garbage_collected(cls: type) -> None:
    for capability in (SupportsDelete, SupportsEntries, SupportsTouch):
        assert issubclass(cls, capability), (cls, capability)
    assert issubclass(LocalBackend, SupportsScratch)


class TestS3Backend(BackendContract):
    @pytest.fixture
    def backend(self, s3_url: str, s3_storage_options: dict[str, Any], s3_client: Any) -> S3Backend:
        self.client = s3_client
        return open_s3_backend(s3_url, s3_storage_options)

    def plant(self, backend: S3Backend, key: str, data: bytes) -> None:
        bucket, _, prefix = backend.root.partition("/")
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

    def test_is_remote_and_never_trusted_by_location(self, backend: S3Backend) -> None:
        assert backend.remote and not backend.trusted_by_location()

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
        with pytest.raises(BackendError, match="does not exist"):
            backend.touch("k")

    def test_gc_capabilities_cost_what_they_should(
        self, backend: S3Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for i in range(3):
            self.plant(backend, f"g/{i}", b"v" * i)
        requests = _Requests.count(backend, monkeypatch)
        entries = list(backend.iter_entries("g/"))
        assert [(e.key, e.size) for e in entries] == [("g/0", 0), ("g/1", 1), ("g/2", 2)]
        assert requests.made == {"list_objects_v2": 1}  # sizes and times come with the listing
        assert backend.touch("g/1")
        assert requests.made["copy_object"] == 1  # server-side: no byte through the client
        assert "get_object" not in requests.made and "put_object" not in requests.made
        assert backend.delete("g/2")
        assert not backend.delete("g/2")
        # S3 says "deleted" for absent keys too: a HEAD tells, and gives the age to check.
        assert requests.made["head_object"] == 2 and requests.made["delete_object"] == 1
        assert backend.read("g/1") == b"v"
        head = self.client.head_object(Bucket=backend._bucket, Key=f"{backend._prefix}g/1")
        assert head["ContentLength"] == 1


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


class _UndeletingBackend(MemoryBackend):
    """Broken: delete says yes and keeps the value."""

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        return key in self._values


class _HastyDeleteBackend(MemoryBackend):
    """Broken: delete ignores modified_before (a collector would delete what was just reused)."""

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        return super().delete(key)


class _NumbTouchBackend(MemoryBackend):
    """Broken: touch says yes and leaves the modification time alone."""

    def touch(self, key: str) -> bool:
        return key in self._values


class _SizelessBackend(MemoryBackend):
    """Broken: entries carry the wrong sizes."""

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        for entry in super().iter_entries(prefix):
            yield Entry(entry.key, 0, entry.modified)


class _VagueBackend(MemoryBackend):
    """Broken: does not say whether it is remote (None is not an answer)."""

    remote = None  # type: ignore[assignment]


BROKEN: list[BrokenCase] = [
    (_OverwritingBackend, BackendContract.test_write_once_keeps_first_value),
    (_OverwritingBackend, BackendContract.test_reads_what_was_planted),
    (_OverwritingBackend, BackendContract.test_concurrent_writers_one_winner),
    (_ForgetfulBackend, BackendContract.test_exists_many_keeps_order),
    (_PlaceholderBackend, BackendContract.test_iter_keys_lists_exactly_what_was_written),
    (_LaxBackend, partial(BackendContract.test_bad_keys_are_refused_before_io, key="../up")),
    (_UndeletingBackend, BackendContract.test_delete_frees_the_key),
    (_HastyDeleteBackend, BackendContract.test_delete_only_what_is_older_than_asked),
    (_HastyDeleteBackend, BackendContract.test_a_touched_key_survives_a_delete_decided_before),
    (_NumbTouchBackend, BackendContract.test_touch_moves_modified_forward),
    (_SizelessBackend, BackendContract.test_entries_list_exactly_the_keys_with_sizes),
    (_VagueBackend, BackendContract.test_describes_itself),
]


@parametrize_broken(BROKEN)
def test_contract_catches_broken_backend(case: BrokenCase) -> None:
    assert_contract_catches(case)


def test_contract_passes_the_reference_backend() -> None:
    assert_reference_passes(BROKEN)


# --- opening S3 stores -------------------------------------------------------------------------


def test_a_moto_server_that_does_not_start_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "python"  # the interpreter that runs the server
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    real = sys.executable
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(RuntimeError, match="exited with 3") as info, moto_server(tmp_path):
        pass
    assert "Address already in use" in str(info.value)
    # Without site-packages, as without the test extra: moto cannot be imported.
    fake.write_text(f'#!/bin/sh\nexec {real} -S "$@"\n')
    with pytest.raises(RuntimeError, match=r"pip install 'moto\[server\]'"), moto_server(tmp_path):
        pass


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
