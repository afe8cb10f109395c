"""Experiment records in a store: append-only, one immutable object per addition.

::

    v1/experiments/<name>/<time in ns>-<random>.<kind>     msgpack documents

Nothing is ever read-modified-written: two collaborators adding to one experiment at the same
time each write their own object, so nothing is lost and nothing needs a lock. An experiment is
the union of its records, oldest first. Every record lists the node keys it refers to under
``"keys"``: those are the roots a garbage collector must keep. Names and the experiment name
rule (``check_name``) are ``layout.py``'s.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgpack

from dagger_store.keys import NodeKey
from dagger_store.layout import (
    EXPERIMENTS,
    check_name,
    experiment_prefix,
    record_experiment,
    record_key,
    record_kind,
)
from dagger_store.store import Store

__all__ = ["add_record", "check_name", "experiments", "read_records", "referenced_keys"]


def add_record(
    store: Store, experiment: str, kind: str, keys: Iterable[NodeKey], document: dict[str, Any]
) -> str:
    """Append one record of ``kind`` to ``experiment``, referring to node ``keys``; its key."""
    # Nanoseconds first, so names sort oldest first (to the clock's word) across machines.
    key = record_key(experiment, kind, time.time_ns(), uuid.uuid4().hex)
    body = {**document, "keys": [k.hex for k in keys], "written": time.time()}
    store.backend.write_once(key, msgpack.packb(body, use_bin_type=True))
    return key


def read_records(store: Store, experiment: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``experiment`` (of one ``kind``, or all), oldest first."""
    prefix = experiment_prefix(experiment)
    keys = sorted(
        k for k in store.backend.iter_keys(prefix) if kind is None or record_kind(k) == kind
    )
    return [msgpack.unpackb(store.backend.read(k), raw=False) for k in keys]


def experiments(store: Store) -> list[str]:
    """The names of every experiment with records in ``store``, sorted."""
    return sorted({record_experiment(k) for k in store.backend.iter_keys(EXPERIMENTS)})


def referenced_keys(store: Store) -> set[NodeKey]:
    """Every node key any record of any experiment refers to (roots for garbage collection)."""
    found: set[NodeKey] = set()
    for key in store.backend.iter_keys(EXPERIMENTS):
        found.update(NodeKey(h) for h in msgpack.unpackb(store.backend.read(key))["keys"])
    return found
