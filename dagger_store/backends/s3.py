"""An S3 bucket (or a prefix in one), over s3fs.

Invariants, on top of those of ``backends.base``:

- ``write_once`` is one conditional PUT (``If-None-Match: *``): S3 itself decides the single
  winner, atomically; there is no check-then-write window. A 412 (PreconditionFailed) means
  another writer has the key: False. A 409 (ConditionalRequestConflict: another conditional write
  of the key is in flight, and may still fail) is retried with backoff until it settles.
- ``exists_many`` is one concurrent round of HEADs (at most ``MAX_IN_FLIGHT`` at once), never
  ``fs.exists``: a miss there costs HEAD + LIST and may be answered from a stale listing cache.
  A large batch whose common folder lists in a few pages is answered by listing instead (S3
  listings are strongly consistent, like HEADs).
- Every key is checked by ``check_key`` before any request; errors are translated once, in
  ``_translated``, and messages never contain credentials.
- For garbage collection: ``iter_entries`` reads sizes and LastModified from the same
  ``list_objects_v2`` pages as ``iter_keys``; ``touch`` is a server-side ``copy_object`` of the
  object onto itself (``MetadataDirective="REPLACE"``), which moves LastModified and moves no
  bytes through the client; ``delete`` is a HEAD (S3 deletes report success for absent keys,
  and ``modified_before`` needs the current LastModified) and then the DELETE. S3 has no delete
  conditional on the modification time, so a touch landing between those two requests (one
  round trip) is lost; the writer's commit then finds the blob missing and refuses (see gc.py).
- ``delete_many`` (what gc uses) takes the keys in sorted batches of up to ``DELETE_BATCH``
  (1,000, S3's limit). It checks each batch's ages again: from a listing of the batch's key
  range when a few LIST pages cover it (a page answers for up to 1,000 keys; listings are
  strongly consistent, like HEADs), else, for the keys the pages did not reach, from HEADs
  (concurrent, at most ``MAX_IN_FLIGHT``, as in ``exists_many``). Then one ``DeleteObjects``
  (quiet: it answers only with per-key errors) removes those still older than the cutoff, while
  the next batch is checked. Per-key errors S3 calls transient are retried after a new age
  check; any other is a BackendError naming a key. So the age check and the removal are no
  longer one pair of requests per object: a touch that lands after its key's check and before
  its batch's DeleteObjects is lost, a window of one batch's check (a LIST page or two, or up to
  1,000 HEADs, ``MAX_IN_FLIGHT`` at once) plus one request, where ``delete``'s is one round
  trip. No conditional delete closes it: on general-purpose buckets S3 conditions a delete on
  the ETag only (``If-Match``; ``ETag`` in a DeleteObjects entry), which a touch does not change
  (a copy onto itself keeps the content, so the ETag), and its conditions on the modification
  time (``x-amz-if-match-last-modified-time``; ``LastModifiedTime``) are for directory buckets
  only. gc.py says why a lost touch still never makes a manifest with holes.

S3 quirks relied on:

- HEAD responses have no body, so a 404 does not say whether the key or the bucket is missing;
  ``open_s3_backend`` checks the bucket once so that a 404 later means "no such key".
- Without ``s3:ListBucket`` permission S3 answers 403, not 404, for a missing key: a 403 is an
  error, never "absent".
- A Range starting at or past the end of an object is refused with 416 (InvalidRange), even on an
  empty object: that is zero bytes read, not an error.
- botocore refuses a memoryview as a request body, so a lone memoryview part is copied once.
- A retried conditional PUT whose first attempt landed reads as 412: False, yet the value is ours.
- Copying an object onto itself is refused unless something changes: REPLACE (with no metadata)
  counts. LastModified has one-second resolution, so an object may look up to a second older
  than it is.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import aiohttp
import botocore.exceptions  # type: ignore[import-untyped]
import s3fs
from fsspec.asyn import sync

from dagger_store.backends.base import Buffer, Entry, check_key
from dagger_store.errors import BackendError, InvalidKeyError, NotFoundError, StoreOpenError

MAX_IN_FLIGHT = 64
# exists_many lists instead of HEADing when a batch of at least LIST_ABOVE keys fits in a budget
# of one LIST page per KEYS_PER_LIST_PAGE keys asked about.
LIST_ABOVE = 100
KEYS_PER_LIST_PAGE = 250
# Keys per DeleteObjects request: S3's maximum.
DELETE_BATCH = 1000

_TAKEN = {"PreconditionFailed", "412"}
_IN_FLIGHT_ELSEWHERE = {"ConditionalRequestConflict", "409"}
_CONFLICT_RETRIES = 8
# Per-key DeleteObjects errors worth another try (after the key's age is checked again).
_DELETE_TRANSIENT = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"}
_DELETE_ATTEMPTS = 3
_DENIED = (
    PermissionError,
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
)
_UNREACHABLE = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    aiohttp.ClientConnectionError,
    TimeoutError,
)
_FAILED = (
    OSError,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")


class S3Backend:
    """Values as objects under ``root`` ("bucket" or "bucket/prefix"), through ``fs``.

    Remote; never trusted by location (whoever may write the bucket could have planted objects).
    """

    remote = True
    list_page_size = 1000  # keys per LIST request; 1000 is S3's maximum
    delete_batch_size = DELETE_BATCH  # keys per DeleteObjects request

    def __init__(self, fs: s3fs.S3FileSystem, root: str) -> None:
        bucket, _, prefix = root.partition("/")
        if not bucket or root.endswith("/"):
            raise ValueError(
                f"S3 root is 'bucket' or 'bucket/prefix' without a final '/': {root!r}"
            )
        self.fs = fs
        self.root = root
        self.url = f"s3://{root}"
        self._bucket = bucket
        self._prefix = prefix + "/" if prefix else ""

    def trusted_by_location(self) -> bool:
        return False

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            if _s3_code(exc) == "NoSuchBucket":
                raise BackendError(
                    f"bucket {self._bucket!r} of {self.url} does not exist (any more); "
                    "create it or fix the store URL",
                    key=key,
                ) from exc
            raise NotFoundError(f"no such key {key!r} in {self.url}", key=key) from exc
        except _DENIED as exc:
            raise BackendError(
                f"S3 refused access to {key!r} in {self.url} ({_describe(exc, self.fs)}); check "
                "the credentials (storage_options key/secret/token or profile, AWS_* variables) "
                "and that they may get, put and list objects in this bucket (without "
                "s3:ListBucket, S3 answers 403 for a missing key)",
                key=key,
            ) from exc
        except _FAILED as exc:
            raise BackendError(
                f"{self.url} failed on {key!r}: {_describe(exc, self.fs)}", key=key
            ) from exc

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def read(self, key: str) -> bytes:
        path = self._path(key)
        with self._translated(key):
            # max_concurrency=1: one GET, not a HEAD for the size and then ranged GETs.
            data: bytes = self.fs.cat_file(path, max_concurrency=1)
            return data

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        path = self._path(key)
        if offset < 0:
            raise ValueError(f"read_into needs an offset >= 0, got {offset}")
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if not out:
            # An empty Range is invalid and S3 ignores invalid Ranges (it sends the whole object).
            if not self.exists_many([key])[0]:
                raise NotFoundError(f"no such key {key!r} in {self.url}", key=key)
            return 0
        with self._translated(key):
            try:
                data = self.fs.cat_file(path, start=offset, end=offset + len(out))
            except OSError as exc:
                if _s3_code(exc) == "InvalidRange":
                    return 0
                raise
        out[: len(data)] = data
        return len(data)

    def write_once(self, key: str, *parts: Buffer) -> bool:
        path = self._path(key)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        with self._translated(key):
            for attempt in range(_CONFLICT_RETRIES):
                try:
                    self.fs.pipe_file(path, data, mode="create")
                    return True
                except FileExistsError:
                    return False
                except OSError as exc:
                    code = _s3_code(exc)
                    if code in _TAKEN:
                        return False
                    # 409: another conditional write of this key is in flight and may yet
                    # fail, so "taken" would be a guess; ask again once it has settled.
                    if code not in _IN_FLIGHT_ELSEWHERE or attempt == _CONFLICT_RETRIES - 1:
                        raise
                    time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        for key in keys:
            check_key(key)
        if not keys:
            return []
        listed = self._listed(keys)
        if listed is not None:
            return [key in listed for key in keys]
        try:
            found: list[bool] = sync(self.fs.loop, self._exists_all, keys)
        except BaseExceptionGroup as group:  # TaskGroup: the first failure cancelled the rest
            raise _first(group) from None
        return found

    async def _exists_all(self, keys: Sequence[str]) -> list[bool]:
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def head(key: str) -> bool:
            async with in_flight:
                with self._translated(key):
                    try:
                        await self.fs._call_s3(
                            "head_object", Bucket=self._bucket, Key=self._prefix + key
                        )
                    except FileNotFoundError:
                        return False
                    return True

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(head(key)) for key in keys]
        return [task.result() for task in tasks]

    def _listed(self, keys: Sequence[str]) -> set[str] | None:
        """Every key under the batch's common folder, if a few LIST pages hold them all.

        One LIST page answers for up to 1,000 keys where a HEAD answers for one, so a large
        batch in a small-enough namespace (a tree's manifests in a lab store of thousands) is
        answered in a handful of requests. The page budget grows with the batch, and a
        namespace too large for it falls back to the HEADs, having wasted at most that budget.
        """
        if len(keys) < LIST_ABOVE:
            return None
        # Character-wise on purpose, then cut back to a "/": the folder holding every key.
        common = os.path.commonprefix(list(keys))  # noqa: RUF071
        folder = common[: common.rfind("/") + 1]
        budget = max(1, len(keys) // KEYS_PER_LIST_PAGE)
        found: set[str] = set()
        for _, (page, more) in zip(range(budget), self._pages(folder), strict=False):
            found.update(entry.key for entry in page)
            if not more:
                return found
        return None

    def _pages(self, prefix: str) -> Iterator[tuple[list[Entry], bool]]:
        """Pages of entries under ``prefix``, each with whether more pages follow."""
        request = {
            "Bucket": self._bucket,
            "Prefix": self._prefix + prefix,
            "MaxKeys": self.list_page_size,
        }
        while True:
            with self._translated(prefix):
                page = sync(self.fs.loop, self.fs._call_s3, "list_objects_v2", **request)
            more = bool(page.get("IsTruncated"))
            # "dir/" placeholders and foreign names are not keys
            entries = [
                Entry(key, item["Size"], _timestamp(item))
                for item in page.get("Contents", ())
                if _is_key(key := item["Key"][len(self._prefix) :])
            ]
            yield entries, more
            if not more:
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        for entry in self.iter_entries(prefix):
            yield entry.key

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        if prefix:
            check_key(prefix.rstrip("/"))
        for page, _ in self._pages(prefix):
            yield from page

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        check_key(key)
        bucket_key = {"Bucket": self._bucket, "Key": self._prefix + key}
        with self._translated(key):
            try:
                head = sync(self.fs.loop, self.fs._call_s3, "head_object", **bucket_key)
            except FileNotFoundError:
                return False
            if modified_before is not None and _timestamp(head) >= modified_before:
                return False
            sync(self.fs.loop, self.fs._call_s3, "delete_object", **bucket_key)
        return True

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        """Batches of up to ``delete_batch_size`` keys, in key order: each batch's ages checked
        again (a listing of its key range, else HEADs), then one DeleteObjects for the keys
        still old enough, sent while the next batch is checked. See the module docstring."""
        for key in keys:
            check_key(key)
        if not keys:
            return []
        try:
            removed: set[str] = sync(
                self.fs.loop, self._delete_all, sorted(set(keys)), modified_before
            )
        except BaseExceptionGroup as group:  # TaskGroup: the first failure cancelled the rest
            raise _first(group) from None
        result = []
        for key in keys:
            result.append(key in removed)
            removed.discard(key)  # a key given twice is removed once
        return result

    async def _delete_all(self, keys: list[str], modified_before: float | None) -> set[str]:
        removed: set[str] = set()
        async with asyncio.TaskGroup() as group:
            for start in range(0, len(keys), self.delete_batch_size):
                batch = keys[start : start + self.delete_batch_size]
                doomed = _older(batch, await self._ages(batch), modified_before)
                if doomed:
                    group.create_task(self._delete_batch(doomed, modified_before, removed))
        return removed

    async def _delete_batch(
        self, keys: list[str], modified_before: float | None, removed: set[str]
    ) -> None:
        """One DeleteObjects for ``keys`` (just checked); adds what it removed to ``removed``."""
        for attempt in range(_DELETE_ATTEMPTS):
            with self._translated(keys[0]):
                response = await self.fs._call_s3(
                    "delete_objects",
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": self._prefix + k} for k in keys], "Quiet": True},
                )
            # Quiet: the response lists only the keys that failed. S3 reports an absent key as
            # deleted (the age check before has answered for those); another server may say
            # NoSuchKey: gone all the same, not by this call.
            errors = {
                str(e.get("Key", ""))[len(self._prefix) :]: str(e.get("Code", ""))
                for e in response.get("Errors", ())
            }
            removed.update(k for k in keys if k not in errors)
            errors = {k: c for k, c in errors.items() if c != "NoSuchKey"}
            refused = {k: c for k, c in errors.items() if c not in _DELETE_TRANSIENT}
            if refused or (errors and attempt == _DELETE_ATTEMPTS - 1):
                key, code = min((refused or errors).items())
                advice = (
                    "check that the credentials may s3:DeleteObject in this bucket"
                    if refused
                    else f"S3 kept failing after {_DELETE_ATTEMPTS} attempts"
                )
                raise BackendError(
                    f"{self.url} did not delete {len(refused or errors)} of {len(keys)} objects "
                    f"of one DeleteObjects request ({code} on {key!r}, ...): {advice}; then "
                    "collect again (what was deleted stays deleted)",
                    key=key,
                )
            if not errors:
                return
            await asyncio.sleep(0.1 * 2**attempt)
            retry = sorted(errors)  # checked again: time has passed since their first check
            keys = _older(retry, await self._ages(retry), modified_before)
            if not keys:
                return

    async def _ages(self, keys: Sequence[str]) -> dict[str, float]:
        """The modification time of each of ``keys`` (sorted) that exists, from a listing of
        their range where a few pages cover it, else (for the rest) from concurrent HEADs."""
        ages: dict[str, float] = {}
        rest = await self._listed_ages(keys, ages) if len(keys) >= LIST_ABOVE else keys
        if not rest:
            return ages
        in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def head(key: str) -> None:
            async with in_flight:
                with self._translated(key):
                    try:
                        response = await self.fs._call_s3(
                            "head_object", Bucket=self._bucket, Key=self._prefix + key
                        )
                    except FileNotFoundError:
                        return
                    ages[key] = _timestamp(response)

        async with asyncio.TaskGroup() as group:
            for key in rest:
                group.create_task(head(key))
        return ages

    async def _listed_ages(self, keys: Sequence[str], ages: dict[str, float]) -> Sequence[str]:
        """Fill ``ages`` from LIST pages of the range ``keys`` (sorted) spans, within a budget
        of one page per ``KEYS_PER_LIST_PAGE`` keys; the keys the pages did not reach."""
        # Character-wise: a listing is of names starting with a string, folder or not.
        common = os.path.commonprefix(list(keys))  # noqa: RUF071
        request: dict[str, Any] = {
            "Bucket": self._bucket,
            "Prefix": self._prefix + common,
            "MaxKeys": self.list_page_size,
        }
        if len(keys[0]) > len(common):  # from just before the first key: its name cut short
            request["StartAfter"] = self._prefix + keys[0][:-1]
        wanted = set(keys)
        for _ in range(max(1, len(keys) // KEYS_PER_LIST_PAGE)):
            with self._translated(common):
                page = await self.fs._call_s3("list_objects_v2", **request)
            contents = page.get("Contents", ())
            for item in contents:
                key = item["Key"][len(self._prefix) :]
                if key in wanted:
                    ages[key] = _timestamp(item)
            if not page.get("IsTruncated"):
                return []  # the whole range is listed: a key not in it is absent
            reached = contents[-1]["Key"][len(self._prefix) :] if contents else ""
            if reached >= keys[-1]:
                return []
            request["ContinuationToken"] = page["NextContinuationToken"]
        return [key for key in keys if key > reached]

    def touch(self, key: str) -> bool:
        check_key(key)
        bucket_key = {"Bucket": self._bucket, "Key": self._prefix + key}
        with self._translated(key):
            try:
                sync(
                    self.fs.loop,
                    self.fs._call_s3,
                    "copy_object",
                    CopySource=bucket_key,
                    MetadataDirective="REPLACE",
                    **bucket_key,
                )
            except FileNotFoundError as exc:
                if _s3_code(exc) == "NoSuchBucket":
                    raise
                return False
        return True


def open_s3_backend(url: str, storage_options: Mapping[str, Any]) -> S3Backend:
    """Open ``s3://bucket[/prefix]`` as a backend, checking that the bucket is reachable.

    Parameters
    ----------
    url
        ``s3://bucket`` or ``s3://bucket/some/prefix``.
    storage_options
        Keyword arguments of ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``, ``secret``, ...).
        Listing and instance caches are off unless set here.

    Raises
    ------
    StoreOpenError
        A malformed URL or bucket name, a missing bucket, refused credentials or an unreachable
        endpoint; the message says which and what to do.
    """
    bucket, prefix = _parse_url(url)
    options = {"use_listings_cache": False, "skip_instance_cache": True, **storage_options}
    config = {"max_pool_connections": MAX_IN_FLIGHT, **(options.get("config_kwargs") or {})}
    options["config_kwargs"] = config  # a pool of 10 (botocore's default) would cap exists_many
    fs = s3fs.S3FileSystem(**options)
    endpoint = options.get("endpoint_url") or "the default AWS S3 endpoint"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as exc:
        raise StoreOpenError(
            f"bucket {bucket!r} does not exist at {endpoint}: create it (for example "
            f"`aws s3 mb s3://{bucket}`) or fix the bucket name in {url!r}",
            url=url,
        ) from exc
    except _DENIED as exc:
        raise StoreOpenError(
            f"{endpoint} refused the credentials for bucket {bucket!r} ({_describe(exc, fs)}): "
            "check storage_options key/secret/token or profile, the AWS_* environment "
            "variables, and that they may access this bucket",
            url=url,
        ) from exc
    except _UNREACHABLE as exc:
        raise StoreOpenError(
            f"cannot reach {endpoint} to open bucket {bucket!r} ({_describe(exc, fs)}): check "
            "endpoint_url in storage_options, that the server is running, and the network",
            url=url,
        ) from exc
    except _FAILED as exc:
        raise StoreOpenError(
            f"{endpoint} failed to open bucket {bucket!r}: {_describe(exc, fs)}", url=url
        ) from exc
    return S3Backend(fs, f"{bucket}/{prefix}" if prefix else bucket)


def _parse_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise StoreOpenError(f"not an S3 URL (expected s3://bucket[/prefix]): {url!r}", url=url)
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if "@" in bucket:
        redacted = "s3://***@" + bucket.rpartition("@")[2]
        raise StoreOpenError(
            f"credentials do not belong in the URL {redacted!r}; pass them in storage_options",
            url=redacted,
        )
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP_ADDRESS.fullmatch(bucket):
        raise StoreOpenError(
            f"invalid S3 bucket name {bucket!r} in {url!r}: use 3-63 lowercase letters, digits, "
            "'.' and '-', starting and ending with a letter or digit",
            url=url,
        )
    prefix = prefix.removesuffix("/")
    if prefix:
        try:
            check_key(prefix)
        except InvalidKeyError as exc:
            raise StoreOpenError(f"invalid prefix in {url!r}: {exc}", url=url) from exc
    return bucket, prefix


def _s3_code(exc: BaseException) -> str | None:
    # s3fs turns botocore's ClientError into an OSError and keeps the original as __cause__.
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code is not None else None
    return None


def _describe(exc: BaseException, fs: s3fs.S3FileSystem) -> str:
    text = str(exc) or type(exc).__name__
    for secret in (fs.key, fs.secret, fs.token):
        if isinstance(secret, str) and secret:
            text = text.replace(secret, "***")
    return text


def _timestamp(response: Mapping[str, Any]) -> float:
    modified = response["LastModified"]  # botocore parses it into an aware datetime
    return float(modified.timestamp())


def _older(keys: Sequence[str], ages: Mapping[str, float], before: float | None) -> list[str]:
    """The keys that exist (have an age) and, if ``before`` is given, were modified before it."""
    return [k for k in keys if k in ages and (before is None or ages[k] < before)]


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a (possibly nested) TaskGroup failure."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _is_key(key: str) -> bool:
    try:
        check_key(key)
    except InvalidKeyError:
        return False
    return True
