"""The backend seam: where bytes live, and nothing else.

Invariants every backend keeps (``dagger_store.testing.BackendContract`` checks them):

- Keys are ``/``-separated, relative to the backend root, made of ``[A-Za-z0-9._-]`` segments
  that do not start with ``.`` (so no ``..``). ``check_key`` enforces it before any I/O.
- ``write_once`` is atomic and exclusive: a reader sees all of a value or none of it, and of two
  concurrent writers of one key exactly one returns True; the other's bytes are discarded.
- ``exists_many`` answers for all keys in one batched round (concurrent on remote stores).
- Errors are translated here into the ``dagger_store.errors`` tree; nothing else leaks.

Policy (hashing, verification, layout, manifests) lives above the seam in ``Store``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from dagger_store.errors import InvalidKeyError

Buffer = bytes | bytearray | memoryview

# A segment may not start with "." so that backends can keep private files (".tmp/") beside keys.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid backend key, else raise InvalidKeyError."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"backend keys are str, got {type(key).__name__}: {key!r}")
    segments = key.split("/")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"invalid backend key {key!r}: use '/'-separated segments of letters, digits, "
                "'.', '_' and '-' that do not start with '.' (so no empty, '.' or '..' segment)"
            )
    return key


@runtime_checkable
class Backend(Protocol):
    """Where bytes live. Keys are '/'-separated and relative to the backend root."""

    url: str

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
