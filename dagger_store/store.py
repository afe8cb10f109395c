"""Store: the facade over one backend. Commit protocol, batching, verification; no I/O details.

Where objects go under the backend root (blobs, manifests, the marker) is ``layout.py``'s
to say; what they hold, ``framing.py``'s and ``manifest.py``'s.

Invariants:

- Blobs are immutable and named by the digest of their uncompressed bytes; content that exists
  is never written again. Every byte read is verified against its digest before it is returned.
- A chunked blob's index is written only after all its leaves: an index implies its leaves.
- Commit order: every blob a manifest names is durable before the manifest is written, once
  (first writer wins). A manifest counts only when every blob it names exists, so a crash
  between blobs and manifest, or a lost blob, is a miss and never a hit with holes.
- No dead ends: a node's manifest has *generations*, each written once by the same
  create-if-absent primitive. Generation 0 is at ``v1/manifests/ab/<hex>`` (the format of every
  store written before generations existed); generation n >= 1 at ``v1/manifests/ab/<hex>.<n>``.
  The node's manifest is its newest generation; older ones are superseded history. A
  repairing commit (``repair=True``: the orchestrator's) that finds the newest generation
  incomplete (a blob lost outside gc: an rm, an NFS hiccup, a lifecycle rule) writes the next
  one, so a node whose recipe is not bit-for-bit deterministic is repaired by recomputing it
  (a plain commit still refuses: IncompleteManifestError, saying how). A repairing commit
  supersedes a manifest that readers with the key refuse (unsigned where signatures are
  required, or mis-signed) the same way. A commit may also name a generation to supersede
  although it is complete (``replaces``: recompute on demand, after a fixed bug). Of concurrent
  writers of one generation exactly one wins; the others get ``Commit(won=False)`` with the
  winner's manifest. Readers take the newest generation, never an older complete one: an older
  one may be a result someone deliberately superseded, and gc collects its blobs (it marks only
  what the newest generation names). A manifest is one object, so a reader sees one
  generation, whole: the one that was newest when it looked, or a newer one.
- Finding the newest generation: the existence round that asks for ``<hex>`` asks for
  ``<hex>.1`` too (one round, twice the names: a complete generation 0 may have been superseded
  on purpose, so "list only where generation 0 is incomplete" would miss recomputes); only the
  few nodes that have a generation 1 are probed further, one round per generation.
  Generations are contiguous (each is written only after its predecessor was seen), so the
  first absent one ends the search.
- With a lab key, every manifest committed is signed; a signature read is checked before the
  manifest is decoded, and where signatures are required an unsigned or mis-signed manifest is
  never a hit (``signing.py``). The signature binds the node key, as for generation 0, and
  covers every generation (it does not bind the generation number: a key holder's older
  manifest of the same node replayed as a newer generation passes the check).
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from dagger_store import framing, recycled
from dagger_store.backends.base import (
    Backend,
    Buffer,
    SupportsIdentity,
    SupportsReadInto,
    SupportsWriteMany,
    parts_size,
    refresh,
    write_or_refresh,
)
from dagger_store.digest import (
    ALGORITHM,
    LEAF_SIZE,
    Digest,
    leaf_digest,
    leaf_views,
    tree_digest,
)
from dagger_store.errors import (
    FormatError,
    IncompleteManifestError,
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
    StoreError,
    UntrustedError,
)
from dagger_store.framing import HEADER_SIZE, Compressor, Framing
from dagger_store.gcpause import collection_paused
from dagger_store.keys import NodeKey
from dagger_store.layout import (
    BLOBS,
    MANIFESTS,
    blob_hex,
    blob_key,
    manifest_generation_key,
    manifest_node,
)
from dagger_store.manifest import Frame, Manifest
from dagger_store.manifestmemo import ManifestMemo
from dagger_store.resident import RESIDENT_FROM, Region, lent, written_share
from dagger_store.signing import LabKey, Signatures
from dagger_store.staging import RawLeaf, Stage, StagedObject, copy_var, memory_var, stage_var

# Below this size a conditional write is cheaper than asking first whether the blob exists.
_ASK_FIRST_ABOVE = 256 * 1024
# A group holding at least two objects this large is written in two halves side by side.
_SPLIT_FROM = 1024 * 1024
# Below this size one whole read beats a header read plus a payload read.
_READ_INTO_ABOVE = 1024 * 1024
# A lent array put back with at least this share of its pages written was rewritten, not
# touched here and there: whoever reads it next copies it (``Stage.rewritten``), and it is
# staged in recycled memory, not in a region of its own.
REWRITTEN_FROM = 0.5
# Tasks per worker when many small reads are spread over the pool (``Store._map_sliced``).
_SLICES_PER_WORKER = 4
# Items a local backend answers in one thread before ``_map_sliced`` decides, and the time an
# item may take for the rest to stay in that thread (seconds).
_PROBE_ITEMS = 32
_INLINE_BELOW_S = 100e-6
# Questions about at least this many manifests are remembered between runs (``manifestmemo``).
_MEMO_FROM = 256

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Commit:
    """The outcome of ``Store.commit``: the manifest now stored under ``key``.

    ``won`` is False when another writer committed a different manifest first; ``manifest`` is
    then theirs. (A byte-identical one counts as ours: so does our own write whose answer was
    lost and which a retry found in place.)
    """

    key: NodeKey
    manifest: Manifest
    won: bool
    generation: int = 0  # of the manifest now stored: 0 unless the node was repaired/recomputed


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``Store.verify`` checked and every problem it found (empty when the store is sound)."""

    blobs: int
    manifests: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """Content-addressed blobs plus write-once manifests over one backend.

    Parameters
    ----------
    backend
        Where bytes live (``dagger_store.backends``); usually made by ``open_store(url)``.
    workers
        Threads that hash, compress and move leaves in parallel (blake3, zstd and file I/O
        release the GIL). Default: 4 or the number of cores, whichever is more.
    compression_level
        zstd level for blobs where compression pays; 0 stores everything raw.
    lab_key
        Signs every manifest this store commits, and checks every signature it reads.
    require_signatures
        Refuse manifests that are unsigned or whose signature does not verify (needs
        ``lab_key``): they are never hits, and ``get_manifest`` raises UntrustedError.
    trusted
        Whether pickled attributes may be loaded from here (``trusted``). Default: trusted when
        signatures are required, or when the backend is trusted by its location
        (``Backend.trusted_by_location``: memory, a folder whose marker you own).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        workers: int | None = None,
        compression_level: int = 3,
        lab_key: LabKey | None = None,
        require_signatures: bool = False,
        trusted: bool | None = None,
    ) -> None:
        self._signatures = Signatures(lab_key, require_signatures)
        self.backend = backend
        self._pool = ThreadPoolExecutor(
            max_workers=workers or max(4, os.cpu_count() or 1), thread_name_prefix="dagger-store"
        )
        self._compressor = Compressor(compression_level)
        if trusted is None:
            trusted = require_signatures or backend.trusted_by_location()
        self._trusted = trusted

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def trusted(self) -> bool:
        """Whether data that runs code when loaded (pickled attributes) may come from here."""
        return self._trusted

    @property
    def signs(self) -> bool:
        """Whether ``commit`` signs manifests (a lab key is configured)."""
        return self._signatures.lab_key is not None

    @property
    def signatures(self) -> Signatures:
        """The signing policy: what ``commit`` signs with and readers check against (also
        for the other objects signed with the lab key, such as experiment records)."""
        return self._signatures

    @property
    def require_signatures(self) -> bool:
        """Whether unsigned or mis-signed manifests are refused."""
        return self._signatures.required

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs ---------------------------------------------------------------------------------

    def put(self, data: Any) -> Digest:
        """Store a bytes-like value (bytes, bytearray, memoryview, numpy array); return its Digest.

        C-contiguous buffers are read in place, never copied. A value larger than one leaf
        (``digest.LEAF_SIZE``) is hashed, compressed and written leaf by leaf in parallel.
        """
        view = _byte_view(data)
        stage = stage_var.get()
        if stage is not None and len(view) >= RESIDENT_FROM:
            return self._put_resident(view, stage)
        compress = stage is None and self._compressor.pays_off(view)  # staged: the writer's
        leaves = leaf_views(view)
        if len(leaves) == 1:
            return self._put_leaf(view, compress, stage)
        digests = self.map(lambda leaf: self._put_leaf(leaf, compress, stage), leaves)
        top = tree_digest(len(view), digests)
        if stage is None:
            write_or_refresh(self.backend, blob_key(top), framing.encode_index(top.size, digests))
        else:
            self._stage_index(top, digests, stage)
        return top

    def put_many(self, values: Sequence[Any]) -> list[Digest]:
        """``put`` each value; values of one leaf or less are hashed, compressed and written
        side by side on the pool (a model's many small matrices use every core)."""
        views = [_byte_view(v) for v in values]
        small = [i for i, v in enumerate(views) if len(v) <= LEAF_SIZE]
        stage = stage_var.get()  # pool threads have contexts of their own: hand it over

        def put_small(i: int) -> Digest:
            token = stage_var.set(stage)
            try:
                return self.put(views[i])
            finally:
                stage_var.reset(token)

        digests: dict[int, Digest] = dict(zip(small, self.map(put_small, small), strict=True))
        for i, view in enumerate(views):
            if i not in digests:  # a large value parallelises over its own leaves
                digests[i] = self.put(view)
        return [digests[i] for i in range(len(views))]

    def _put_resident(self, view: memoryview, stage: Stage) -> Digest:
        """``put`` of a large buffer inside a stage: an array lent out of a region of this
        writer's (``resident.py``) and left unwritten is named again without a byte copied or
        hashed; any other is hashed leaf by leaf and, unless staged before, copied whole. The
        copy goes to a new region, which children map instead of copying, or, for an array
        rewritten since it was loaded from a parent (most of a lent one's pages written, or
        any of a copy on recycled memory: ``recycled.leased``), to recycled memory: whoever
        rewrote it once likely rewrites it again, and then a copy costs less than a mapping."""
        source = lent(view)
        written = written_share(view) if source is not None else 0.0
        if source is not None and source.digest is not None:
            if not written:
                objects = _raw_objects(source.view(), source.digest, source.leaves, source)
                if all(k in stage.known for k in objects):
                    stage.named.update(objects)
                    stage.kept.update(objects)
                    return source.digest
            elif written >= REWRITTEN_FROM:
                stage.rewritten.add(blob_key(source.digest))
        leaves = leaf_views(view)
        digests = self.map(leaf_digest, leaves)
        top = digests[0] if len(leaves) == 1 else tree_digest(len(view), digests)
        keys = [blob_key(d) for d in digests] + ([blob_key(top)] if len(leaves) > 1 else [])
        if all(k in stage.known or k in stage.objects for k in keys):
            stage.named.update(keys)
            return top
        rewritten = written >= REWRITTEN_FROM or recycled.leased(view)
        region = None if rewritten else Region.new(len(view))
        if region is not None:
            fill = region.fill  # after hashing: the bytes hashed are the bytes staged
            self.map(lambda at: fill(at * LEAF_SIZE, leaves[at]), range(len(leaves)))
            region.seal(top, digests)
            copy = region.view()
        else:  # rewritten, no regions here, or too many alive
            copy = recycled.copy(view)
        for key, staged in _raw_objects(copy, top, digests, region).items():
            if _stages(stage, key):
                stage.objects[key] = staged
        return top

    def _stage_index(self, top: Digest, digests: list[Digest], stage: Stage) -> Digest:
        key = blob_key(top)
        if _stages(stage, key):
            stage.objects[key] = framing.encode_index(top.size, digests)
        return top

    def _put_leaf(self, leaf: memoryview, compress: bool, stage: Stage | None) -> Digest:
        digest = leaf_digest(leaf)
        key = blob_key(digest)
        if stage is not None:
            if _stages(stage, key):
                # Raw and ours (the caller may mutate its buffer): a child reads it back with
                # one copy, and the writer compresses it (``write_staged``), off this thread.
                stage.objects[key] = b"".join((framing.header(Framing.RAW), leaf))
            return digest
        # Content found present is touched (refresh): it may be old and unreferenced, and the
        # touch gives it a garbage collector's grace period until our manifest names it.
        present = len(leaf) > _ASK_FIRST_ABOVE and self.backend.exists_many([key])[0]
        if present and refresh(self.backend, key):
            return digest
        head, payload = self._compressor.encode_leaf(leaf, compress)
        write_or_refresh(self.backend, key, head, payload)
        return digest

    def get(self, digest: Digest) -> bytes:
        """The verified bytes of a blob. For large arrays prefer ``get_into`` (no extra copy)."""
        _check_digest(digest)
        memory = memory_var.get()
        if not digest.is_chunked and not (memory and blob_key(digest) in memory):
            data = self._read(digest)
            kind = framing.read_header(data, blob_key(digest))
            return self._decode_leaf(kind, memoryview(data)[HEADER_SIZE:], digest)
        out = bytearray(digest.size)
        self.get_into(digest, out)
        return bytes(out)

    def get_into(self, digest: Digest, out: Any) -> None:
        """Fill a writable buffer of exactly ``digest.size`` bytes (e.g. ``np.empty``) in place.

        On IntegrityError the buffer's contents are unspecified: never use them.
        """
        _check_digest(digest)
        target = _byte_view(out, writable=True)
        if len(target) != digest.size:
            raise ValueError(
                f"get_into needs a buffer of exactly {digest.size} bytes for {digest}, "
                f"got {len(target)}"
            )
        memory = memory_var.get()  # read here: pool threads have contexts of their own
        if not digest.is_chunked:
            self._read_leaf_into(digest, target, memory)
            return
        leaves = self._read_index(digest, memory)
        parts = leaf_views(target)
        self.map(
            lambda pair: self._read_leaf_into(*pair, memory), list(zip(leaves, parts, strict=True))
        )

    def get_private(self, digest: Digest) -> mmap.mmap | None:
        """The blob's bytes as a writable copy-on-write mapping, when they are staged in a
        region (``resident.py``) among the objects being read (``reading``): nothing copied,
        and ``put`` of the untouched mapping names the blob again without hashing it. None
        otherwise: use ``get_into``."""
        _check_digest(digest)
        memory = memory_var.get()
        if not memory or digest.size < RESIDENT_FROM or blob_key(digest) in copy_var.get():
            return None
        first = memory.get(blob_key(digest))
        if digest.is_chunked and isinstance(first, bytes | bytearray | memoryview):
            leaves = framing.index_leaves(memoryview(first)[HEADER_SIZE:], digest)
            first = memory.get(blob_key(leaves[0]))
        region = first.region if isinstance(first, RawLeaf) else None
        if region is None or region.digest != digest:
            return None
        return region.private()

    def has_blobs(self, digests: Sequence[Digest]) -> list[bool]:
        """Whether each blob is stored whole, in batched rounds.

        A chunked blob counts only if its index and every one of its leaves exist: one round
        for the blobs, the indexes of the chunked ones read in parallel, one round for leaves.
        """
        for digest in digests:
            _check_digest(digest)
        present = self.backend.exists_many([blob_key(d) for d in digests])
        chunked = sorted(
            {d for d, p in zip(digests, present, strict=True) if p and d.is_chunked},
            key=lambda d: d.hex,
        )
        if not chunked:
            return present
        leaves = dict(zip(chunked, self.map(self._leaves_or_none, chunked), strict=True))
        leaf_keys = sorted({blob_key(leaf) for ls in leaves.values() for leaf in ls or ()})
        stored = dict(zip(leaf_keys, self.backend.exists_many(leaf_keys), strict=True))

        def whole(digest: Digest, indexed: bool) -> bool:
            if not indexed or not digest.is_chunked:
                return indexed
            found = leaves[digest]
            return found is not None and all(stored[blob_key(leaf)] for leaf in found)

        return [whole(d, p) for d, p in zip(digests, present, strict=True)]

    def _leaves_or_none(self, digest: Digest) -> list[Digest] | None:
        try:
            return self._read_index(digest)
        except StoreError:  # gone since, or corrupt: either way not stored whole
            return None

    def _read(self, digest: Digest, memory: Mapping[str, StagedObject] | None = None) -> Buffer:
        key = blob_key(digest)
        if memory and (held := memory.get(key)) is not None:
            return b"".join(_framed(held)) if isinstance(held, RawLeaf) else held
        try:
            return self.backend.read(key)
        except NotFoundError as exc:
            raise NotFoundError(f"no blob {digest} in {self.url}", key=key) from exc

    def _read_index(
        self, digest: Digest, memory: Mapping[str, StagedObject] | None = None
    ) -> list[Digest]:
        key = blob_key(digest)
        data = self._read(digest, memory)
        if framing.read_header(data, key) is not Framing.INDEX:
            raise IntegrityError(f"blob {key!r} should be a chunked index but is not", key=key)
        stored = framing.decode_index(memoryview(data)[HEADER_SIZE:], digest.hex, key)
        if stored.size != digest.size:
            raise IntegrityError(
                f"blob {key!r} holds {stored.size} bytes where its digest says {digest.size}",
                key=key,
            )
        return framing.index_leaves(memoryview(data)[HEADER_SIZE:], digest)

    def _read_leaf_into(
        self, digest: Digest, target: memoryview, memory: Mapping[str, StagedObject] | None = None
    ) -> None:
        key = blob_key(digest)
        if memory and (held := memory.get(key)) is not None:
            # Staged by this process, which hashed these very bytes: decoded, not verified.
            if isinstance(held, RawLeaf):
                if len(held.payload) != len(target):
                    raise IntegrityError(f"staged blob {key!r} is not a leaf of its size", key=key)
                target[:] = held.payload
                return
            kind = framing.read_header(held, key)
            payload = memoryview(held)[HEADER_SIZE:]
            if kind is Framing.ZSTD:
                framing.decompress_into(payload, target, key)
            elif kind is Framing.RAW and len(payload) == len(target):
                target[:] = payload
            else:
                raise IntegrityError(f"staged blob {key!r} is not a leaf of its size", key=key)
            return
        backend = self.backend
        if isinstance(backend, SupportsReadInto) and digest.size > _READ_INTO_ABOVE:
            head = bytearray(HEADER_SIZE)
            try:
                got = backend.read_into(key, 0, memoryview(head))
            except NotFoundError as exc:
                raise NotFoundError(f"no blob {digest} in {self.url}", key=key) from exc
            if framing.read_header(head[:got], key) is Framing.RAW:
                # Raw leaves go straight from storage into the caller's buffer: no copy.
                got = backend.read_into(key, HEADER_SIZE, target)
                framing.verify(target[:got], digest, key)
                return
        data = self._read(digest)
        kind = framing.read_header(data, key)
        payload = memoryview(data)[HEADER_SIZE:]
        if kind is Framing.ZSTD:
            framing.decompress_into(payload, target, key)  # no intermediate bytes
            framing.verify(target, digest, key)
        else:
            target[:] = self._decode_leaf(kind, payload, digest)

    def _decode_leaf(self, kind: Framing, payload: memoryview, digest: Digest) -> bytes:
        key = blob_key(digest)
        if kind is Framing.ZSTD:
            raw = framing.decompress(payload, digest.size, key)
        elif kind is Framing.RAW:
            raw = payload.tobytes()
        else:
            raise IntegrityError(f"blob {key!r} should be a leaf but is a {kind.name}", key=key)
        framing.verify(raw, digest, key)
        return raw

    # -- staged writes (staging.py) ------------------------------------------------------------

    @contextmanager
    def staged(self, known: Container[str] = frozenset()) -> Iterator[Stage]:
        """Within the block, ``put`` (in this thread) hashes and encodes but writes nothing:
        the encoded objects collect in the Stage, for ``write_staged``. Blobs whose keys are in
        ``known`` (written or touched by the same writer already) are not encoded again."""
        stage = Stage(known)
        token = stage_var.set(stage)
        try:
            yield stage
        finally:
            stage_var.reset(token)

    @contextmanager
    def reading(
        self, objects: Mapping[str, StagedObject], copy: Container[str] = frozenset()
    ) -> Iterator[None]:
        """Within the block, blobs among ``objects`` (``Stage.objects``) are read from there;
        ``get_private`` lends those in regions out, except the blobs whose keys are in
        ``copy``."""
        tokens = memory_var.set(objects), copy_var.set(copy)
        try:
            yield
        finally:
            memory_var.reset(tokens[0])
            copy_var.reset(tokens[1])

    def write_staged(self, objects: Mapping[str, StagedObject]) -> None:
        """Write staged blob objects in groups (leaves, then the indexes naming them, so that an
        index implies its leaves), each group durable before this returns. As ``put`` does,
        leaves are compressed where zstd pays, content found present is touched, and a large
        object is asked about before it is sent."""
        leaves = [k for k, v in objects.items() if _staged_kind(k, v) is not Framing.INDEX]
        indexes = [k for k in objects if k not in set(leaves)]
        for group in (leaves, indexes):
            large = [k for k in group if len(objects[k]) > _ASK_FIRST_ABOVE]
            asked = self.backend.exists_many(large) if large else []
            present = {k for k, p in zip(large, asked, strict=True) if p}
            send = [k for k in group if k not in present]
            encoded = self.map(lambda k: self._encoded(k, objects[k]), send)
            created = self._write_group([(k, e) for k, e in zip(send, encoded, strict=True)])
            found = [k for k, c in zip(send, created, strict=True) if not c] + sorted(present)
            touched = self.map(lambda k: refresh(self.backend, k), found)
            for key, ok in zip(found, touched, strict=True):
                if not ok:  # collected between the two: written again
                    write_or_refresh(self.backend, key, *_framed(objects[key]))

    def _encoded(self, key: str, staged: StagedObject) -> tuple[Buffer, ...]:
        """A staged object as written: a raw leaf compressed where zstd pays."""
        if _staged_kind(key, staged) is not Framing.RAW:
            return _framed(staged)
        leaf = staged.payload if isinstance(staged, RawLeaf) else memoryview(staged)[HEADER_SIZE:]
        return self._compressor.encode_leaf(leaf, self._compressor.pays_off(leaf))

    def commit_written(self, items: Sequence[tuple[NodeKey, Manifest, int | None]]) -> list[Commit]:
        """``commit(key, manifest, repair=True, replaces=replaces)`` of each item, written as one
        group, for a writer that has itself just written or touched every blob they name
        (``write_staged``): their existence is not asked again. A name found taken (another
        writer's commit, a lost answer, a repair) goes through ``commit``, item by item."""
        for key, _, _ in items:
            _check_node_key(key)
        frames = [self._frame(key, manifest) for key, manifest, _ in items]
        generations = [0 if replaces is None else replaces + 1 for _, _, replaces in items]
        created = self._write_group(
            [
                (manifest_generation_key(key, generation), (frame,))
                for (key, _, _), generation, frame in zip(items, generations, frames, strict=True)
            ]
        )
        return [
            Commit(key, manifest, won=True, generation=generation)
            if ok
            else self.commit(key, manifest, repair=True, replaces=replaces)
            for (key, manifest, replaces), generation, ok in zip(
                items, generations, created, strict=True
            )
        ]

    def _write_group(
        self, items: Sequence[tuple[str, Sequence[Buffer]]], durable: bool = True
    ) -> list[bool]:
        many = self.backend
        if isinstance(many, SupportsWriteMany):
            if sum(1 for _, parts in items if parts_size(parts) >= _SPLIT_FROM) < 2:
                return many.write_once_many(items, durable=durable)
            # Large objects: two halves side by side, each a durable group of its own. The
            # disk takes them no faster, but one half's file creation and copying run while
            # the other waits on the disk (creating a file can cost ~1 ms: see README).
            halves = [list(items[0::2]), list(items[1::2])]
            done = self.map(lambda half: many.write_once_many(half, durable=durable), halves)
            created = [False] * len(items)
            created[0::2], created[1::2] = done
            return created
        return self.map(lambda item: many.write_once(item[0], *item[1]), items)

    def _frame(self, key: NodeKey, manifest: Manifest) -> bytes:
        payload = manifest.payload()
        return Frame(payload, self._signatures.sign(key, payload)).encode()

    # -- manifests -----------------------------------------------------------------------------

    def commit(
        self,
        key: NodeKey,
        manifest: Manifest,
        *,
        repair: bool = False,
        replaces: int | None = None,
    ) -> Commit:
        """Store ``manifest`` under ``key`` unless a manifest is there already (first writer
        wins).

        ``repair``: if the node's manifest names a lost blob (or is refused as untrusted:
        unsigned where signatures are required, or mis-signed), write the next generation, which
        supersedes it (without it: IncompleteManifestError, as ever; the orchestrator always
        repairs). ``replaces``: a generation (from ``generations``) to supersede even though it
        is complete (recompute on demand; implies ``repair``). Of writers of one generation,
        one wins. Every blob ``manifest`` names must already be stored (put them first):
        otherwise IncompleteManifestError, and nothing is written.
        """
        _check_node_key(key)
        if replaces is not None and (not isinstance(replaces, int) or replaces < 0):
            raise ValueError(f"replaces is a generation (an int >= 0), got {replaces!r}")
        missing = self._missing_blobs(manifest)
        if missing:
            raise IncompleteManifestError(
                f"cannot commit {key}: {len(missing)} blob(s) it names are not in {self.url} "
                f"({', '.join(missing[:3])}...); put every blob before committing its manifest",
                key=str(key),
                missing=tuple(missing),
            )
        data = self._frame(key, manifest)
        generation = 0 if replaces is None else replaces + 1
        while True:
            name = manifest_generation_key(key, generation)
            if self.backend.write_once(name, data) or self._holds(name, data):
                # (_holds: our write landed but its answer was lost, and the retry found it.)
                return Commit(key, manifest, won=True, generation=generation)
            # Taken: each round either returns or moves past a generation that exists, so this
            # ends (generations only grow).
            newest = self._newest_generation(key)
            if newest is None:  # deleted meanwhile (gc of an unreferenced node): start over
                generation = 0
                continue
            try:
                theirs = self._read_manifest(key, newest)
            except UntrustedError:
                if not repair and replaces is None:
                    raise
                # Refused by every reader with the key (unsigned where signatures are
                # required, or mis-signed): a dead end like a lost blob, so it is superseded
                # by a manifest signed with our key.
                generation = newest + 1
                continue
            lost = self._missing_blobs(theirs)
            if (replaces is None or newest > replaces) and not lost:
                return Commit(key, theirs, won=False, generation=newest)
            if lost and not repair and replaces is None:
                raise self._incomplete(key, lost)
            generation = newest + 1  # incomplete, or the one we were told to supersede

    def _holds(self, name: str, data: bytes) -> bool:
        """Whether the object ``name`` is exactly ``data``. A manifest byte-identical to ours
        (same blobs, same metadata, same signature) is ours to report as won, whoever wrote it."""
        try:
            return self.backend.read(name) == data
        except NotFoundError:
            return False

    def generations(self, keys: Iterable[NodeKey]) -> dict[NodeKey, int]:
        """The newest manifest generation of each key that has a manifest (complete or not),
        in batched rounds (see the module docstring)."""
        keys = list(keys)
        for key in keys:
            _check_node_key(key)
        return self._newest_generations(keys)

    def _newest_generations(self, keys: Sequence[NodeKey]) -> dict[NodeKey, int]:
        names = [manifest_generation_key(k, g) for k in keys for g in (0, 1)]
        present = self.backend.exists_many(names)
        newest: dict[NodeKey, int] = {}
        deeper: list[NodeKey] = []
        for i, key in enumerate(keys):
            if present[2 * i + 1]:
                newest[key] = 1
                deeper.append(key)
            elif present[2 * i]:
                newest[key] = 0
        newest.update(self._generations_beyond(deeper, 1))
        return newest

    def _generations_beyond(self, keys: list[NodeKey], generation: int) -> dict[NodeKey, int]:
        """The newest generation of each of ``keys``, all known to have ``generation``: one
        existence round per generation further (generations are contiguous)."""
        newest = dict.fromkeys(keys, generation)
        while keys:
            generation += 1
            found = self.backend.exists_many([manifest_generation_key(k, generation) for k in keys])
            keys = [k for k, p in zip(keys, found, strict=True) if p]
            newest.update(dict.fromkeys(keys, generation))
        return newest

    def _newest_generation(self, key: NodeKey) -> int | None:
        return self._newest_generations([key]).get(key)

    def get_manifest(self, key: NodeKey) -> Manifest:
        """The manifest stored under ``key`` (its newest generation), verified and complete.

        NotFoundError if there is none; IncompleteManifestError if blobs it names are missing;
        UntrustedError if it is unsigned where signatures are required, or mis-signed.
        """
        _check_node_key(key)
        generation = self._newest_generation(key)
        if generation is None:
            raise NotFoundError(
                f"no manifest for node {key} in {self.url}", key=manifest_generation_key(key, 0)
            )
        manifest = self._read_manifest(key, generation)
        missing = self._missing_blobs(manifest)
        if missing:
            raise self._incomplete(key, missing)
        return manifest

    def _incomplete(self, key: NodeKey, missing: list[str]) -> IncompleteManifestError:
        return IncompleteManifestError(
            f"manifest {key} in {self.url} names {len(missing)} missing blob(s) "
            f"({', '.join(missing[:3])}...): recompute the node to repair it (run its "
            "experiment again, or Store.commit(..., repair=True): the new manifest supersedes "
            "this one)",
            key=str(key),
            missing=tuple(missing),
        )

    def missing(self, keys: Iterable[NodeKey]) -> list[NodeKey]:
        """The keys, in the given order, that have no complete manifest (see ``manifests``)."""
        keys = list(keys)
        found = self.manifests(keys)
        return [k for k in keys if k not in found]

    def has_manifests(self, keys: Sequence[NodeKey]) -> list[bool]:
        """Whether each key has a manifest, complete or not (its generation 0: readers start
        there, and gc takes it last), in one existence round: nothing is read."""
        for key in keys:
            _check_node_key(key)
        return self.backend.exists_many([manifest_generation_key(k, 0) for k in keys])

    def manifests(self, keys: Iterable[NodeKey]) -> dict[NodeKey, Manifest]:
        """The complete manifests among ``keys``; absent, incomplete and untrusted (unsigned where
        signatures are required, or mis-signed: logged as a warning) ones are left out.

        Each key's newest generation counts (see the module docstring).

        Batched: one existence round for the manifests (and their generation 1; on a backend
        that is not remote, generation 0 is read in parallel instead of asked about), one more
        per later generation for the few keys that have one, their reads in parallel, then one
        existence round for every blob they name (none when they name none).
        """
        keys = list(keys)
        for key in keys:
            _check_node_key(key)
        with collection_paused():  # thousands of manifests decoded, none freed
            newest = self._newest_manifests(keys)
        manifests = {k: m for k, m in newest.items() if m is not None}
        digests = sorted(
            {d for m in manifests.values() for d in m.blobs.values()}, key=lambda d: d.hex
        )
        if not digests:  # every value inline (small states): nothing to ask about
            return manifests
        stored = dict(zip(digests, self.has_blobs(digests), strict=True))
        return {k: m for k, m in manifests.items() if all(stored[d] for d in m.blobs.values())}

    def _map_sliced(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``self.map(fn, items)`` in a few slices per worker, each slice one task.

        One task per item costs more than reading a small manifest from a local disk does (a
        future, a lock, a thread switch under the GIL: 10,000 of them took 1.2 s where the
        reads alone took 0.27 s); a few slices per worker still keep a remote store's workers
        all busy, and even.
        """
        done: list[R] = []
        if not self.backend.remote:
            # A folder on a local disk answers from the page cache in microseconds: then one
            # thread beats any pool (the GIL: 0.42 s against 0.67 s for a warm run of 10,101
            # nodes). NFS waits on the network: a slow first few send the rest to the pool.
            started = time.perf_counter()
            done = [fn(x) for x in items[:_PROBE_ITEMS]]
            if time.perf_counter() - started < _INLINE_BELOW_S * len(done):
                return done + [fn(x) for x in items[len(done) :]]
            items = items[len(done) :]
        size = max(1, -(-len(items) // (self._pool._max_workers * _SLICES_PER_WORKER)))
        slices = [items[i : i + size] for i in range(0, len(items), size)]
        return done + [r for part in self.map(lambda s: [fn(x) for x in s], slices) for r in part]

    def manifest_keys(self) -> Iterator[NodeKey]:
        """Every node key that has a manifest (complete or not), once (whatever its
        generations)."""
        seen: set[NodeKey] = set()
        for path in self.backend.iter_keys(MANIFESTS):
            key = manifest_node(path)
            if key is None:
                raise InvalidKeyError(
                    f"{path!r} in {self.url} is not a manifest dagger wrote: remove it"
                )
            if key not in seen:
                seen.add(key)
                yield key

    def incomplete(self, keys: Iterable[NodeKey] | None = None) -> dict[NodeKey, tuple[str, ...]]:
        """The nodes among ``keys`` (default: every node with a manifest) whose newest manifest
        names blobs that are not stored, each with those blobs (``str(Digest)``), in batched
        rounds. A run of an experiment that names such a node recomputes it."""
        keys = list(self.manifest_keys() if keys is None else keys)
        for key in keys:
            _check_node_key(key)
        newest = self._newest_generations(keys)
        found = sorted(newest)
        read = self.map(lambda k: self._trusted_manifest_or_none(k, newest[k]), found)
        manifests = {k: m for k, m in zip(found, read, strict=True) if m is not None}
        digests = sorted(
            {d for m in manifests.values() for d in m.blobs.values()}, key=lambda d: d.hex
        )
        stored = dict(zip(digests, self.has_blobs(digests), strict=True))
        lost = {
            k: tuple(str(d) for d in m.blobs.values() if not stored[d])
            for k, m in manifests.items()
        }
        return {k: v for k, v in lost.items() if v}

    def _read_manifest(self, key: NodeKey, generation: int = 0) -> Manifest:
        path = manifest_generation_key(key, generation)
        try:
            data = self.backend.read(path)
        except NotFoundError as exc:
            raise NotFoundError(f"no manifest for node {key} in {self.url}", key=path) from exc
        return self._checked_manifest(key, path, data)

    def _checked_manifest(
        self, key: NodeKey, path: str, data: bytes, seen: Callable[[bytes], None] | None = None
    ) -> Manifest:
        """The manifest stored as ``data`` at ``path``, for ``key``: frame, then signature,
        then payload (handed to ``seen`` once it decoded)."""
        frame = Frame.parse(data, key=path)
        self._signatures.check(key, frame, self.url)  # before a byte of the payload is decoded
        manifest = Manifest.from_payload(frame.payload, key=path, trusted=self._trusted)
        if seen is not None:
            seen(frame.payload)
        return manifest

    def _trusted_manifest_or_none(
        self,
        key: NodeKey,
        generation: int = 0,
        data: bytes | None = None,
        seen: Callable[[bytes], None] | None = None,
    ) -> Manifest | None:
        """``_read_manifest`` (of ``data``, when read already), None when it is untrusted."""
        try:
            if data is None:
                return self._read_manifest(key, generation)
            path = manifest_generation_key(key, generation)
            return self._checked_manifest(key, path, data, seen)
        except UntrustedError as exc:
            logger.warning("not a cache hit: %s", exc)
            return None

    def _newest_manifests(self, keys: Sequence[NodeKey]) -> dict[NodeKey, Manifest | None]:
        """Each key's newest manifest generation (see the module docstring), read and checked,
        for the keys that have one (None: untrusted, logged).

        On a backend that is not remote, asking whether an object exists costs about what
        reading a small one does (a stat against an open): there generation 0 is read instead
        of asked about, and only the keys that have it are asked about generation 1 (two
        objects touched per cached node instead of three). Read before generation 1 is asked
        about, so a generation 0 read is the newest when none is found; it is decoded only then
        (a superseded one may be corrupt or untrusted: that is not this run's concern). On a
        remote one, the existence round answers for many keys in a few requests (LIST
        pages on S3) where reading absent ones would cost one request each. Where the backend
        can tell an object's identity (a folder), a question about many keys first asks this
        machine's memo (``manifestmemo.py``): a stat a manifest instead of a read and a
        checksum, for those whose file is the one remembered.
        """
        held: dict[NodeKey, bytes] = {}
        remembered: dict[NodeKey, bytes] = {}  # generation 0 payloads, from the memo
        identity: dict[NodeKey, tuple[int, ...]] = {}
        folders: dict[str, tuple[int, ...]] = {}  # their identities before they were listed
        memo = self._manifest_memo(keys)
        if self.backend.remote:
            newest = self._newest_generations(keys)
        else:
            to_read = list(keys)
            settled: set[NodeKey] = set()  # remembered, in a folder unchanged since the memo
            if memo is not None and isinstance(self.backend, SupportsIdentity):
                names = [manifest_generation_key(k, 0) for k in keys]
                ids = self.backend.identities(names)
                identity = {k: i for k, i in zip(keys, ids, strict=True) if i is not None}
                for key, name in zip(keys, names, strict=True):
                    if key in identity and (payload := memo.payload(name, identity[key])):
                        remembered[key] = payload
                to_read = [k for k in identity if k not in remembered]
                folder_of = {k: _folder(name) for k, name in zip(keys, names, strict=True)}
                listed = sorted(set(folder_of.values()))
                found_ids = self.backend.identities(listed)
                folders = {f: i for f, i in zip(listed, found_ids, strict=True) if i is not None}
                quiet = {f for f, i in folders.items() if memo.quiet(f, i)}
                settled = {k for k in remembered if folder_of[k] in quiet}
            read = self._map_sliced(
                lambda k: self._object_or_none(manifest_generation_key(k, 0)), to_read
            )
            held = {k: data for k, data in zip(to_read, read, strict=True) if data is not None}
            present = [*remembered, *held]
            ask = [k for k in present if k not in settled]
            asked = self.backend.exists_many([manifest_generation_key(k, 1) for k in ask])
            later = [k for k, p in zip(ask, asked, strict=True) if p]
            newest = dict.fromkeys(present, 0) | self._generations_beyond(later, 1)
            if memo is not None:
                for key in later:
                    memo.forget(manifest_generation_key(key, 0))
                for folder, folder_identity in folders.items():
                    memo.remember_folder(folder, folder_identity)
        found = list(newest)

        def checked(key: NodeKey) -> Manifest | None:
            generation = newest[key]
            path = manifest_generation_key(key, generation)
            if generation == 0 and key in remembered:
                with suppress(FormatError):  # a memo gone bad: the store's own copy decides
                    return Manifest.from_payload(remembered[key], key=path, trusted=self._trusted)
            seen = None
            if memo is not None and generation == 0 and key in identity:
                seen = functools.partial(memo.remember, path, identity[key])
            data = held.get(key) if generation == 0 else None
            return self._trusted_manifest_or_none(key, generation, data, seen)

        manifests = dict(zip(found, self._map_sliced(checked, found), strict=True))
        if memo is not None:
            memo.save()
        return manifests

    def _manifest_memo(self, keys: Sequence[NodeKey]) -> ManifestMemo | None:
        """This machine's memo of the manifests of ``keys`` (``manifestmemo.py``), where the
        backend can tell when an object was replaced, manifests are not signed, and the
        question is large enough for a file to pay."""
        if len(keys) < _MEMO_FROM or not isinstance(self.backend, SupportsIdentity):
            return None
        if self.signs or self.require_signatures:
            return None
        return ManifestMemo.load(self.url, (k.hex for k in keys))

    def _object_or_none(self, name: str) -> bytes | None:
        try:
            return self.backend.read(name)
        except NotFoundError:
            return None

    def _missing_blobs(self, manifest: Manifest) -> list[str]:
        digests = list(manifest.blobs.values())
        stored = self.has_blobs(digests)
        return [str(d) for d, ok in zip(digests, stored, strict=True) if not ok]

    # -- whole-store checks --------------------------------------------------------------------

    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Re-hash every blob and check every manifest; report, never repair or raise.

        ``progress(done, total)``, if given, is called as objects are checked.
        """
        blob_keys = list(self.backend.iter_keys(BLOBS))
        manifest_keys = list(self.manifest_keys())
        total, done, lock = len(blob_keys) + len(manifest_keys), [0], threading.Lock()

        def tick() -> None:
            if progress is not None:
                with lock:
                    done[0] += 1
                    progress(done[0], total)

        def check_blob(key: str) -> str:
            problem = self._verify_object(key)
            tick()
            return problem

        problems = [p for p in self.map(check_blob, blob_keys) if p]
        for key in manifest_keys:
            try:
                self.get_manifest(key)
            except StoreError as exc:
                problems.append(f"manifest {key}: {exc}")
            tick()
        return VerifyReport(len(blob_keys), len(manifest_keys), tuple(problems))

    def _verify_object(self, key: str) -> str:
        hex_ = blob_hex(key)
        if hex_ is None:
            return f"blob {key}: not a blob name dagger writes"
        try:
            data = self.backend.read(key)
            kind = framing.read_header(data, key)
            payload = memoryview(data)[HEADER_SIZE:]
            if kind is Framing.INDEX:
                digest = framing.decode_index(payload, hex_, key)
                leaves = framing.index_leaves(payload, digest)
                absent = [d for d, ok in zip(leaves, self.has_blobs(leaves), strict=True) if not ok]
                if absent:
                    return f"blob {key}: {len(absent)} of its leaves are missing"
            else:
                raw = (
                    payload if kind is Framing.RAW else framing.decompress(payload, LEAF_SIZE, key)
                )
                framing.verify(raw, Digest(ALGORITHM, hex_, len(raw)), key)
        except StoreError as exc:
            return f"blob {key}: {exc}"
        return ""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]``, run on this store's thread pool; results in order.

        For work that waits on the backend or releases the GIL (reads, deletes, hashing of many
        objects): up to ``workers`` calls at once. An exception from ``fn`` is raised here (the
        first, in the order of ``items``), and the calls not yet started are dropped. ``fn``
        must not wait on another ``map`` of the same store: the pool could fill with callers
        waiting for a free thread.
        """
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))


def _folder(key: str) -> str:
    return key.rpartition("/")[0]


def _raw_objects(
    copy: memoryview, top: Digest, leaves: Sequence[Digest], region: Region | None
) -> dict[str, StagedObject]:
    """The objects of a blob staged whole in ``copy`` (a sealed region's view, or recycled
    memory): its leaves, raw, then its index if chunked."""
    objects: dict[str, StagedObject] = {
        blob_key(leaf): RawLeaf(copy[at * LEAF_SIZE : at * LEAF_SIZE + leaf.size], region)
        for at, leaf in enumerate(leaves)
    }
    if top.is_chunked:
        objects[blob_key(top)] = framing.encode_index(top.size, leaves)
    return objects


def _staged_kind(key: str, staged: StagedObject) -> Framing:
    return Framing.RAW if isinstance(staged, RawLeaf) else framing.read_header(staged, key)


def _framed(staged: StagedObject) -> tuple[Buffer, ...]:
    """A staged object as the parts of the object stored."""
    if isinstance(staged, RawLeaf):
        return framing.header(Framing.RAW), staged.payload
    return (staged,)


def _stages(stage: Stage, key: str) -> bool:
    """Record that ``key`` was put inside ``stage``; whether it is still to be encoded there."""
    stage.named.add(key)
    return key not in stage.known and key not in stage.objects


def _check_digest(digest: object) -> None:
    if not isinstance(digest, Digest):
        raise TypeError(
            f"expected a Digest (from Store.put or Digest.parse), got {type(digest).__name__}: "
            f"{digest!r}"
        )


def _check_node_key(key: object) -> None:
    if not isinstance(key, NodeKey):
        raise TypeError(
            f"expected a NodeKey (from dagger_store.node_key), got {type(key).__name__}: {key!r}"
        )


def _byte_view(data: Any, *, writable: bool = False) -> memoryview:
    """A flat byte view of a buffer, zero-copy when it is C-contiguous."""
    if isinstance(data, str):
        raise TypeError("the store holds bytes, not str: encode it first (e.g. text.encode())")
    np = sys.modules.get("numpy")
    if np is not None and isinstance(data, np.ndarray):
        if writable and not data.flags.writeable:
            raise TypeError("get_into needs a writable array")
        if writable and not data.flags.c_contiguous:
            raise TypeError("get_into needs a C-contiguous array (e.g. np.empty(shape, dtype))")
        # A uint8 view covers dtypes with no buffer format (datetime64) and empty shapes alike.
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            "expected a bytes-like object (bytes, bytearray, memoryview, numpy array), "
            f"got {type(data).__name__}"
        ) from None
    if writable and view.readonly:
        raise TypeError(f"get_into needs a writable buffer, got a read-only {type(data).__name__}")
    if not view.c_contiguous:
        if writable:
            raise TypeError("get_into needs a C-contiguous buffer")
        return memoryview(view.tobytes())  # the one copy: a strided view has no flat bytes
    if view.nbytes == 0:
        return memoryview(bytearray() if writable else b"")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
