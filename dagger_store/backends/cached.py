"""A remote backend with a local read-through copy of what it reads.

Every stored object is immutable (blobs are content-addressed, manifests written once), so a
cached copy never goes stale and needs no invalidation. Existence is always asked of the remote,
the authority: a blob the cache still holds may be gone remotely, and a manifest committed on the
strength of the cache's word would name a blob that others cannot read.

Garbage collection goes to the remote too: entries and touches are the remote's, and a delete
removes the remote object, then the cached copy (a copy of a deleted object would still be served
to this reader, harmlessly, since it cannot be wrong; but it would only take space).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from dagger_store.backends.base import (
    Backend,
    Buffer,
    Entry,
    SupportsDelete,
    SupportsEntries,
    SupportsTouch,
)
from dagger_store.backends.local import LocalBackend
from dagger_store.errors import NotFoundError


class CachedBackend:
    """Reads from ``cache`` when it can, else from ``remote`` (keeping a copy in ``cache``)."""

    def __init__(self, remote: Backend, cache: LocalBackend) -> None:
        self.remote = remote
        self.cache = cache
        self.url = remote.url

    def read(self, key: str) -> bytes:
        try:
            return self.cache.read(key)
        except NotFoundError:
            data = self.remote.read(key)
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
        created = self.remote.write_once(key, *parts)
        if created:
            self.cache.write_once(key, *parts)
        return created

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return self.remote.exists_many(keys)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return self.remote.iter_keys(prefix)

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        if not isinstance(self.remote, SupportsEntries):
            raise _incapable(self.remote, "list entries")
        return self.remote.iter_entries(prefix)

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        if not isinstance(self.remote, SupportsDelete):
            raise _incapable(self.remote, "delete")
        deleted = self.remote.delete(key, modified_before=modified_before)
        if deleted:
            self.cache.delete(key)
        return deleted

    def touch(self, key: str) -> bool:
        if not isinstance(self.remote, SupportsTouch):
            raise _incapable(self.remote, "touch")
        return self.remote.touch(key)


def _incapable(remote: Backend, what: str) -> TypeError:
    return TypeError(f"the remote backend {remote.url} cannot {what}")
