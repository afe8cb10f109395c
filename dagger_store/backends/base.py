"""The backend seam: where bytes live, and nothing else.

Invariants every backend keeps (``dagger_store.testing.BackendContract`` checks them):

- Keys are ``/``-separated, relative to the backend root, made of ``[A-Za-z0-9._-]`` segments
  that do not start with ``.`` (so no ``..``). ``check_key`` enforces it before any I/O.
- ``write_once`` is atomic and exclusive: a reader sees all of a value or none of it, and of two
  concurrent writers of one key exactly one returns True; the other's bytes are discarded.
- ``exists_many`` answers for all keys in one batched round (concurrent on remote stores).
- Errors are translated here into the ``dagger_store.errors`` tree; nothing else leaks.
- A backend describes itself, so that nothing above the seam infers from its class or URL:
  ``remote`` (whether objects cross a network) and ``trusted_by_location()`` (whether where it
  is vouches for what it holds).
- Opening a backend creates nothing; ``SupportsCreate.create`` makes the location, called only
  by whoever is about to write there first (``open_store``, before a new store's marker).

Optional capabilities, each its own small protocol (``isinstance`` tells whether a backend has
it): ``SupportsReadInto`` (read into a caller's buffer), ``SupportsCreate`` (make the location
itself, e.g. a folder), and for garbage collection ``SupportsDelete``, ``SupportsDeleteMany``
(the same, batched), ``SupportsEntries`` (keys with size and modification time) and
``SupportsTouch`` (refresh a key's modification time). A modification time is the storage's own
clock (file mtime, S3 LastModified), in epoch seconds; ``write_once`` sets it, ``touch`` moves it
to now, nothing else changes it. Garbage collection relies on exactly that: a writer touches what
it reuses, and the collector deletes only what is older than its grace period, re-checked at the
moment of deletion (``delete(key, modified_before=...)``, ``delete_many``).

Policy (hashing, verification, layout, manifests) lives above the seam in ``Store``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dagger_store.errors import BackendError, InvalidKeyError

Buffer = bytes | bytearray | memoryview

# How often a write that finds its key present, then finds it gone, tries again (see below).
_REWRITES = 8

# A segment may not start with "." so that backends can keep private files (".tmp/") beside keys.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")  # one match per key: checked on every call


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid backend key, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"backend keys are str, got {type(key).__name__}: {key!r}")
    if not _KEY.fullmatch(key):
        raise InvalidKeyError(
            f"invalid backend key {key!r}: use '/'-separated segments of letters, digits, "
            "'.', '_' and '-' that do not start with '.' (so no empty, '.' or '..' segment)"
        )
    return key


@runtime_checkable
class Backend(Protocol):
    """Where bytes live. Keys are '/'-separated and relative to the backend root.

    Attributes
    ----------
    url
        Where the backend is, for messages: a URL (``file:///...``, ``s3://bucket/prefix``) that
        never carries credentials.
    remote
        Whether objects cross a network (S3): then a local read-through cache pays, and more
        workers than cores (round trips, not CPUs, bound the speed). False for memory and for a
        local or NFS folder.
    """

    url: str

    @property
    def remote(self) -> bool: ...

    def trusted_by_location(self) -> bool:
        """Whether where this backend is vouches for what it holds, so that data whose loading
        runs code (pickles) may load from it without signatures.

        True only where nobody but the current user can have written: this process's memory, a
        local folder whose store marker (else the folder itself) the current user owns. A remote
        store is False (anyone with write access there could have planted objects); a cache
        answers for its origin. May look at the storage (the owner of a file), never writes.
        """
        ...

    def read(self, key: str) -> bytes:
        """Return the whole value; NotFoundError if absent."""
        ...

    def write_once(self, key: str, *parts: Buffer) -> bool:
        """Store the concatenation of ``parts`` under ``key`` unless it exists.

        Returns True if this call created the key, False if it already existed (the existing
        value is kept untouched).
        """
        ...

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists, answered in one batched round."""
        ...

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix`` (a directory-like prefix ending in '/')."""
        ...


@runtime_checkable
class SupportsReadInto(Protocol):
    """A backend that can read part of a value straight into a caller's buffer (no copy)."""

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        """Fill ``out`` with the value's bytes from ``offset``; return how many were read."""
        ...


@runtime_checkable
class SupportsIdentity(Protocol):
    """A backend whose objects can say when they were replaced (``manifestmemo.py``)."""

    def identities(self, keys: Sequence[str]) -> list[tuple[int, ...] | None]:
        """Per key, a value that changes whenever the object there is deleted and written
        again (a file's inode, size, modification and change times); None where absent."""
        ...


@runtime_checkable
class SupportsCreate(Protocol):
    """A backend whose location itself must be made before anything is written there (a local
    folder). Opening a backend never creates anything: ``create`` is called by whoever is about
    to write there first (``open_store``, just before a new store's marker)."""

    def create(self) -> None:
        """Make the location (a folder: with its parents) if it is absent; StoreOpenError, saying
        what is in the way, if it cannot be made."""
        ...


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored key, its size in bytes and its modification time (epoch seconds)."""

    key: str
    size: int
    modified: float


@runtime_checkable
class SupportsEntries(Protocol):
    """A backend that lists keys with their size and modification time, as cheaply as keys."""

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        """An Entry for every key that starts with ``prefix`` (as ``iter_keys``)."""
        ...


@runtime_checkable
class SupportsDelete(Protocol):
    """A backend that can remove a key (garbage collection, unpinning, tidying leases)."""

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        """Remove ``key``; False if it was absent.

        With ``modified_before`` (epoch seconds), remove it only if it was last modified before
        that instant, checked as late as the storage allows (atomically where it can), and
        return False otherwise: a collector's decision from an old listing never removes what a
        writer has touched since.
        """
        ...


@runtime_checkable
class SupportsDeleteMany(Protocol):
    """A backend that removes many keys in batched rounds (S3: ``DeleteObjects``, 1,000 keys a
    request, instead of a HEAD and a DELETE per key). Garbage collection uses it where offered,
    else ``SupportsDelete`` key by key."""

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        """``[delete(key, modified_before=modified_before) for key in keys]``, batched.

        Whether this call removed each key, in order (a key given twice is removed once: True,
        then False). Every key is checked (``check_key``) before anything is removed. With
        ``modified_before``, a key is removed only if it was last modified before that instant,
        checked as late as the storage allows; where the check and the removal cannot be one
        atomic step, the backend's docstring says how long a touch can slip between them.
        """
        ...


@runtime_checkable
class SupportsWriteMany(Protocol):
    """A backend that writes a group of objects for less than one at a time (local: one flush
    of the file system for the group instead of two fsyncs per object). Others are written
    side by side on the store's pool (``Store``)."""

    def write_once_many(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], *, durable: bool = True
    ) -> list[bool]:
        """``[write_once(key, *parts) for key, parts in items]``, as one group: whether each
        was created, in order. ``durable=False``: the objects may be lost in a power cut (a
        lease: advice whose holder a power cut ends anyway), never seen partial."""
        ...


