"""Memory for loaded arrays, recycled: a large array that dies gives its pages to the next one
loaded, instead of giving them back to the system and asking for new ones.

A run loads a node's model, trains it, saves it and drops it, then loads the next node's model
of the same shapes. With ``np.empty`` the C allocator usually hands a freed block of several MB
back to the system, and the next load faults every page in again: on the virtual machines we
measured that costs ~1 ms a MB (a 20 MB model: 16 to 18 ms a load, 4 ms into pages in place).

``empty(shape, dtype)`` gives an array over an anonymous mapping taken from a small pool, or a
new one. The array's memory belongs to a ``_Lease`` (a ctypes buffer over the mapping), which
numpy keeps as the array's base; when the last array or view using it dies, the lease's
``__del__`` puts the mapping back in the pool, unless the pool holds ``POOL_BYTES`` already
(then it is unmapped). The mapping is private anonymous memory, as ``np.empty``'s: a forked
process gets its own copy-on-write, and what the pool holds counts in the process's resident
size, as a block kept by the allocator would.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
from typing import Any

import numpy as np

# Arrays at least this large come from the pool; smaller ones from np.empty, whose allocator
# keeps small blocks anyway.
RECYCLE_FROM = 1 << 20
# Idle mappings the pool keeps at most, in bytes: about one model's worth. Not more: a large
# array loaded once (a data set copied before it is known to be shared) would sit there idle.
POOL_BYTES = 32 << 20
# Windows' mmap has no private anonymous mappings: np.empty there.
_RECYCLES = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


class _Pool:
    """Idle mappings by size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[int, list[mmap.mmap]] = {}
        self.idle_bytes = 0

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                self.idle_bytes -= size
                return idle.pop()
        # Private: Python's default for an anonymous mapping is shared, which a forked
        # process would write through.
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give_back(self, mapping: mmap.mmap) -> None:
        size = len(mapping)
        with self._lock:
            if self.idle_bytes + size <= POOL_BYTES:
                self._idle.setdefault(size, []).append(mapping)
                self.idle_bytes += size


_pool = _Pool()


def empty(shape: tuple[int, ...] | list[int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A new writable array, uninitialised, as ``np.empty(shape, dtype)`` gives."""
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < RECYCLE_FROM or not _RECYCLES:
        return np.empty(shape, dtype=dtype)
    mapping = _pool.take(size)
    lease = _lease_type(size).from_buffer(mapping)
    lease.mapping = mapping
    return np.ndarray(shape, dtype=dtype, buffer=lease)


class _Returning:
    """Mixed into a ctypes buffer type: the mapping under it goes back to the pool when it
    dies (the pool is bound as a default: module globals may be gone at interpreter exit)."""

    mapping: mmap.mmap

    def __del__(self, pool: _Pool = _pool) -> None:
        pool.give_back(self.mapping)


@functools.lru_cache(maxsize=256)
def _lease_type(size: int) -> Any:
    """The ctypes buffer type of ``size`` bytes whose instances give their mapping back."""
    return type("_Lease", (_Returning, ctypes.c_char * size), {})
