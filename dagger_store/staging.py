"""Staged writes: blobs hashed and encoded now, written later in groups, readable meanwhile.

A writer that makes many objects one after another (an experiment computing node after node)
would pay a round trip, or two fsyncs, per object and wait for each. Inside
``with store.staged() as stage``, ``Store.put`` hashes and encodes as ever but keeps each
encoded object in ``stage.objects`` instead of writing it; a group writer later writes the
objects of many stages at once (``Store.write_staged``), then the manifests naming them
(``Store.commit_written``). The commit order is unchanged: every blob is durable before a
manifest naming it is written.

Inside ``with store.reading(objects)``, blobs found among ``objects`` (staged ones, written or
not) are read from memory: a child computed in the same process as its parent reads the parent's
state from what the parent staged, through the same decoding as from storage, so that it sees
exactly what a process reading the store would see, without the storage or a second hash.

Both are context variables: each thread (a threaded scheduler's task) has its own.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from dagger_store.backends.base import Buffer


@dataclass(slots=True)
class Stage:
    """What ``put`` encoded inside one ``Store.staged`` block.

    ``objects``: blob key -> the whole encoded object (framing header and payload), leaves
    before the index that names them. ``named``: the key of every blob put, staged or not
    (those in ``known`` were written before by the same writer and are not staged again).
    """

    known: Container[str] = frozenset()
    objects: dict[str, Buffer] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)


stage_var: ContextVar[Stage | None] = ContextVar("dagger_store_stage", default=None)
memory_var: ContextVar[Mapping[str, Buffer] | None] = ContextVar(
    "dagger_store_memory", default=None
)
