"""Leases: who is computing a node right now, so that others wait instead of computing it twice.

::

    v1/leases/<node hex>/<generation>     msgpack {owner, host, pid, user, expires}

A lease is a chain of write-once objects: generation n+1 is written only by whoever wins its
create-if-absent, so acquiring, renewing and taking over an expired lease all go through the same
atomic primitive as everything else (no overwrite, no lock server). The latest generation tells
who holds the lease and until when.

Leases are advice, never correctness: two runs that both compute a node (a lease expired while
its owner was merely slow) still commit through the manifest's create-if-absent, first writer
wins. Clocks: expiry is wall-clock time, so hosts sharing a store need roughly synchronised
clocks (NTP); a skew smaller than the lease time only delays a takeover.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import msgpack

from dagger_store.backends.base import SupportsDeleteMany, SupportsWriteMany
from dagger_store.errors import NotFoundError, StoreError
from dagger_store.host import host, user
from dagger_store.keys import NodeKey
from dagger_store.layout import LEASES, lease_generation, lease_key, lease_prefix, leased_node
from dagger_store.store import Store


@dataclass(frozen=True, slots=True)
class Lease:
    """Generation ``generation`` of the lease on ``key``, held by ``owner`` until ``expires``."""

    key: NodeKey
    owner: str
    generation: int
    expires: float
    host: str = ""
    pid: int = 0

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)


def current(store: Store, key: NodeKey) -> Lease | None:
    """The latest generation of the lease on ``key``, live or not; None if never leased."""
    generations = sorted(lease_generation(k) for k in store.backend.iter_keys(lease_prefix(key)))
    for generation in reversed(generations):
        try:
            return _decode(key, generation, store.backend.read(lease_key(key, generation)))
        except NotFoundError:  # released and removed meanwhile: look at the one before
            continue
    return None


def acquire(store: Store, key: NodeKey, owner: str, seconds: float) -> Lease | None:
    """Take the lease on ``key`` for ``seconds`` unless someone else holds a live one.

    Returns the lease, or None when another owner holds it (or won the race to take it).
    An expired lease is taken over.
    """
    # Most nodes were never leased: their first generation costs one write and no listing.
    first = _write(store, key, owner, seconds, 0)
    if first is not None:
        return first
    latest = current(store, key)
    if latest is not None and latest.live() and latest.owner != owner:
        return None
    return _write(store, key, owner, seconds, 0 if latest is None else latest.generation + 1)


def renew(store: Store, lease: Lease, seconds: float) -> Lease | None:
    """Extend ``lease``; None if it was lost (someone took it over after it expired)."""
    return _write(store, lease.key, lease.owner, seconds, lease.generation + 1)


def release(store: Store, lease: Lease) -> None:
    """Give ``lease`` up now, so waiters need not wait for its expiry; never raises."""
    release_many(store, [lease])


def release_many(store: Store, held: Sequence[Lease]) -> None:
    """``release`` each lease; first generations (a lease never renewed nor taken over: the
    whole chain is ours) in one batched delete where the backend has one."""
    backend = store.backend
    firsts = [lease for lease in held if lease.generation == 0]
    if isinstance(backend, SupportsDeleteMany) and len(firsts) > 1:
        with suppress(StoreError):  # advice only: an expiry frees them anyway
            backend.delete_many([lease_key(lease.key, 0) for lease in firsts])
        held = [lease for lease in held if lease.generation != 0]
    for lease in held:
        _release(store, lease)


def _release(store: Store, lease: Lease) -> None:
    try:
        delete = getattr(store.backend, "delete", None)
        if delete is None:  # cannot tidy: end the chain with an already-expired generation
            _write(store, lease.key, lease.owner, 0.0, lease.generation + 1)
            return
        if lease.generation == 0:  # the whole chain is ours: no listing
            delete(lease_key(lease.key, 0))
            return
        # Remove our part of the chain; a newer generation is a new holder's: keep it.
        for old in list(store.backend.iter_keys(lease_prefix(lease.key))):
            if lease_generation(old) <= lease.generation:
                delete(old)
    except StoreError:
        pass  # advice only: an expiry frees it anyway


def live_keys(store: Store, now: float | None = None) -> set[NodeKey]:
    """Every node key with a live lease (roots that garbage collection must keep)."""
    now = time.time() if now is None else now
    found = set()
    for node in {leased_node(k) for k in store.backend.iter_keys(LEASES)}:
        lease = current(store, node)
        if lease is not None and lease.live(now):
            found.add(lease.key)
    return found


def _write(store: Store, key: NodeKey, owner: str, seconds: float, generation: int) -> Lease | None:
    lease = Lease(key, owner, generation, time.time() + seconds, host(), os.getpid())
    document = {
        "owner": owner,
        "expires": lease.expires,
        "host": lease.host,
        "pid": lease.pid,
        "user": user(),
    }
    name, data = lease_key(key, generation), msgpack.packb(document, use_bin_type=True)
    backend = store.backend
    if isinstance(backend, SupportsWriteMany):  # not durable: a power cut ends its holder too
        created = backend.write_once_many([(name, (data,))], durable=False)[0]
    else:
        created = backend.write_once(name, data)
    return lease if created else None


def _decode(key: NodeKey, generation: int, data: bytes) -> Lease:
    doc = msgpack.unpackb(data, raw=False)
    return Lease(key, doc["owner"], generation, doc["expires"], doc["host"], doc["pid"])
