"""Counting the requests an S3 backend makes, through botocore's event hooks on its s3fs client.

Instrumentation, not a mock: every request still goes to the server.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dagger_store.backends.s3 import S3Backend

_EVENT = "before-parameter-build.s3"


class S3Requests:
    """``made``: requests by operation name (``"HeadObject"``, ``"DeleteObjects"``, ...) since
    construction; ``deleted``: how many keys each DeleteObjects request named, in order."""

    def __init__(self, backend: S3Backend) -> None:
        self.made: Counter[str] = Counter()
        self.deleted: list[int] = []
        self._events = backend.fs.s3.meta.events
        self._events.register(_EVENT, self._count)

    def _count(self, params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        self.made[model.name] += 1
        if model.name == "DeleteObjects":
            self.deleted.append(len(params["Delete"]["Objects"]))

    def close(self) -> None:
        self._events.unregister(_EVENT, self._count)
