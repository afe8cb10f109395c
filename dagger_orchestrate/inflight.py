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
        if store.manifests([key]):
            return None
        lease = leases.acquire(store, key, terms.owner, terms.seconds)
        if lease is not None:
            if store.manifests([key]):  # committed just before we took it over
                leases.release(store, lease)
                return None
            return lease
        if deadline is not None and time.monotonic() > deadline:
            holder = leases.current(store, key)
            who = f"{holder.host} pid {holder.pid}" if holder else "another run"
            raise TimeoutError(
                f"waited {terms.wait:.0f} s for node {key.hex[:12]}, which {who} is computing; "
                "run again later, or raise wait_timeout"
            )
        time.sleep(delay)
        delay = min(delay * 2, _LONGEST_POLL)


@contextmanager
def holding(store: ds.Store, lease: leases.Lease, terms: LeaseTerms) -> Iterator[None]:
    """Renew ``lease`` every third of its time while the block runs; release it after."""
    stop = threading.Event()
    held = [lease]

    def renew() -> None:
        while not stop.wait(terms.seconds / 3):
            renewed = leases.renew(store, held[0], terms.seconds)
            if renewed is None:
                return  # taken over (we were too slow): the commit still decides
            held[0] = renewed

    renewer = threading.Thread(target=renew, name=f"dagger-lease-{lease.key.hex[:8]}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        leases.release(store, held[0])
