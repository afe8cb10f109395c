"""StoreRef: how any worker (thread, process, machine) opens the experiment's store."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import dagger_store as ds


@dataclass(frozen=True, slots=True)
class StoreRef:
    """A store's URL and how to open it: small, picklable, and opened once per process."""

    url: str
    storage_options: tuple[tuple[str, Any], ...] = ()
    # Used only if the backend says it is remote: a local read-through copy. "~" is expanded on
    # the machine that opens the store, so each worker caches on its own disk.
    cache_dir: str | None = None
    trust: bool | None = None  # open_store's trust: may pickled attributes load from here
    # open_store's create: False for a reference made to read (Experiment.restore), so that
    # neither it nor its workers ever leave an empty store behind a wrong path.
    create: bool = True

    def open(self, *, fresh: bool = False) -> ds.Store:
        """The process's Store for this URL; ``fresh`` opens (and checks) it anew.

        Without ``create``, a store that is not there raises StoreOpenError.
        """
        key = (self.url, repr((self.storage_options, self.trust)))  # options: unhashable dicts
        with _stores_lock:
            if fresh or key not in _stores:
                backend = ds.open_backend(self.url, dict(self.storage_options))
                cache = self.cache_dir if backend.remote else None
                _stores[key] = ds.open_store(
                    backend,
                    cache_dir=os.path.expanduser(cache) if cache else None,
                    trust=self.trust,
                    create=self.create,
                )
            return _stores[key]


_stores: dict[tuple[str, str], ds.Store] = {}
_stores_lock = threading.Lock()
