"""In-flight dedup: take a node's lease before computing it, or wait for whoever holds it.

Two runs (two collaborators, two processes) that need the same missing node: the first takes
the lease (``dagger_store.leases``) and computes; the other polls, with backoff, until the node's
manifest appears, and takes over if the holder dies (its lease expires unrenewed). The holder
renews its lease from a background thread while the recipe runs. Correctness never depends on
this: the manifest's create-if-absent decides.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagger_store as ds
from dagger_store import leases

_FIRST_POLL = 0.05
_LONGEST_POLL = 2.0
# Seconds a run waits for the holder of a node it found committed to let the lease go.
_HANDOVER = 2.0


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """How one run leases: its owner id, the lease time, and how long it may wait (None: as
    long as the holder is alive)."""

    owner: str
    seconds: float = 60.0
    wait: float | None = None


def claim(store: ds.Store, key: ds.NodeKey, terms: LeaseTerms) -> leases.Lease | None:
    """The lease on ``key``, or None once another run has committed the node.

    Blocks while another live run holds the lease.
    """
    delay = _FIRST_POLL
    deadline = None if terms.wait is None else time.monotonic() + terms.wait
    while True:
        # (The run's plan has just found no manifest: the lease comes first.)
        lease = leases.acquire(store, key, terms.owner, terms.seconds)
        if lease is not None:
            if _committed(store, key):  # by a run whose lease ended before we took ours
                leases.release(store, lease)
                return None
            return lease
        if _committed(store, key):
            _handed_over(store, key)
            return None
        if deadline is not None and time.monotonic() > deadline:
            holder = leases.current(store, key)
            who = f"{holder.host} pid {holder.pid}" if holder else "another run"
            raise TimeoutError(
                f"waited {terms.wait:.0f} s for node {key.hex[:12]}, which {who} is computing; "
                "run again later, or raise wait_timeout"
            )
        time.sleep(delay)
        delay = min(delay * 2, _LONGEST_POLL)


def _handed_over(store: ds.Store, key: ds.NodeKey) -> None:
    """Wait (at most ``_HANDOVER`` seconds) for the holder of the lease on ``key``, committed
    now, to let it go. A run that writes behind takes the leases of the children it is already
    computing just before it lets the parent's go: a run that went on to those children as soon
    as it saw the parent's manifest could take a lease first and compute a child twice."""
    deadline = time.monotonic() + _HANDOVER
    delay = _FIRST_POLL / 5
    while time.monotonic() < deadline:
        holder = leases.current(store, key)
        if holder is None or not holder.live():
            return
        time.sleep(delay)
        delay = min(delay * 2, _LONGEST_POLL)


def _committed(store: ds.Store, key: ds.NodeKey) -> bool:
    # A node the plan found missing mostly still has no manifest at all: one existence
    # question says so; only where there is one is it read (it may be incomplete).
    return store.has_manifests([key])[0] and bool(store.manifests([key]))


class Keeper:
    """Renews the leases a run holds, all from one thread, every third of the lease time,
    until they are released (in batches: ``release``)."""

    def __init__(self, store: ds.Store, terms: LeaseTerms) -> None:
        self._store = store
        self._terms = terms
        self._held: dict[ds.NodeKey, leases.Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="dagger-leases", daemon=True)
        self._thread.start()

    def hold(self, lease: leases.Lease) -> None:
        with self._lock:
            self._held[lease.key] = lease

    def take(self, key: ds.NodeKey) -> None:
        """Acquire the lease on ``key`` and hold it, unless another run holds it (advice: the
        caller computes anyway, and the commit decides)."""
        lease = leases.acquire(self._store, key, self._terms.owner, self._terms.seconds)
        if lease is not None:
            self.hold(lease)

    def release(self, keys: list[ds.NodeKey]) -> None:
        with self._lock:
            gone = [lease for key in keys if (lease := self._held.pop(key, None)) is not None]
        leases.release_many(self._store, gone)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.release(list(self._held))

    def _renew(self) -> None:
        while not self._stop.wait(self._terms.seconds / 3):
            with self._lock:
                held = list(self._held.values())
            for lease in held:
                renewed = leases.renew(self._store, lease, self._terms.seconds)
                with self._lock:
                    if lease.key not in self._held:
                        if renewed is not None:  # released meanwhile: so is this generation
                            leases.release(self._store, renewed)
                    elif renewed is None:  # taken over (we were too slow): the commit decides
                        del self._held[lease.key]
                    else:
                        self._held[lease.key] = renewed


@contextmanager
def holding(store: ds.Store, lease: leases.Lease, terms: LeaseTerms) -> Iterator[None]:
    """Renew ``lease`` every third of its time while the block runs; release it after."""
    keeper = Keeper(store, terms)
    keeper.hold(lease)
    try:
        yield
    finally:
        keeper.close()
