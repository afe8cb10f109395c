"""A remote backend (the origin) with a local read-through copy of what it reads.

Every stored object is immutable (blobs are content-addressed, manifests written once), so a
cached copy never goes stale and needs no invalidation. Existence is always asked of the origin,
the authority: a blob the cache still holds may be gone there, and a manifest committed on the
strength of the cache's word would name a blob that others cannot read.

Garbage collection goes to the origin too: entries and touches are the origin's, and a delete
removes the origin's object, then the cached copy (a copy of a deleted object would still be
served to this reader, harmlessly, since it cannot be wrong; but it would only take space).

The cache describes itself as its origin does: as remote (writes and existence still cross the
network), and trusted by location exactly when the origin is (the cache holds what the origin
handed out).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from dagger_store.backends.base import (
    Backend,
    Buffer,
    Entry,
    SupportsDelete,
    SupportsDeleteMany,
    SupportsEntries,
    SupportsTouch,
    check_key,
)
from dagger_store.backends.local import LocalBackend
from dagger_store.errors import NotFoundError


class CachedBackend:
    """Reads from ``cache`` when it can, else from ``origin`` (keeping a copy in ``cache``)."""

    def __init__(self, origin: Backend, cache: LocalBackend) -> None:
        self.origin = origin
        self.cache = cache
        self.url = origin.url

    @property
    def remote(self) -> bool:
        return self.origin.remote

    def trusted_by_location(self) -> bool:
        return self.origin.trusted_by_location()

    def read(self, key: str) -> bytes:
        try:
            return self.cache.read(key)
        except NotFoundError:
            data = self.origin.read(key)
            self.cache.write_once(key, data)
            return data

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        try:
            return self.cache.read_into(key, offset, out)
        except NotFoundError:
            data = memoryview(self.read(key))[offset : offset + len(out)]
            out[: len(data)] = data
            return len(data)

    def write_once(self, key: str, *parts: Buffer) -> bool:
        created = self.origin.write_once(key, *parts)
        if created:
            self.cache.write_once(key, *parts)
        return created

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return self.origin.exists_many(keys)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return self.origin.iter_keys(prefix)

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        if not isinstance(self.origin, SupportsEntries):
            raise _incapable(self.origin, "list entries")
        return self.origin.iter_entries(prefix)

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        if not isinstance(self.origin, SupportsDelete):
            raise _incapable(self.origin, "delete")
        deleted = self.origin.delete(key, modified_before=modified_before)
        if deleted:
            self.cache.delete(key)
        return deleted

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        origin = self.origin
        if isinstance(origin, SupportsDeleteMany):
            deleted = origin.delete_many(keys, modified_before=modified_before)
        elif isinstance(origin, SupportsDelete):
            for key in keys:
                check_key(key)
            deleted = [origin.delete(key, modified_before=modified_before) for key in keys]
        else:
            raise _incapable(origin, "delete")
        for key, gone in zip(keys, deleted, strict=True):
            if gone:
                self.cache.delete(key)
        return deleted

    def touch(self, key: str) -> bool:
        if not isinstance(self.origin, SupportsTouch):
            raise _incapable(self.origin, "touch")
        return self.origin.touch(key)


def _incapable(origin: Backend, what: str) -> TypeError:
    return TypeError(f"the origin backend {origin.url} cannot {what}")
