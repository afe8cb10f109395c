"""Which backend opens which URL: a registry of URL schemes, built-ins and plugins alike.

An *opener* is a function ``opener(url, storage_options) -> Backend``: it gets the URL as given
(``"s3://bucket/prefix"``) and the caller's ``storage_options`` (a read-only mapping, empty when
none were given), and returns the bare backend. It checks the URL and options and may talk to the
location (s3 checks that the bucket exists), but it creates nothing: making the location is
``SupportsCreate.create``'s job, which ``open_store`` calls when it makes a new store. An opener
raises ``StoreOpenError`` for anything wrong, saying what to do, and never puts a credential in a
message. The opener of a scheme that takes no options refuses any (``no_options`` does it).

Built in: ``file`` (also any URL without ``://``: a local path), ``memory`` and ``s3``. A plugin
adds a scheme with ``register_backend``, or, installed as a package, declares its opener in the
entry-point group ``dagger_store.backends`` under the scheme's name (as fsspec's
``fsspec.specs`` group does), for example in its ``pyproject.toml``::

    [project.entry-points."dagger_store.backends"]
    labfs = "labfs.dagger:open_labfs_backend"

Entry points are looked at only when a URL's scheme is not registered, and the opener found is
then registered, so importing dagger_store never imports a plugin.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dagger_store.backends.base import Backend
from dagger_store.backends.local import LocalBackend
from dagger_store.backends.memory import MemoryBackend
from dagger_store.errors import StoreOpenError

Opener = Callable[[str, Mapping[str, Any]], Backend]

ENTRY_POINT_GROUP = "dagger_store.backends"
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")  # RFC 3986, lowercase (its canonical form)

_openers: dict[str, Opener] = {}
_lock = threading.Lock()


def register_backend(scheme: str, opener: Opener, *, replace: bool = False) -> None:
    """Open URLs ``scheme://...`` with ``opener(url, storage_options) -> Backend``.

    Parameters
    ----------
    scheme
        Lowercase, as in URLs: a letter, then letters, digits, ``+``, ``-`` or ``.``.
    opener
        Called by ``open_backend`` and ``open_store`` with the whole URL and the caller's
        ``storage_options``; see the module docstring for what it must (not) do.
    replace
        Replace the opener already registered for ``scheme`` (a built-in one too). Without it,
        registering another opener for a taken scheme is a ValueError; registering the same
        one again does nothing.
    """
    if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
        raise ValueError(
            f"invalid URL scheme {scheme!r}: a lowercase letter, then lowercase letters, digits, "
            "'+', '-' or '.' (no '://')"
        )
    if not callable(opener):
        raise TypeError(f"an opener is a function (url, storage_options) -> Backend: {opener!r}")
    with _lock:
        taken = _openers.get(scheme)
        if taken is not None and taken is not opener and not replace:
            raise ValueError(
                f"the scheme {scheme!r} is registered already (to {_name(taken)}); pass "
                "replace=True to replace it"
            )
        _openers[scheme] = opener


def registered_schemes() -> list[str]:
    """The schemes registered so far, sorted (plugins' entry points not yet looked at aside)."""
    with _lock:
        return sorted(_openers)


def open_backend(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Backend:
    """The bare backend at ``url``: no store marker read or written, nothing created.

    For looking at a location before making a store of it (``backend.remote``), for keeping
    other things beside a store, and for ``open_store``, which accepts the backend returned.

    Parameters
    ----------
    url
        A local path, or ``scheme://...`` for a registered scheme (``file``, ``memory``, ``s3``,
        and plugins': see ``register_backend``).
    storage_options
        Handed to the scheme's opener (s3: ``s3fs.S3FileSystem``'s keyword arguments).

    Raises
    ------
    StoreOpenError
        An unknown scheme (the message lists the known ones), or whatever the opener refuses.
    """
    text = os.fspath(url)
    scheme, sep, _ = text.partition("://")
    opener = _opener(scheme if sep else "file", text)
    backend = opener(text, MappingProxyType(dict(storage_options or {})))
    if not isinstance(backend, Backend):
        raise TypeError(
            f"the opener of {scheme}:// URLs ({_name(opener)}) returned a "
            f"{type(backend).__name__}, which is not a dagger_store Backend (see "
            "dagger_store.backends.base.Backend)"
        )
    return backend


def no_options(url: str, storage_options: Mapping[str, Any]) -> None:
    """For the opener of a scheme that takes no options: refuse any (StoreOpenError)."""
    if storage_options:
        names = ", ".join(repr(name) for name in sorted(storage_options))
        raise StoreOpenError(
            f"{url!r} takes no storage_options, got {names}: of the built-in schemes, "
            "storage_options apply to s3:// stores only",
            url=url,
        )


def _opener(scheme: str, url: str) -> Opener:
    with _lock:
        opener = _openers.get(scheme)
    if opener is not None:
        return opener
    from importlib.metadata import entry_points  # only for a scheme not registered yet

    offered = entry_points(group=ENTRY_POINT_GROUP)
    for entry in offered:
        if entry.name != scheme:
            continue
        try:
            loaded = entry.load()
        except Exception as exc:
            raise StoreOpenError(
                f"the plugin opening {scheme}:// URLs ({entry.value!r}, entry point group "
                f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}; "
                "reinstall or fix it",
                url=url,
            ) from exc
        if not callable(loaded):
            raise StoreOpenError(
                f"the plugin opening {scheme}:// URLs ({entry.value!r}, entry point group "
                f"{ENTRY_POINT_GROUP!r}) names a {type(loaded).__name__}, not an opener "
                "function (url, storage_options) -> Backend",
                url=url,
            )
        with _lock:  # a concurrent first use may have registered it meanwhile: same opener
            return _openers.setdefault(scheme, loaded)
    known = sorted({*registered_schemes(), *(entry.name for entry in offered)})
    raise StoreOpenError(
        f"unknown scheme {scheme!r} in {url!r}: a store opens a local path or a URL of "
        f"{', '.join(f'{s}://' for s in known)}. Add a scheme with "
        "dagger_store.register_backend(scheme, opener), or install a plugin that declares it "
        f"in the entry-point group {ENTRY_POINT_GROUP!r}",
        url=url,
    )


def _name(opener: Callable[..., Any]) -> str:
    module = getattr(opener, "__module__", None)
    name = getattr(opener, "__qualname__", None) or repr(opener)
    return f"{module}.{name}" if module else name


# -- the built-in schemes --------------------------------------------------------------------------


def _open_file(url: str, storage_options: Mapping[str, Any]) -> Backend:
    no_options(url, storage_options)
    return LocalBackend(Path(url.removeprefix("file://")))


def _open_memory(url: str, storage_options: Mapping[str, Any]) -> Backend:
    no_options(url, storage_options)
    return MemoryBackend.named(url.removeprefix("memory://").strip("/"))


def _open_s3(url: str, storage_options: Mapping[str, Any]) -> Backend:
    from dagger_store.backends.s3 import open_s3_backend  # s3fs is slow to import

    return open_s3_backend(url, storage_options)


register_backend("file", _open_file)
register_backend("memory", _open_memory)
register_backend("s3", _open_s3)
