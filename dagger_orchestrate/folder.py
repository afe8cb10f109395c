"""The experiment folder: a marker naming the experiment and the store holding its records.

::

    <path>/dagger-experiment     JSON: {"format", "version", "name", "store"}, written once
    <path>/store/                the embedded store, unless the experiment uses a shared one

The records themselves (what ran, with which tags) live in the store, under the experiment's
name (``dagger_store.records``), so a shared store lists every experiment that uses it.

Where the marker's ``"store"`` points, so that a folder can be moved, copied (``mv``,
``cp -r``, ``rsync``) or seen through another mount point and stay whole:

- A relative path is relative to the folder: the embedded store is written as ``"store"``
  (marker version 2, which older dagger versions refuse instead of misreading).
- An absolute path or a URL (a shared store) is used as it is (marker version 1, as before).
- Markers written before version 2 name even the embedded store by its absolute path,
  ``<folder as it was>/store``. When that path holds no store (no ``dagger-store`` marker)
  but ``<folder>/store`` does, the folder moved with its store: ``<folder>/store`` is used.
  Nothing else is guessed: a local folder only, and only a recorded store named ``store``.
- ``store=`` given to ``open_folder`` (``Experiment(..., store=)``, ``restore``) wins.

Reading never creates: with ``create=False`` a local store that is not there is an error
naming the marker and every place looked at (a URL store is checked when it is opened).
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
from dagger_store.layout import MARKER as STORE_MARKER
from dagger_store.layout import check_name

MARKER = "dagger-experiment"
FORMAT = "dagger-experiment"
VERSION = 2  # written when the store is relative to the folder; 1 otherwise
READABLE = (1, 2)
EMBEDDED = "store"  # the embedded store, relative to its folder
STORE_ENV = "DAGGER_STORE"


@dataclass(frozen=True, slots=True)
class Folder:
    """An experiment folder, opened: where it is, its name, and its store's URL.

    ``store`` is resolved (an absolute path or a URL); ``marker`` is where the marker is and
    ``recorded`` what it says, for messages.
    """

    path: str
    name: str
    store: str
    marker: str = ""
    recorded: str = ""


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
    (a store that moved). A folder holding anything else is refused. Without ``create``
    nothing is made, and a local store that is not where the marker says (see the module
    docstring) raises StoreOpenError.
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
        store_url = absolute(store or os.environ.get(STORE_ENV) or _inside(path, EMBEDDED))
        embedded = store_url == _inside(path, EMBEDDED)
        document = {
            "format": FORMAT,
            "version": VERSION if embedded else 1,
            "name": check_name(name or default_name(path)),
            "store": EMBEDDED if embedded else store_url,
        }
        backend.write_once(MARKER, json.dumps(document, indent=1).encode())
        marker = _read(backend)  # a concurrent creator may have won: theirs is the one
        assert marker is not None
    if name is not None and name != marker["name"]:
        raise ValueError(
            f"{backend.url} is experiment {marker['name']!r}, not {name!r}; leave name out or "
            "use another folder"
        )
    where = _inside(path, MARKER)
    recorded: str = marker["store"]
    if store:
        found, looked = absolute(store), [absolute(store)]
    else:
        found, looked = _locate(path, recorded, backend.url)
    local = _local_path(found)
    if not create and local is not None and not _holds_store(local):
        if store:
            said = f"there is no store at {found}"
        else:
            meant = f" ({looked[0]})" if looked[0] != recorded else ""
            said = f"{where} names the store {recorded!r}{meant}, and there is no store there"
            said += "".join(f", nor at {place}" for place in looked[1:])
        raise ds.StoreOpenError(
            f"experiment {marker['name']!r} has no store: {said} (no {STORE_MARKER!r} "
            "marker). If the store moved, pass store= (dagger-lab: --store) with where it is "
            "now; nothing was created",
            url=found,
        )
    return Folder(path, marker["name"], found, where, recorded)


def _locate(path: str, recorded: str, folder_url: str) -> tuple[str, list[str]]:
    """The store the marker's ``recorded`` names, and where that was looked for (in order)."""
    if not (is_url(recorded) or os.path.isabs(recorded)):
        if is_url(path) and ".." in recorded.split("/"):
            raise ds.StoreOpenError(
                f"{folder_url}/{MARKER} names the store {recorded!r}: a store relative to a "
                "URL folder must lie inside it",
                url=folder_url,
            )
        return _inside(path, recorded), [_inside(path, recorded)]
    old, embedded = _local_path(recorded), _inside(path, EMBEDDED)
    if (
        old is not None
        and not is_url(path)
        and recorded.rstrip("/").rsplit("/", 1)[-1] == EMBEDDED
        and absolute(recorded) != embedded
        and not _holds_store(old)
    ):
        # A marker of version 1 names the embedded store by the folder's old absolute path.
        if _holds_store(embedded):
            return embedded, [recorded, embedded]
        return recorded, [recorded, embedded]
    return recorded, [recorded]


def _inside(path: str, relative: str) -> str:
    """``relative`` (a '/'-separated path) inside the folder ``path`` (a path or a URL)."""
    if is_url(path):
        return f"{path.rstrip('/')}/{relative.strip('/')}"
    return os.path.normpath(os.path.join(path, relative))


def _local_path(location: str) -> str | None:
    """The local path of ``location`` (a path or a ``file://`` URL); None for other URLs."""
    if location.startswith("file://"):
        return location[len("file://") :]
    return None if is_url(location) else location


def _holds_store(local: str) -> bool:
    return os.path.isfile(os.path.join(local, STORE_MARKER))


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
        if (
            marker["format"] != FORMAT
            or not isinstance(marker["name"], str)
            or not isinstance(marker["store"], str)
            or not marker["store"]
        ):
            raise ValueError(marker.get("format"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ds.StoreOpenError(
            f"{backend.url} has an unreadable {MARKER!r} marker ({exc})", url=backend.url
        ) from exc
    if marker["version"] not in READABLE:
        raise ds.StoreOpenError(
            f"{backend.url} is an experiment of format version {marker['version']}; this dagger "
            f"reads versions {', '.join(map(str, READABLE))}: use a matching dagger",
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
