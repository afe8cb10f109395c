"""open_store(url): from a URL to a Store, with every configuration error raised here, at once.

A store's root holds a marker object, ``dagger-store``, naming the layout version; a new store
is created by writing it (which also proves the location is writable). A location that holds
other things but no marker is refused, so a typo'd path never scatters objects into a home folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from dagger_store.backends.base import Backend
from dagger_store.backends.cached import CachedBackend
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.memory import MemoryBackend
from dagger_store.errors import NotFoundError, StoreError, StoreOpenError
from dagger_store.store import Store

MARKER = "dagger-store"
MARKER_TEXT = b"dagger-store\nlayout: v1\n"
SCHEMES = ("file", "memory", "s3")


def open_store(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    compression_level: int = 3,
) -> Store:
    """Open (creating if needed) the store at ``url``.

    Parameters
    ----------
    url
        A local path or ``file://`` URL (also how an NFS mount is used), ``memory://NAME``
        (one per process and name), or ``s3://bucket/prefix``.
    storage_options
        For s3:// only: passed to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``, ``secret``,
        ``profile``, ...). Credentials otherwise come from the usual AWS environment.
    cache_dir
        For remote stores: a local folder that keeps a read-through copy of what is read.
    workers, compression_level
        See ``Store``.
    """
    backend = open_backend(url, storage_options or {})
    _check_marker(backend)
    if cache_dir is not None:
        if isinstance(backend, LocalBackend | MemoryBackend):
            raise StoreOpenError(
                f"cache_dir is for remote stores; {backend.url} is already local", url=backend.url
            )
        backend = CachedBackend(backend, _local_backend(Path(cache_dir), str(cache_dir)))
    if workers is None and not isinstance(backend, LocalBackend | MemoryBackend):
        workers = 16  # remote round trips, not cores, bound a remote store
    return Store(backend, workers=workers, compression_level=compression_level)


def open_backend(url: str | os.PathLike[str], storage_options: Mapping[str, Any]) -> Backend:
    """The bare backend at ``url`` (no store marker): for records kept beside a store."""
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "file", text
    if storage_options and scheme != "s3":
        raise StoreOpenError(f"storage_options apply to s3:// stores only, not {text!r}", url=text)
    if scheme == "file":
        return _local_backend(Path(rest), text)
    if scheme == "memory":
        return MemoryBackend.named(rest.strip("/"))
    if scheme == "s3":
        from dagger_store.backends.s3 import open_s3_backend  # s3fs is slow to import

        return open_s3_backend(text, storage_options)
    raise StoreOpenError(
        f"unknown scheme {scheme!r} in {text!r}: a store opens a local path, file://, "
        "memory:// or s3://bucket/prefix",
        url=text,
    )


def _local_backend(path: Path, url: str) -> LocalBackend:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreOpenError(f"{url!r} exists and is not a folder", url=url) from None
    except OSError as exc:
        raise StoreOpenError(
            f"cannot create the store folder {url!r}: {exc.strerror}; pick a path you can write",
            url=url,
        ) from exc
    return LocalBackend(path)


def _check_marker(backend: Backend) -> None:
    try:
        text = backend.read(MARKER)
    except NotFoundError:
        text = _create_marker(backend)
    if text != MARKER_TEXT:
        raise StoreOpenError(
            f"{backend.url} holds a dagger store of another layout ({text[:64]!r}); this version "
            f"reads {MARKER_TEXT!r}: use a matching dagger version",
            url=backend.url,
        )


def _create_marker(backend: Backend) -> bytes:
    if any(key != MARKER for key in islice(backend.iter_keys(), 2)):
        # Stores write their marker before anything else, so another key means either a
        # concurrent creator got there first (its marker is now readable) or not a store.
        try:
            return backend.read(MARKER)
        except NotFoundError:
            raise StoreOpenError(
                f"{backend.url} is not empty and is not a dagger store (no {MARKER!r} marker); "
                "open an empty or new location instead",
                url=backend.url,
            ) from None
    try:
        backend.write_once(MARKER, MARKER_TEXT)
    except StoreError as exc:
        raise StoreOpenError(
            f"cannot create a store at {backend.url}: {exc}", url=backend.url
        ) from exc
    return backend.read(MARKER)
