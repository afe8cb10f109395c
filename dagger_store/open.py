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
from dagger_store.signing import LabKey
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
    lab_key: str | bytes | LabKey | None = None,
    require_signatures: bool | None = None,
    trust: bool | None = None,
    create: bool = True,
) -> Store:
    """Open (creating it if needed, unless ``create=False``) the store at ``url``.

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
    lab_key
        The lab's key for signing manifests (HMAC-SHA256). Default: the ``DAGGER_LAB_KEY``
        environment variable (the key text), else the file named by ``DAGGER_LAB_KEY_FILE``.
        With a key, every manifest committed is signed and every signature read is checked.
    require_signatures
        Refuse unsigned and mis-signed manifests (never hits; ``get_manifest`` raises
        UntrustedError). Default: True for a remote (S3) store when a lab key is configured.
    trust
        Whether pickled attributes (whose loading runs code) may load from this store. Default:
        trusted when signatures are required, for ``memory://``, and for a local folder whose
        ``dagger-store`` marker you own; a remote store otherwise is not. ``trust=True``: you
        trust everyone who can write there; ``trust=False``: a folder you created but share.
    create
        Make a new store if there is none at ``url``; False: StoreOpenError instead (tools that
        inspect stores must not leave empty ones behind a typo).

    Raises
    ------
    StoreOpenError
        Anything wrong with the URL, the location, the options or the lab key; the message says
        what to do (and never contains a key or credential).
    """
    backend = open_backend(url, storage_options or {}, create=create)
    try:
        key = LabKey.configured(lab_key)
    except (TypeError, ValueError) as exc:
        raise StoreOpenError(f"cannot open {backend.url}: {exc}", url=backend.url) from None
    remote = not isinstance(backend, LocalBackend | MemoryBackend)
    if require_signatures is None:
        require_signatures = key is not None and remote
    if require_signatures and key is None:
        raise StoreOpenError(
            f"require_signatures=True for {backend.url} needs the lab key to check signatures "
            "with: pass lab_key=, or set DAGGER_LAB_KEY (the key) or DAGGER_LAB_KEY_FILE (a file "
            "holding it)",
            url=backend.url,
        )
    _check_marker(backend, create)
    if cache_dir is not None:
        if isinstance(backend, LocalBackend | MemoryBackend):
            raise StoreOpenError(
                f"cache_dir is for remote stores; {backend.url} is already local", url=backend.url
            )
        backend = CachedBackend(backend, _local_backend(Path(cache_dir), str(cache_dir)))
    if workers is None and not isinstance(backend, LocalBackend | MemoryBackend):
        workers = 16  # remote round trips, not cores, bound a remote store
    return Store(
        backend,
        workers=workers,
        compression_level=compression_level,
        lab_key=key,
        require_signatures=require_signatures,
        trusted=trust,
    )


def open_backend(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any], *, create: bool = True
) -> Backend:
    """The bare backend at ``url`` (no store marker): for records kept beside a store."""
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "file", text
    if storage_options and scheme != "s3":
        raise StoreOpenError(f"storage_options apply to s3:// stores only, not {text!r}", url=text)
    if scheme == "file":
        if not create and not Path(rest).is_dir():
            raise StoreOpenError(f"no store at {text!r}: no such folder", url=text)
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


def _check_marker(backend: Backend, create: bool) -> None:
    try:
        text = backend.read(MARKER)
    except NotFoundError:
        if not create:
            raise StoreOpenError(
                f"no dagger store at {backend.url} (no {MARKER!r} marker); check the URL",
                url=backend.url,
            ) from None
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
