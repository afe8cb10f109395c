"""In-process backend: a dict behind a lock. ``memory://NAME`` opens the same one per process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import ClassVar

from dagger_store.backends.base import Buffer, Entry, check_key
from dagger_store.errors import NotFoundError


class MemoryBackend:
    """Values in a dict; ``write_once`` is atomic under a lock. A key's modification time is
    when it was written or last touched. Not remote; trusted by location (this process filled
    it)."""

    remote = False
    _named: ClassVar[dict[str, MemoryBackend]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._values: dict[str, bytes] = {}
        self._modified: dict[str, float] = {}
        self._lock = threading.Lock()

    def trusted_by_location(self) -> bool:
        return True

    @classmethod
    def named(cls, name: str) -> MemoryBackend:
        """The process-wide backend called ``name`` (like fsspec's memory filesystem)."""
        with cls._named_lock:
            if name not in cls._named:
                cls._named[name] = cls(f"memory://{name}")
            return cls._named[name]

    def read(self, key: str) -> bytes:
        check_key(key)
        try:
            return self._values[key]
        except KeyError:
            raise NotFoundError(f"no such key {key!r} in {self.url}", key=key) from None

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        value = self.read(key)
        n = max(0, min(len(out), len(value) - offset))
        out[:n] = value[offset : offset + n]
        return n

    def write_once(self, key: str, *parts: Buffer) -> bool:
        check_key(key)
        data = b"".join(parts)
        with self._lock:
            if key in self._values:
                return False
            self._values[key] = data
            self._modified[key] = time.time()
            return True

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        for key in keys:
            check_key(key)
        with self._lock:
            return [key in self._values for key in keys]

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self._values if k.startswith(prefix))
        yield from keys

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        now = time.time()
        with self._lock:
            # A value put in from outside (a test planting it) has no time: call it new, the
            # answer that never lets a collector delete it early.
            entries = [
                Entry(k, len(v), self._modified.get(k, now))
                for k, v in sorted(self._values.items())
                if k.startswith(prefix)
            ]
        yield from entries

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        check_key(key)
        with self._lock:
            if key not in self._values:
                return False
            modified = self._modified.get(key, time.time())
            if modified_before is not None and modified >= modified_before:
                return False
            del self._values[key]
            self._modified.pop(key, None)
            return True

    def delete_many(
        self, keys: Sequence[str], *, modified_before: float | None = None
    ) -> list[bool]:
        for key in keys:
            check_key(key)
        return [self.delete(key, modified_before=modified_before) for key in keys]

    def touch(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            if key not in self._values:
                return False
            self._modified[key] = time.time()
            return True
