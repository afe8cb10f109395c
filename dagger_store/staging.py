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

A large array is staged as ``RawLeaf``s of one copy: a sealed ``Region`` (``resident.py``) where
memory files can be sealed, which a child then maps copy-on-write instead of copying, and puts
back unwritten without hashing it again; or recycled memory (``recycled.py``) for an array that
a recipe rewrote after loading it from its parent (a copy, or a lent array most of whose pages
it wrote): its children will most likely rewrite it too, and a copy into pages in place costs
a fifth of a new region's.

Both are context variables: each thread (a threaded scheduler's task) has its own.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from dagger_store.backends.base import Buffer
from dagger_store.framing import HEADER_SIZE
from dagger_store.resident import Region


@dataclass(frozen=True, slots=True)
class RawLeaf:
    """A raw leaf staged without its framing header: its payload is a slice of one copy of the
    whole blob, contiguous, in a sealed region (``region``: lent out to readers as one array)
    or in recycled memory (``region`` None)."""

    payload: memoryview
    region: Region | None = None

    def __len__(self) -> int:  # as long as the object it stands for
        return HEADER_SIZE + len(self.payload)


# What a stage holds under a blob key: the whole encoded object, or a raw leaf in a region.
StagedObject = Buffer | RawLeaf


@dataclass(slots=True)
class Stage:
    """What ``put`` encoded inside one ``Store.staged`` block.

    ``objects``: blob key -> the whole encoded object (framing header and payload) or a raw
    leaf in a region, leaves before the index that names them. ``named``: the key of every
    blob put, staged or not (those in ``known`` were written before by the same writer and
    are not staged again). ``kept``: the objects of regions named again through an unwritten
    lent array (staged before, by the same writer): whoever reads this stage's node next
    finds them in memory too. ``rewritten``: the keys of blobs lent out of regions whose
    arrays were put back with most of their pages written (``Store.put``): whoever
    reads them next had better copy them than map them.
    """

    known: Container[str] = frozenset()
    objects: dict[str, StagedObject] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)
    kept: dict[str, StagedObject] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)


stage_var: ContextVar[Stage | None] = ContextVar("dagger_store_stage", default=None)
memory_var: ContextVar[Mapping[str, StagedObject] | None] = ContextVar(
    "dagger_store_memory", default=None
)
# Blob keys among the objects being read that are copied rather than lent (``Store.reading``).
copy_var: ContextVar[Container[str]] = ContextVar("dagger_store_copy", default=frozenset())
