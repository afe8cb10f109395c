"""The garbage collector paused for a phase that builds many objects and frees none.

Reading thousands of manifests or records allocates several containers each and frees none
of them: every automatic collection that triggers meanwhile finds nothing to free, yet rescans
the whole heap. A warm run of 10,101 nodes spent about a third of its time in such collections.
The pause is process-wide (the collector has no other switch), so it is kept to phases that
run no user code, each well under a second for ten thousand nodes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collection_paused() -> Iterator[None]:
    """The garbage collector paused, then back as it was (nested pauses are fine)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
