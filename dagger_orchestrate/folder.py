"""The experiment folder: a marker naming the experiment and the store holding its records.

::

    <path>/dagger-experiment     JSON: {"format", "version", "name", "store"}, written once
    <path>/store/                the embedded store, unless the experiment uses a shared one

The records themselves (what ran, with which tags) live in the store, under the experiment's
name (``dagger_store.records``), so a shared store lists every experiment that uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

import dagger_store as ds
from dagger_store.backends.base import Backend, SupportsCreate
from dagger_store.layout import check_name

MARKER = "dagger-experiment"
FORMAT = "dagger-experiment"
VERSION = 1
STORE_ENV = "DAGGER_STORE"


@dataclass(frozen=True, slots=True)
class Folder:
    """An experiment folder, opened: where it is, its name, and its store's URL."""

    path: str
    name: str
    store: str


def open_folder(
    path: str,
    storage_options: Mapping[str, Any],
    *,
    store: str | None,
    name: str | None,
    create: bool,
) -> Folder:
    """Open (or, with ``create``, make) the experiment folder at the absolute ``path``.

    A new experiment takes its store from ``store``, else the DAGGER_STORE environment
    variable, else ``<path>/store``, and keeps it; an explicit ``store`` overrides it later
    (a store that moved). A folder holding anything else is refused.
    """
    backend = ds.open_backend(path, storage_options if is_url(path) else {})
    marker = _read(backend)
    if marker is None:
        if not create:
            raise ds.NotFoundError(
                f"no dagger experiment at {backend.url}: check the path (and storage_options)",
                key=MARKER,
            )
        if any(not k.startswith("store/") for k in _first_keys(backend)):
            raise ds.StoreOpenError(
                f"{backend.url} is not empty and is not a dagger experiment (no {MARKER!r}); "
                "use a new or empty folder",
                url=backend.url,
            )
        if isinstance(backend, SupportsCreate):
            backend.create()
        store_url = absolute(store or os.environ.get(STORE_ENV) or f"{path.rstrip('/')}/store")
        document = {
            "format": FORMAT,
            "version": VERSION,
            "name": check_name(name or default_name(path)),
            "store": store_url,
        }
        backend.write_once(MARKER, json.dumps(document, indent=1).encode())
        marker = _read(backend)  # a concurrent creator may have won: theirs is the one
        assert marker is not None
    if name is not None and name != marker["name"]:
        raise ValueError(
            f"{backend.url} is experiment {marker['name']!r}, not {name!r}; leave name out or "
            "use another folder"
        )
    return Folder(path, marker["name"], absolute(store) if store else marker["store"])


def default_name(path: str) -> str:
    """The folder's last name plus a short hash of its full path: readable, and unique in a
    shared store even when two people both call their experiment "pruning"."""
    last = path.rstrip("/").rsplit("/", 1)[-1] or "experiment"
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in last).lstrip(".-")
    return f"{readable[:100] or 'experiment'}-{blake3(path.encode()).hexdigest()[:8]}"


def absolute(path: str | os.PathLike[str]) -> str:
    """A URL as is; a local path made absolute now.

    Workers (processes, other machines) must not resolve a relative path against their own
    working directory: the 2020 implementation's processes scheduler broke exactly so.
    """
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


def is_url(location: str) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in location


def _read(backend: Backend) -> dict[str, Any] | None:
    try:
        raw = backend.read(MARKER)
    except ds.NotFoundError:
        return None
    try:
        marker: dict[str, Any] = json.loads(raw)
        if marker["format"] != FORMAT or not isinstance(marker["name"], str):
            raise ValueError(marker.get("format"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ds.StoreOpenError(
            f"{backend.url} has an unreadable {MARKER!r} marker ({exc})", url=backend.url
        ) from exc
    if marker["version"] != VERSION:
        raise ds.StoreOpenError(
            f"{backend.url} is an experiment of format version {marker['version']}; this dagger "
            f"reads version {VERSION}: use a matching dagger",
            url=backend.url,
        )
    return marker


def _first_keys(backend: Backend) -> list[str]:
    keys = []
    for key in backend.iter_keys():
        keys.append(key)
        if len(keys) >= 3:
            break
    return keys
