"""Writing a large file around the page cache (Linux ``O_DIRECT``), for ``LocalBackend``.

A buffered write copies every byte into the page cache, and the kernel then writes the pages
out: on the virtual machines we measured, that copy alone ran at 230 to 320 MB/s, where the same
bytes written with ``O_DIRECT`` (straight from our buffer to the device) and fsynced took
0.8 to 1.4 GB/s. A run whose nodes produce tens of MB each waits on that difference.

Direct writes must be aligned: the buffer, the file offset and the length, to the device's
block. The parts of an object (a small header, then the payload) are copied through an aligned
buffer of ``CHUNK`` bytes (a memory copy costs ~1/10 of the write); the last block is padded
with zeros and the file then cut to its true size. The file is a temp file, linked into place
only once complete, so no reader sees the padding.

Used only on local block file systems known to honour it (``SUITED``): a network file system
(NFS) would send every write to the server synchronously, and some file systems refuse it. A
write that the file system refuses (EINVAL) is done buffered instead, and the caller stops
asking. ``DAGGER_DIRECT_IO=0`` turns it off.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dagger_store.backends.base import Buffer

if sys.platform == "linux":
    import fcntl

# Files at least this large are written directly; below, the device's round trip per write
# costs more than the copy saves (and a small file's pages are soon read again).
DIRECT_FROM = 1 << 20
# Bytes copied into the aligned buffer per write: 1 MiB wrote fastest of 256 KiB to 8 MiB.
CHUNK = 1 << 20
# Offsets and lengths are multiples of this (a page: a multiple of every block size in use).
ALIGN = 4096
SUITED = frozenset({"ext4", "xfs"})


def suits(path: Path) -> bool:
    """Whether files under ``path`` are to be written directly: Linux, a suited file system,
    not turned off by ``DAGGER_DIRECT_IO=0``."""
    if sys.platform != "linux" or os.environ.get("DAGGER_DIRECT_IO", "1") == "0":
        return False
    return file_system(path) in SUITED


def file_system(path: Path) -> str | None:
    """The type of the file system holding ``path`` (/proc/self/mountinfo: the mount with the
    longest mount point above it), or None if that cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                point = _unescape(fields.split()[4])
                above = target == point or target.startswith(point.rstrip("/") + "/")
                if above and len(point) >= len(best):
                    best, kind = point, rest.split()[0]
    except (OSError, IndexError):
        return None
    return kind


def _unescape(field: str) -> str:
    # mountinfo writes a space, tab, newline or backslash in a path as \040, \011, \012, \134
    # (and other characters as they are).
    return re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal.group(1), 8)), field)


def write(fd: int, parts: Sequence[Buffer], total: int) -> bool:
    """Write ``parts`` (``total`` bytes) at the start of the empty file ``fd`` around the page
    cache; False, having written nothing, if the file system refuses that (write it buffered
    then). An error of the disk (ENOSPC) is raised as it is."""
    try:
        _set_direct(fd, True)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    bounce = _bounce()
    filled = written = 0
    try:
        for part in parts:
            data = memoryview(part).cast("B")
            while data:
                n = min(CHUNK - filled, len(data))
                bounce[filled : filled + n] = data[:n]
                filled, data = filled + n, data[n:]
                if filled == CHUNK:
                    written += _write_block(fd, memoryview(bounce), written)
                    filled = 0
        if filled:
            padded = filled + (-filled % ALIGN)
            bounce[filled:padded] = bytes(padded - filled)
            _write_block(fd, memoryview(bounce)[:padded], written)
            os.ftruncate(fd, total)
    except OSError as exc:
        if exc.errno != errno.EINVAL or written:
            raise
        os.ftruncate(fd, 0)  # refused at the first block: nothing is lost by starting over
        _set_direct(fd, False)
        return False
    _set_direct(fd, False)
    return True


_local = threading.local()


def _bounce() -> mmap.mmap:
    """This thread's aligned buffer (an anonymous mapping is page-aligned), kept: a new one
    per file would cost its page faults each time, which on some virtual machines is most of
    what the copy through it costs."""
    bounce: mmap.mmap | None = getattr(_local, "bounce", None)
    if bounce is None:
        bounce = _local.bounce = mmap.mmap(-1, CHUNK)
    return bounce


def _write_block(fd: int, block: memoryview, offset: int) -> int:
    """Write an aligned ``block`` at ``offset``. A direct write that comes up short (a full
    disk, usually) leaves an unaligned rest: that is written buffered, and then fails or
    succeeds as any write would."""
    n = os.pwrite(fd, block, offset)
    if n < len(block):
        _set_direct(fd, False)
        rest = block[n:]
        while rest:
            k = os.pwrite(fd, rest, offset + n)
            rest, n = rest[k:], n + k
        _set_direct(fd, True)
    return len(block)


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