@runtime_checkable
class SupportsTouch(Protocol):
    """A backend that can refresh the modification time of a key without changing its value."""

    def touch(self, key: str) -> bool:
        """Set the modification time of ``key`` to now; False if it is absent."""
        ...


@runtime_checkable
class SupportsScratch(Protocol):
    """A backend with private scratch files beside its keys (local: temp files in ``.tmp/``
    before their atomic link), which a writer killed mid-write leaves behind.

    Scratch names (``Entry.key``) are not keys: they are never read, listed or written as such.
    """

    def iter_scratch(self) -> Iterator[Entry]:
        """Every scratch file, with its size and modification time."""
        ...

    def delete_scratch(self, name: str, *, modified_before: float) -> bool:
        """Remove scratch file ``name`` if it was last modified before ``modified_before``."""
        ...


def parts_size(parts: Sequence[Buffer]) -> int:
    """The bytes of an object written as ``parts``."""
    return sum(memoryview(part).nbytes for part in parts)


def fill(readinto: Callable[[memoryview], int | None], out: memoryview) -> int:
    """Call ``readinto`` until ``out`` is full or the source ends; how many bytes were read.

    A single ``readinto`` may stop short (large buffers, pipes, decompressors); loop without
    copying.
    """
    filled = 0
    while filled < len(out):
        n = readinto(out[filled:])
        if not n:
            break
        filled += n
    return filled


def refresh(backend: Backend, key: str) -> bool:
    """Touch ``key`` where the backend can; False only if the backend says it is gone.

    What a writer does to content it reuses instead of writing it: a garbage collector may be
    about to delete an old unreferenced object that the writer's next manifest will name, and
    the touch starts the collector's grace period again, as if the object had just been written.
    """
    if isinstance(backend, SupportsTouch):
        return backend.touch(key)
    return True


def write_or_refresh(backend: Backend, key: str, *parts: Buffer) -> bool:
    """``write_once``, refreshing the key if it exists already; True if this call created it.

    A key found present and then gone before the refresh (collected in between) is written again.
    """
    for _ in range(_REWRITES):
        if backend.write_once(key, *parts):
            return True
        if refresh(backend, key):
            return False
    raise BackendError(
        f"{key!r} in {backend.url} was present at each of {_REWRITES} writes and gone at each "
        "touch after it: is a garbage collector running with a grace period of almost nothing?",
        key=key,
    )
