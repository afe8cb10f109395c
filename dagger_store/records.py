"""Experiment records in a store: append-only, one immutable object per addition.

::

    v1/experiments/<name>/<time in ns>-<random>.<kind>     msgpack documents

Nothing is ever read-modified-written: two collaborators adding to one experiment at the same
time each write their own object, so nothing is lost and nothing needs a lock. An experiment is
the union of its records, oldest first. Every record lists the node keys it refers to under
``"keys"``: those are the roots a garbage collector must keep.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgpack

from dagger_store.errors import InvalidKeyError
from dagger_store.keys import NodeKey
from dagger_store.store import LAYOUT, Store

EXPERIMENTS = f"{LAYOUT}/experiments/"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_KIND = re.compile(r"[a-z]{1,16}")


def check_name(name: str) -> str:
    """Return ``name`` if it can name an experiment, else raise InvalidKeyError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidKeyError(
            f"invalid experiment name {name!r}: use up to 128 letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    return name


def add_record(
    store: Store, experiment: str, kind: str, keys: Iterable[NodeKey], document: dict[str, Any]
) -> str:
    """Append one record of ``kind`` to ``experiment``, referring to node ``keys``; its key."""
    check_name(experiment)
    if not _KIND.fullmatch(kind):
        raise InvalidKeyError(f"invalid record kind {kind!r}: use 1-16 lowercase letters")
    # Nanoseconds first, so names sort oldest first (to the clock's word) across machines.
    key = f"{EXPERIMENTS}{experiment}/{time.time_ns():020d}-{uuid.uuid4().hex}.{kind}"
    body = {**document, "keys": [k.hex for k in keys], "written": time.time()}
    store.backend.write_once(key, msgpack.packb(body, use_bin_type=True))
    return key


def read_records(store: Store, experiment: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``experiment`` (of one ``kind``, or all), oldest first."""
    prefix = f"{EXPERIMENTS}{check_name(experiment)}/"
    keys = sorted(
        k for k in store.backend.iter_keys(prefix) if kind is None or k.endswith(f".{kind}")
    )
    return [msgpack.unpackb(store.backend.read(k), raw=False) for k in keys]


def experiments(store: Store) -> list[str]:
    """The names of every experiment with records in ``store``, sorted."""
    names = {k[len(EXPERIMENTS) :].split("/", 1)[0] for k in store.backend.iter_keys(EXPERIMENTS)}
    return sorted(names)


def referenced_keys(store: Store) -> set[NodeKey]:
    """Every node key any record of any experiment refers to (roots for garbage collection)."""
    found: set[NodeKey] = set()
    for key in store.backend.iter_keys(EXPERIMENTS):
        found.update(NodeKey(h) for h in msgpack.unpackb(store.backend.read(key))["keys"])
    return found
