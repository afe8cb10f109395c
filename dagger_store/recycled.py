"""Memory recycled: a large buffer that dies gives its pages to the next one of its size,
instead of giving them back to the system and asking for new ones.

A run loads a node's model, trains it, saves it and drops it, then loads the next node's model
of the same shapes; a stage copies what a recipe rewrote, the writer writes it and drops it.
With ``np.empty`` or a fresh mapping the C allocator usually hands a freed block of several MB
back to the system, and the next one faults every page in again: on the virtual machines we
measured that costs ~1 ms a MB (a 20 MB model: 16 to 18 ms a load, 4 ms into pages in place).

``buffer(size)`` gives a writable ctypes buffer over an anonymous mapping taken from a small
pool, or a new one. That buffer is a ``_Lease``, which numpy keeps as the base of an array on
it; when the last array, view or memoryview using it dies, its ``__del__`` puts the mapping
back in the pool, unless the pool holds ``POOL_BYTES`` already (then it is unmapped). The
mapping is private anonymous memory, as ``np.empty``'s: a forked process gets its own
copy-on-write, and what the pool holds counts in the process's resident size, as a block kept
by the allocator would.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
from typing import Any

# Buffers at least this large come from the pool; smaller ones are cheaper from the allocator,
# which keeps small blocks anyway.
RECYCLE_FROM = 1 << 20
# Idle mappings the pool keeps at most, in bytes: about one model's worth. Not more: a large
# array loaded once (a data set copied before it is known to be shared) would sit there idle.
POOL_BYTES = 32 << 20
# Windows' mmap has no private anonymous mappings: no pool there.
AVAILABLE = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
# How far down an object's chain of bases ``leased`` looks (an array, its reshaped and
# byte views, the lease).
_BASES_SEARCHED = 8


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


def buffer(size: int) -> Any:
    """A new writable buffer of ``size`` bytes (at least ``RECYCLE_FROM``), uninitialised:
    a ctypes ``c_char`` array, usable wherever a buffer is (``np.ndarray(buffer=...)``,
    ``memoryview``). Needs ``AVAILABLE``."""
    assert AVAILABLE and size >= RECYCLE_FROM, "recycled buffers are large, and need mmap"
    mapping = _pool.take(size)
    lease = _lease_type(size).from_buffer(mapping)
    lease.mapping = mapping
    return lease


def copy(view: memoryview) -> memoryview:
    """A copy of the bytes of ``view`` (C-contiguous, at least ``RECYCLE_FROM`` long) in
    memory of its own: a recycled buffer, or where there is none a new anonymous mapping (no
    heap: a stream of megabyte-sized copies would leave the process's resident size far
    above what it holds). A writable ``view`` is copied without holding the GIL: the other
    threads of a stage hash meanwhile."""
    size = view.nbytes
    out = memoryview(buffer(size) if AVAILABLE else mmap.mmap(-1, size)).cast("B")
    if view.readonly:
        out[:] = view
    else:
        ctypes.memmove(_address(out), _address(view), size)
    return out


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def leased(value: object) -> bool:
    """Whether ``value`` (an array, a view of one, a memoryview) lies on a recycled buffer."""
    for _ in range(_BASES_SEARCHED):
        if value is None:
            return False
        if isinstance(value, _Returning):
            return True
        value = value.obj if isinstance(value, memoryview) else getattr(value, "base", None)
    return False


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
