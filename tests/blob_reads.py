"""BlobReads: counts the payload bytes a test reads from a store's backend (and lists the
manifests it reads)."""

from __future__ import annotations

from typing import Any


class BlobReads:
    """Counts payload bytes read from a backend: wraps the real one, which still does the I/O."""

    def __init__(self, backend: Any) -> None:
        self.bytes = 0
        self.hexes: set[str] = set()
        self.manifests: list[str] = []  # the manifest paths read, in order
        read, read_into = backend.read, backend.read_into  # type: ignore[attr-defined]

        def counted_read(key: str) -> bytes:
            data = read(key)
            self._count(key, len(data))
            return data

        def counted_read_into(key: str, offset: int, out: memoryview) -> int:
            n: int = read_into(key, offset, out)
            self._count(key, n)
            return n

        backend.read = counted_read  # type: ignore[method-assign]
        backend.read_into = counted_read_into  # type: ignore[attr-defined]

    def _count(self, key: str, n: int) -> None:
        if key.startswith("v1/blobs/"):
            self.bytes += n
            self.hexes.add(key.rsplit("/", 1)[1])
        elif key.startswith("v1/manifests/"):
            self.manifests.append(key)
