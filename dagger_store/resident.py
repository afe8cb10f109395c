"""Large staged blobs resident in sealed memory files: lent out copy-on-write, and recognised
unchanged when put back, without copying or hashing their bytes again.

A run that computes a child in its parent's process used to copy every large array of the
parent's state into the child (as plain Python's ``deepcopy`` does), then hash all of them again
when the child was saved, although a data set that no recipe touches is the same bytes at every
node. Here a large blob that a stage puts (``Store.put`` inside ``Store.staged``) is copied once
into a ``Region``: a memory file (Linux ``memfd``) sealed against any change once filled. Then:

- ``Region.private()`` lends the bytes out as a private mapping of that file: no copy; the
  first write to a page copies that page alone, and only for that mapping, so siblings never
  see each other's writes, and the region never changes.
- ``pristine(view)``: when an array on such a mapping is put back, the kernel's page table
  says whether any of its pages was written (``/proc/self/pagemap``: a page written through a
  private mapping becomes anonymous memory, bit 61 clear, or is swapped, bit 62). None was: its
  bytes are the sealed file's, whose digest is known. This is a proof, not a guess: an
  unwritten page of the mapping can only show the file's page, and the seal forbids any write
  to the file. Checking costs 8 bytes of page table per 4 KB page. The same table says how
  much of it was written (``written_share``): an array rewritten whole is better copied than
  mapped by whoever reads it next (a page faulted in and copied at each page's first write
  costs about four times a copy into memory in place).

Where any part of this is missing (not Linux, no memfd sealing, a pagemap that is unreadable
or does not behave as the self-test at first use expects), ``available()`` is False and the
store copies and hashes as before. ``DAGGER_RESIDENT=0`` turns it off.

Each region holds two file descriptors (its own, and its read-only mapping's: Python's mmap
keeps one), and each lent mapping one more: at most ``MAX_REGIONS`` regions and ``MAX_LENT``
mappings are alive at once; beyond them the store copies, as without this module.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dagger_store.digest import Digest

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows: no sealed memory files, so no regions
    fcntl = None

# Blobs at least this large are made resident: below it a copy costs less than a mapping.
RESIDENT_FROM = 1024 * 1024
MAX_REGIONS = 256
MAX_LENT = 256

_PAGE = mmap.PAGESIZE
# /proc/self/pagemap: one little-endian 64-bit entry per page; in its top byte, bit 7 is
# "present", bit 6 "swapped", bit 5 "file page or shared anonymous".
_PRESENT, _SWAPPED, _FILE_OR_SHARED = 0x80, 0x40, 0x20
_UNWRITTEN_TOP_BYTES = bytes(
    b for b in range(256) if not b & _SWAPPED and (not b & _PRESENT or b & _FILE_OR_SHARED)
)
_SEALS = ("F_SEAL_WRITE", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL")


class Region:
    """One blob's bytes in a sealed memory file (see the module docstring).

    Made empty (``Region.new``), filled by ``fill`` (from several threads at once: each writes
    its own range), then ``seal``ed with the blob's digest and its leaves'; only then is it read.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._fd = fd
        self._view: memoryview | None = None
        self.digest: Digest | None = None
        self.leaves: tuple[Digest, ...] = ()
        weakref.finalize(self, _close_region, fd)

    @classmethod
    def new(cls, size: int) -> Region | None:
        """An empty region of ``size`` bytes; None when unavailable or at MAX_REGIONS."""
        if not available() or size < 1:
            return None
        with _lock:
            if _counts["regions"] >= MAX_REGIONS:
                return None
            _counts["regions"] += 1
        try:
            fd = os.memfd_create("dagger-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            _close_region(None)
            return None
        try:
            os.ftruncate(fd, size)
            return cls(fd, size)
        except OSError:
            _close_region(fd)
            return None

    def fill(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` (releases the GIL while the kernel copies)."""
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def seal(self, digest: Digest, leaves: Sequence[Digest]) -> None:
        """No byte may change from here on; the region holds the blob ``digest``."""
        fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, _seal_flags())
        # Mapped (a shared mapping, even read-only, would have stopped the seal) and
        # populated: the region's memory counts in the process's resident size (VmRSS) from
        # here for as long as it lives, as a copy's would; only while it is filled does not.
        self._view = memoryview(
            mmap.mmap(
                self._fd,
                self.size,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ,
            )
        )
        self.digest, self.leaves = digest, tuple(leaves)

    def view(self, offset: int = 0, size: int | None = None) -> memoryview:
        """Read-only bytes of the region, once sealed."""
        assert self._view is not None, "a region is read once sealed"
        end = self.size if size is None else offset + size
        return self._view[offset:end]

    def private(self) -> mmap.mmap | None:
        """A writable copy-on-write mapping of the sealed bytes, which ``pristine`` recognises
        while it lives; None at MAX_LENT mappings alive."""
        assert self.digest is not None, "a region is lent out once sealed"
        with _lock:
            if _counts["lent"] >= MAX_LENT:
                return None
            _counts["lent"] += 1
        try:
            mapped = mmap.mmap(
                self._fd,
                self.size,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError:
            _forget(None, None)
            return None
        address = _address(memoryview(mapped))
        lent = _Lent(weakref.ref(mapped), self)
        with _lock:
            _lent[address] = lent
        weakref.finalize(mapped, _forget, address, lent)
        return mapped


@dataclass(frozen=True, slots=True)
class _Lent:
    mapping: weakref.ref[mmap.mmap]
    region: Region


_lock = threading.Lock()
_lent: dict[int, _Lent] = {}  # start address of a lent mapping -> it
_counts = {"regions": 0, "lent": 0}


def _close_region(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
    with _lock:
        _counts["regions"] -= 1


def _forget(address: int | None, lent: _Lent | None) -> None:
    # Called after the mapping is gone: a new one may be at the same address already.
    with _lock:
        _counts["lent"] -= 1
        if address is not None and _lent.get(address) is lent:
            del _lent[address]


def lent(view: memoryview) -> Region | None:
    """The sealed region whose lent mapping ``view`` covers exactly, written to or not; else
    None (a view of anything else, or read-only)."""
    if view.readonly or not view.nbytes or not _lent:
        return None
    with _lock:
        lent = _lent.get(_address(view))
    if lent is None or lent.region.size != view.nbytes:
        return None
    if lent.mapping() is None:  # gone; the address belongs to something else now
        return None
    return lent.region


def pristine(view: memoryview) -> Region | None:
    """The sealed region whose lent mapping ``view`` covers exactly, if not a page of it was
    written; else None (a view of anything else, read-only, or written to)."""
    region = lent(view)
    return region if region is not None and not written_share(view) else None


def written_share(view: memoryview) -> float:
    """Of the pages of the lent mapping ``view`` covers (see ``lent``), the share written to
    since it was lent: 0.0 means its bytes are still the region's."""
    return _written_share(_address(view), view.nbytes)


def _seal_flags() -> int:
    flags = 0
    for name in _SEALS:
        flags |= getattr(fcntl, name)
    return flags


def _address(view: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _written_share(address: int, size: int) -> float:
    """The share of the pages of a private file mapping at ``address`` that were written:
    each page is absent (never touched), the file's own page, or written (anonymous or
    swapped out). A page table that cannot be read counts as all written."""
    first, last = address // _PAGE, (address + size - 1) // _PAGE
    count = last - first + 1
    data = os.pread(_pagemap(), count * 8, first * 8)
    if len(data) != count * 8:
        return 1.0
    # The flags are the top byte of each little-endian entry: drop the entries of pages
    # unwritten, in C; what is left are the written ones.
    return len(data[7::8].translate(None, _UNWRITTEN_TOP_BYTES)) / count


_pagemaps: dict[int, int] = {}  # pid -> its open pagemap (a forked child opens its own)


def _pagemap() -> int:
    pid = os.getpid()
    fd = _pagemaps.get(pid)
    if fd is None:
        fd = _pagemaps[pid] = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    return fd


@functools.cache
def available() -> bool:
    """Whether regions work here: switched on, and a self-test of the whole mechanism passes
    (a sealed page, lent out, reads as unwritten until written, then as written)."""
    if os.environ.get("DAGGER_RESIDENT", "1") == "0":
        return False
    if not hasattr(os, "memfd_create") or not all(
        hasattr(fcntl, s) for s in (*_SEALS, "F_ADD_SEALS")
    ):
        return False
    try:
        return _self_test()
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _self_test() -> bool:
    fd = os.memfd_create("dagger-self-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, _PAGE)
        os.pwrite(fd, b"\x01" * _PAGE, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _seal_flags())
        mapped = mmap.mmap(fd, _PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            view = memoryview(mapped)
            address = _address(view)
            untouched = _written_share(address, _PAGE) == 0
            read = view[0] == 1 and _written_share(address, _PAGE) == 0
            view[0] = 2
            written = _written_share(address, _PAGE) == 1
            original = os.pread(fd, 1, 0) == b"\x01"
            view.release()
            return untouched and read and written and original
        finally:
            mapped.close()
    finally:
        os.close(fd)
