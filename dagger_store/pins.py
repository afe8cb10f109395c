"""Pins: named sets of node keys that garbage collection keeps, whoever refers to them or not.

::

    v1/pins/<name>      msgpack {"keys": [node key hex, ...], "pinned": epoch seconds}

A pin is written once, like everything else: to change one, unpin it and pin again. Pinning a
key keeps its manifest and, through it, every blob it names; it does not keep the node's
ancestors (a manifest names all of a node's attributes, inherited ones included).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgpack

from dagger_store.backends.base import SupportsDelete
from dagger_store.errors import FormatError, NotFoundError, PinExistsError
from dagger_store.keys import NodeKey
from dagger_store.layout import PINS, pin_key, pin_name
from dagger_store.store import Store

__all__ = ["PinExistsError", "pin", "pins", "unpin"]


def pin(store: Store, name: str, keys: Iterable[NodeKey]) -> None:
    """Keep the nodes ``keys`` (their manifests and blobs) through garbage collection.

    Parameters
    ----------
    name
        Up to 128 letters, digits, '.', '_' and '-', not starting with '.' or '-'.
    keys
        The node keys to keep; at least one.

    Raises
    ------
    PinExistsError
        A pin called ``name`` exists: ``unpin`` it first to replace it.
    """
    path = pin_key(name)
    keys = list(keys)
    for key in keys:
        if not isinstance(key, NodeKey):
            raise TypeError(f"pin keys are NodeKeys, got {type(key).__name__}: {key!r}")
    if not keys:
        raise ValueError(f"pin {name!r} names no node key: pin at least one")
    document = {"keys": sorted({k.hex for k in keys}), "pinned": time.time()}
    data = msgpack.packb(document, use_bin_type=True)
    if not store.backend.write_once(path, data) and not _is(store, path, data):
        raise PinExistsError(
            f"a pin called {name!r} exists already in {store.url}; pins are written once: "
            f"unpin {name!r} first to replace it, or choose another name",
            name=name,
        )


def _is(store: Store, path: str, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data``: our own write, landed on an earlier attempt
    whose answer was lost (a retried create-if-absent then finds it taken)."""
    try:
        return store.backend.read(path) == data
    except NotFoundError:
        return False


def unpin(store: Store, name: str) -> None:
    """Remove the pin called ``name``; NotFoundError if there is none."""
    path = pin_key(name)
    backend = store.backend
    if not isinstance(backend, SupportsDelete):
        raise TypeError(f"{store.url} cannot delete objects, so pins cannot be removed from it")
    if not backend.delete(path):
        raise NotFoundError(f"no pin called {name!r} in {store.url}", key=path)


def pins(store: Store) -> dict[str, list[NodeKey]]:
    """Every pin in ``store``: its name and the node keys it keeps, sorted."""
    found: dict[str, list[NodeKey]] = {}
    for path in store.backend.iter_keys(PINS):
        try:
            data = store.backend.read(path)
        except NotFoundError:
            continue  # unpinned since it was listed
        try:
            keys = [NodeKey(h) for h in msgpack.unpackb(data, raw=False)["keys"]]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise FormatError(
                f"{path!r} in {store.url} is not a pin ({exc}): delete it, or fix what wrote it",
                key=path,
            ) from exc
        found[pin_name(path)] = keys
    return dict(sorted(found.items()))
