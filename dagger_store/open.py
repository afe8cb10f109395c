"""open_store(url): from a URL to a Store, with every configuration error raised here, at once.

A store's root holds a marker object (``layout.MARKER``) naming the layout version. A new store
is created by making its location where that must be made (``SupportsCreate``: a local folder),
then writing the marker (which also proves the location is writable); nothing is created before
that moment, nor ever with ``create=False``. A location that holds other things but no marker is
refused, so a typo'd path never scatters objects into a home folder.

Which backend a URL opens is the registry's business (``registry.py``); what kind of backend it
is (remote or not, trusted by its location or not) is the backend's own answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import islice
from typing import Any

from dagger_store.backends.base import Backend, SupportsCreate
from dagger_store.backends.cached import CachedBackend
from dagger_store.backends.local import LocalBackend
from dagger_store.errors import NotFoundError, StoreError, StoreOpenError
from dagger_store.layout import MARKER, MARKER_TEXT
from dagger_store.registry import open_backend
from dagger_store.signing import LabKey
from dagger_store.store import Store

REMOTE_WORKERS = 16  # remote round trips, not cores, bound a remote store


def open_store(
    url: str | os.PathLike[str] | Backend,
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
        (one per process and name), ``s3://bucket/prefix``, a URL of a scheme a plugin
        registered (``register_backend``), or a backend already opened (``open_backend``).
    storage_options
        For opening ``url`` (s3: passed to ``s3fs.S3FileSystem``: ``endpoint_url``, ``key``,
        ``secret``, ``profile``, ...; credentials otherwise come from the usual AWS
        environment). Not with a backend already opened.
    cache_dir
        For remote stores (``backend.remote``): a local folder that keeps a read-through copy
        of what is read; made if absent.
    workers
        See ``Store``; default: 16 for a remote store, else as ``Store``.
    compression_level
        See ``Store``.
    lab_key
        The lab's key for signing manifests (HMAC-SHA256). Default: the ``DAGGER_LAB_KEY``
        environment variable (the key text), else the file named by ``DAGGER_LAB_KEY_FILE``.
        With a key, every manifest committed is signed and every signature read is checked.
    require_signatures
        Refuse unsigned and mis-signed manifests (never hits; ``get_manifest`` raises
        UntrustedError). Default: True for a remote store when a lab key is configured.
    trust
        Whether pickled attributes (whose loading runs code) may load from this store. Default:
        trusted when signatures are required, or when the backend is trusted by its location
        (``memory://``, a local folder whose store marker you own); a remote store otherwise is
        not. ``trust=True``: you trust everyone who can write there; ``trust=False``: a folder
        you created but share.
    create
        Make a new store (and its folder) if there is none at ``url``; False: StoreOpenError
        instead (tools that inspect stores must not leave empty ones behind a typo).

    Raises
    ------
    StoreOpenError
        Anything wrong with the URL, the location, the options or the lab key; the message says
        what to do (and never contains a key or credential).
    """
    backend = _backend(url, storage_options)
    try:
        key = LabKey.configured(lab_key)
    except (TypeError, ValueError) as exc:
        raise StoreOpenError(f"cannot open {backend.url}: {exc}", url=backend.url) from None
    if require_signatures is None:
        require_signatures = key is not None and backend.remote
    if require_signatures and key is None:
        raise StoreOpenError(
            f"require_signatures=True for {backend.url} needs the lab key to check signatures "
            "with: pass lab_key=, or set DAGGER_LAB_KEY (the key) or DAGGER_LAB_KEY_FILE (a file "
            "holding it)",
            url=backend.url,
        )
    if cache_dir is not None and not backend.remote:
        raise StoreOpenError(
            f"cache_dir is for remote stores; {backend.url} is already local", url=backend.url
        )
    _check_marker(backend, create)
    if cache_dir is not None:
        cache = LocalBackend(cache_dir)
        cache.create()
        backend = CachedBackend(backend, cache)
    if workers is None and backend.remote:
        workers = REMOTE_WORKERS
    return Store(
        backend,
        workers=workers,
        compression_level=compression_level,
        lab_key=key,
        require_signatures=require_signatures,
        trusted=trust,
    )


def _backend(
    url: str | os.PathLike[str] | Backend, storage_options: Mapping[str, Any] | None
) -> Backend:
    if isinstance(url, str | os.PathLike):
        return open_backend(url, storage_options)
    if not isinstance(url, Backend):
        raise TypeError(
            "open_store takes a URL, a path or a Backend (from open_backend), got "
            f"{type(url).__name__}: {url!r}"
        )
    if storage_options:
        raise StoreOpenError(
            f"storage_options are for opening a URL; {url.url} is a backend already opened "
            "(pass them to open_backend instead)",
            url=url.url,
        )
    return url


def _check_marker(backend: Backend, create: bool) -> None:
    try:
        text = backend.read(MARKER)
    except NotFoundError:
        if not create:
            raise StoreOpenError(
                f"no store at {backend.url} (no {MARKER!r} marker there): check the URL",
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
    if isinstance(backend, SupportsCreate):
        backend.create()
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
