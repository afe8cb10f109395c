"""Garbage collection: delete what nothing refers to, and never what a writer is about to use.

::

    roots      every node key in an experiment record (records.py), in a pin (pins.py) or under
               a live lease (leases.py), and every node with a manifest generation modified
               within ``keep_recent``
    manifests  those of roots are kept (every generation); the others are deleted first,
               newest generation first
    blobs      kept if a kept manifest names them (a chunked blob: its index and every leaf) or
               if modified within ``grace``; the others are deleted. Of a node's manifest
               generations (``store.py``) all are kept, but only the newest marks blobs:
               what only a superseded generation names is collected after ``grace``
    .tmp/      (local and NFS stores) a killed writer's temp files older than ``grace`` (and
               than an hour, so that a short grace period never takes a live writer's)

Experiment records, pins and leases are never collected: ``delete_experiment``, ``pins.unpin``
and the leases themselves remove those, and a collection after them frees what only they kept.
Everything is a dry run unless ``dry_run=False``: the report then says what would go.

Why collecting is safe while others write (the invariants, and what they rely on):

- A writer puts blobs, then commits the manifest naming them. ``Store.put`` writes content that
  is absent and *touches* content it finds present (``backends.base.refresh``), so every blob a
  manifest is about to name was written or touched at most the put-to-commit time ago. Blobs
  younger than ``grace`` are never deleted: a writer that commits within ``grace`` (24 h by
  default) of its puts never loses a blob, even one it deduplicated against an old, unreferenced
  object that this collector had already listed as garbage. (The deletion cutoff is fixed when
  a collection starts, so a blob it may delete was touched more than ``grace`` before it
  started, and the manifest naming it, if committed in time, is in its listing.) A writer
  slower than that can lose blobs: its commit then refuses (IncompleteManifestError), or, if a
  blob goes between the commit's existence check and its write, commits a manifest that counts
  as a miss (never a hit with holes) until the blob is put again.
- Ages come from a listing and are checked again at the moment of deletion
  (``modified_before=cutoff``), so a touch after the listing wins, unless it lands between that
  check and the removal. On local and NFS stores there is no such window: each object's check is
  atomic with its removal (the file is renamed aside, then judged), in a batch or not. On S3
  deletions go in batches (``delete_many``: up to 1,000 keys checked again, by a listing of their
  range or by HEADs, then one DeleteObjects for those still old), so the window is one batch's
  check plus one request (around a second, where a HEAD then a DELETE per object had one round
  trip), and S3 has no conditional delete that would close it (``backends/s3.py`` says why). A
  touch lost in it is a blob deleted just after a writer's put reused it. The writer's
  ``commit`` checks that every blob exists before it writes the manifest, so it either refuses
  (IncompleteManifestError: the node is computed again) or, if the blob goes between that check
  and the write, commits a manifest that counts as a miss (never a hit with holes) until the blob
  is put again. A longer window makes that rare event less rare, never unsafe: it costs a
  recomputation. Manifests are never touched; their check only spares one written anew since
  the listing (deleted by another collector, then committed again), and one lost in the window
  is likewise a miss. So on S3 a manifest listing that started at most ``FRESH_LISTING``
  seconds before a batch is deleted serves as that batch's check (no second listing).
- Blobs are listed while marking, after the manifest sweep: an age listed before a remaining
  manifest's commit is young if the put or touch of that commit came first, and is checked
  again at deletion if not, as above.
- Manifests are listed again after the manifest sweep and every one then present marks its
  blobs, so a commit that raced the first listing still protects what it names.
- Roots are read twice, at the start and just before manifests are deleted. A run should write
  its record before it relies on a cached manifest (the orchestrator's ``.def`` record).
- Objects that may be indexes of chunked blobs are deleted before the rest: a collection stopped
  midway never leaves an index whose leaves are gone. The leaves of a young index are kept with it.
- An experiment record that cannot be read (corrupt, or of a newer format) stops the collection
  before anything is deleted, dry run or not (IntegrityError or FormatError naming it): the
  roots it names are unknown, and roots are never guessed. A record that is intact but unsigned
  or mis-signed still keeps what it names (keeping is always safe).
- A manifest or index that cannot be read while marking stops the blob sweep: a blob is never
  deleted on a guess. Names that are not dagger's own are never deleted. The report says why.
- What a manifest names is read once per machine: ``marks.py`` remembers it, for the manifest's
  exact modification time and size, and says why a memory is never of another object.

Clocks: ages are the storage's clock (the file server's, S3's) against this host's ``now``; a
skew shortens or lengthens the grace period by as much, which 24 h absorbs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from types import MappingProxyType

from dagger_store import framing
from dagger_store.backends.base import (
    Entry,
    SupportsDelete,
    SupportsDeleteMany,
    SupportsEntries,
    SupportsReadInto,
    SupportsScratch,
)
from dagger_store.digest import Digest
from dagger_store.errors import FormatError, IntegrityError, NotFoundError, StoreError
from dagger_store.framing import HEADER_SIZE, Framing
from dagger_store.keys import NodeKey
from dagger_store.layout import (
    BLOBS,
    MANIFESTS,
    blob_hex,
    blob_key_of_hex,
    experiment_prefix,
    manifest_generation,
    manifest_node,
)
from dagger_store.leases import live_keys
from dagger_store.manifest import Manifest
from dagger_store.marks import Marks
from dagger_store.pins import pins
from dagger_store.records import referenced_keys
from dagger_store.store import Store
from dagger_store.units import format_bytes

DAY = 24 * 3600.0
# Temp files are removed only once older than the grace period and this (seconds).
SCRATCH_MIN_AGE = 3600.0

# Why an object was kept (GcReport.kept_manifests / kept_blobs).
REFERENCED = "referenced by an experiment"
PINNED = "pinned"
LEASED = "leased"
RECENT = "recent"
IN_USE = "named by a kept manifest"
YOUNG = "younger than the grace period"
LEAF_OF_YOUNG = "a leaf of a chunked blob younger than the grace period"
CHANGED = "changed while collecting"
UNRECOGNISED = "not a name dagger writes"
BLOCKED = "not swept: see problems"

# An index object is its header, the blob's size and 32 bytes per leaf, of which it has >= 2.
_INDEX_BASE = HEADER_SIZE + 8
_MIN_INDEX = _INDEX_BASE + 2 * 32
_ROOT_ATTEMPTS = 3
# Keys handed to a backend's delete_many at once: S3's DeleteObjects limit, and small enough that
# several batches run side by side.
DELETE_BATCH = 1000
# Seconds a remote store's listing of manifests serves as their age check (see _delete).
FRESH_LISTING = 20.0
_HEX_DIGITS = "0123456789abcdef"


@dataclass(frozen=True, slots=True)
class GcReport:
    """What ``collect`` deleted, or would delete on a dry run, and what it kept and why.

    ``manifests``, ``blobs`` and ``temp_files`` list what was deleted (dry run: what a real run
    would delete now); ``*_bytes`` are their stored sizes. ``kept_manifests`` and ``kept_blobs``
    count the objects kept, by reason. ``problems`` name what could not be read while marking;
    any problem stops the blob sweep.
    """

    dry_run: bool
    manifests: tuple[NodeKey, ...]
    manifest_bytes: int
    blobs: tuple[str, ...]
    blob_bytes: int
    temp_files: tuple[str, ...] = ()
    temp_bytes: int = 0
    kept_manifests: Mapping[str, int] = field(default_factory=dict)
    kept_blobs: Mapping[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def deleted_bytes(self) -> int:
        """Bytes freed (dry run: that a real run would free)."""
        return self.manifest_bytes + self.blob_bytes + self.temp_bytes

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        text = (
            f"{'dry run, nothing deleted: ' if self.dry_run else ''}{verb} "
            f"{len(self.manifests)} manifests ({format_bytes(self.manifest_bytes)}), "
            f"{len(self.blobs)} blob objects ({format_bytes(self.blob_bytes)})"
        )
        if self.temp_files:
            text += f", {len(self.temp_files)} stale temp files ({format_bytes(self.temp_bytes)})"
        text += (
            f"; kept {_counted(self.kept_manifests, 'manifests')} and "
            f"{_counted(self.kept_blobs, 'blob objects')}; {self.seconds:.2f} s"
        )
        for problem in self.problems:
            text += f"\nproblem: {problem}"
        return text


def collect(
    store: Store,
    *,
    grace: float = DAY,
    keep_recent: float = 7 * DAY,
    dry_run: bool = True,
    now: float | None = None,
) -> GcReport:
    """Delete the manifests and blobs that nothing refers to (a dry run unless told otherwise).

    Parameters
    ----------
    grace
        Seconds a blob (or a stale temp file) is kept after it was last written or touched,
        referenced or not. Writers must commit within this long of their puts.
    keep_recent
        Seconds a manifest is kept after it was written, referenced or not.
    dry_run
        Delete nothing; report what a real run would delete now.
    now
        The time to measure ages from (epoch seconds); default: now.
    """
    started = time.perf_counter()
    if grace < 0 or keep_recent < 0:
        raise ValueError(f"grace and keep_recent are >= 0 seconds, got {grace}, {keep_recent}")
    backend = store.backend
    if not isinstance(backend, SupportsEntries):
        raise TypeError(f"{store.url} cannot list its objects with their ages: no gc there")
    if not dry_run and not isinstance(backend, SupportsDelete | SupportsDeleteMany):
        raise TypeError(f"{store.url} cannot delete objects: only a dry run is possible there")
    now = time.time() if now is None else now
    blob_cutoff, manifest_cutoff = now - grace, now - keep_recent

    with ThreadPoolExecutor(1, thread_name_prefix="dagger-gc") as aside:
        return _collect(store, aside, blob_cutoff, manifest_cutoff, dry_run, now, started)


def _collect(
    store: Store,
    aside: ThreadPoolExecutor,
    blob_cutoff: float,
    manifest_cutoff: float,
    dry_run: bool,
    now: float,
    started: float,
) -> GcReport:
    """``collect`` once its arguments are checked; ``aside`` lists or reads side by side with
    what does not depend on it (roots while manifests are listed; blobs while marking)."""
    backend = store.backend
    kept_manifests: Counter[str] = Counter()
    kept_blobs: Counter[str] = Counter()
    problems: list[str] = []

    # -- manifests: keep roots and recent ones, delete the rest --------------------------------
    reading_roots = aside.submit(_roots, store, now)
    listed, manifests_listed_at = _list(store, MANIFESTS)
    roots = reading_roots.result()
    # A node's generations go together: all kept while any is recent (else a surviving younger
    # one would be hidden from readers, who look for generation 0 first).
    written: dict[NodeKey, float] = {}
    for entry in listed:
        if (key := manifest_node(entry.key)) is not None:
            written[key] = max(written.get(key, entry.modified), entry.modified)
    doomed: list[tuple[NodeKey, Entry]] = []
    for entry in listed:
        key = manifest_node(entry.key)
        if key is None:
            kept_manifests[UNRECOGNISED] += 1
        elif key in roots:
            kept_manifests[roots[key]] += 1
        elif written[key] >= manifest_cutoff:
            kept_manifests[RECENT] += 1
        else:
            doomed.append((key, entry))
    if doomed:  # roots again: a run may have recorded a key while we listed
        roots = _roots(store, now)
        for key, _ in doomed:
            if key in roots:
                kept_manifests[roots[key]] += 1
        doomed = [(key, entry) for key, entry in doomed if key not in roots]
    if not dry_run:
        # Newest generations first: a collection stopped midway never leaves a node whose
        # generation 0 is gone while a later one is there.
        doomed.sort(key=lambda d: -(manifest_generation(d[1].key) or 0))
        gone: list[bool] = []
        for _, batch in groupby(doomed, key=lambda d: manifest_generation(d[1].key) or 0):
            gone += _delete(
                store, [entry for _, entry in batch], manifest_cutoff, manifests_listed_at
            )
        kept_manifests[CHANGED] += len(doomed) - sum(gone)
        doomed = [d for d, deleted in zip(doomed, gone, strict=True) if deleted]
    deleted_manifests = {entry.key for _, entry in doomed}

    # -- mark: every blob a remaining manifest names, with the leaves of chunked ones ----------
    # (Blobs are listed meanwhile: an age listed before a remaining manifest's commit is young
    # if that commit's put or touch came first, and is checked again if not; see _delete.)
    listing_blobs = aside.submit(_list, store, BLOBS)
    if dry_run:
        remaining = [e for e in listed if e.key not in deleted_manifests]
    else:  # listed again: a manifest committed meanwhile protects what it names too
        remaining, _ = _list(store, MANIFESTS)
        kept_manifests[CHANGED] += len({e.key for e in remaining} - {e.key for e in listed})
    marks = Marks.load(store.url)  # what earlier collections here read: only the rest is read
    marked: set[str] = set()
    chunked: dict[str, Digest] = {}
    for found in _read_marks(store, marks, _newest_generations(remaining)):
        if isinstance(found, str):
            problems.append(found)
            continue
        for digest in found:
            marked.add(digest.hex)
            if digest.is_chunked:
                chunked[digest.hex] = digest
    problems.extend(_mark_leaves(store, sorted(chunked), marked, marks))
    if not problems:
        marks.save((e.key for e in remaining), chunked)

    # -- sweep blobs: unmarked and older than the grace period ---------------------------------
    blobs, _ = listing_blobs.result()
    young_indexes = [
        hex_
        for entry in blobs
        if (hex_ := blob_hex(entry.key)) is not None
        and hex_ not in marked
        and entry.modified >= blob_cutoff
        and _may_be_index(entry.size)
    ]
    young_leaves: set[str] = set()
    problems.extend(_mark_leaves(store, young_indexes, young_leaves, only_indexes=True))
    candidates: list[Entry] = []
    for entry in blobs:
        hex_ = blob_hex(entry.key)
        if hex_ is None:
            kept_blobs[UNRECOGNISED] += 1
        elif hex_ in marked:
            kept_blobs[IN_USE] += 1
        elif entry.modified >= blob_cutoff:
            kept_blobs[YOUNG] += 1
        elif hex_ in young_leaves:
            kept_blobs[LEAF_OF_YOUNG] += 1
        else:
            candidates.append(entry)
    if problems:
        kept_blobs[BLOCKED] += len(candidates)
        candidates = []
    if not dry_run and candidates:
        # Possible indexes first, so that no index outlives its leaves if we are stopped.
        first = [e for e in candidates if _may_be_index(e.size)]
        rest = [e for e in candidates if not _may_be_index(e.size)]
        gone = _delete(store, first, blob_cutoff) + _delete(store, rest, blob_cutoff)
        kept_blobs[CHANGED] += len(candidates) - sum(gone)
        candidates = [e for e, deleted in zip(first + rest, gone, strict=True) if deleted]

    # -- a killed writer's temp files ----------------------------------------------------------
    stale: list[Entry] = []
    if isinstance(backend, SupportsScratch):
        # Never a live writer's temp file, however short the grace period: it would fail.
        cutoff = min(blob_cutoff, now - SCRATCH_MIN_AGE)
        stale = [e for e in backend.iter_scratch() if e.modified < cutoff]
        if not dry_run:
            stale = [e for e in stale if backend.delete_scratch(e.key, modified_before=cutoff)]

    return GcReport(
        dry_run=dry_run,
        manifests=tuple(key for key, _ in doomed),
        manifest_bytes=sum(entry.size for _, entry in doomed),
        blobs=tuple(e.key for e in candidates),
        blob_bytes=sum(e.size for e in candidates),
        temp_files=tuple(e.key for e in stale),
        temp_bytes=sum(e.size for e in stale),
        kept_manifests=MappingProxyType({r: n for r, n in kept_manifests.items() if n}),
        kept_blobs=MappingProxyType({r: n for r, n in kept_blobs.items() if n}),
        problems=tuple(problems),
        seconds=time.perf_counter() - started,
    )


def delete_experiment(store: Store, name: str) -> int:
    """Delete the records of experiment ``name``; return how many there were.

    Its node keys stop being roots: a ``collect`` afterwards frees what only this experiment
    used, once its manifests are older than ``keep_recent``. The experiment folder's marker is
    left alone (``Experiment.restore`` then shows an empty graph). NotFoundError if the store
    holds no record of ``name``.
    """
    backend = store.backend
    if not isinstance(backend, SupportsDelete):
        raise TypeError(f"{store.url} cannot delete objects, so experiments cannot be deleted")
    prefix = experiment_prefix(name)
    keys = list(backend.iter_keys(prefix))
    if not keys:
        raise NotFoundError(
            f"no experiment {name!r} in {store.url}: see dagger_store.records.experiments()",
            key=prefix,
        )
    return sum(store.map(backend.delete, keys))


# -- marking -------------------------------------------------------------------------------------


def _roots(store: Store, now: float) -> dict[NodeKey, str]:
    """Every root key and why it is one; a record deleted while read is read around."""
    for attempt in range(_ROOT_ATTEMPTS):
        try:
            return _read_roots(store, now)
        except NotFoundError:
            if attempt == _ROOT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _read_roots(store: Store, now: float) -> dict[NodeKey, str]:
    roots = dict.fromkeys(live_keys(store, now), LEASED)
    roots.update((key, PINNED) for keys in pins(store).values() for key in keys)
    try:
        referenced = referenced_keys(store)
    except IntegrityError as exc:
        raise IntegrityError(_unknown_roots(store, exc), key=exc.key) from exc
    except FormatError as exc:
        raise FormatError(_unknown_roots(store, exc), key=exc.key) from exc
    roots.update(dict.fromkeys(referenced, REFERENCED))
    return roots


def _unknown_roots(store: Store, exc: StoreError) -> str:
    return (
        f"garbage collection of {store.url} refused, nothing deleted: {exc}. The node keys that "
        "record names are roots, and roots are never guessed. Put back a good copy of the "
        "record, or delete it (its experiment then loses what it recorded), and collect again"
    )


def _newest_generations(entries: list[Entry]) -> list[Entry]:
    """The manifests that are their node's newest generation: only those mark blobs, so
    the blobs of a superseded generation (a repaired or recomputed node's) are collected once
    no newest generation names them and they are older than the grace period. Every generation
    of a kept node is kept itself (they are small, and readers never take an older one)."""
    newest: dict[NodeKey, tuple[int, Entry]] = {}
    for entry in entries:
        node, generation = manifest_node(entry.key), manifest_generation(entry.key) or 0
        if node is not None and (node not in newest or generation > newest[node][0]):
            newest[node] = (generation, entry)
    return [entry for _, entry in newest.values()]


def _read_marks(store: Store, marks: Marks, entries: list[Entry]) -> list[list[Digest] | str]:
    """The blobs each manifest of ``entries`` names (or a problem): remembered by ``marks``,
    else read (in parallel) and remembered."""
    now = time.time()
    found: list[list[Digest] | str | None] = [marks.named(entry) for entry in entries]
    unknown = [entry for entry, named in zip(entries, found, strict=True) if named is None]
    read = iter(store.map(lambda e: _named_blobs(store, e.key), unknown))
    for i, entry in enumerate(entries):
        if found[i] is None:
            named = found[i] = next(read)
            if not isinstance(named, str):
                marks.remember(entry, named, now)
    return [named for named in found if named is not None]


def _named_blobs(store: Store, key: str) -> list[Digest] | str:
    """The blobs the manifest at ``key`` names, or a problem. Its signature is not checked:
    a forged manifest can only keep blobs alive, and an unsigned one must keep its own."""
    try:
        data = store.backend.read(key)
    except NotFoundError:
        return []  # deleted since it was listed (by another collector): names nothing now
    except StoreError as exc:
        return f"manifest {key}: {exc}"
    try:
        return list(Manifest.decode(data, key=key).blobs.values())
    except StoreError as exc:
        return f"manifest {key} cannot be read, so the blobs it names are unknown: {exc}"


def _mark_leaves(
    store: Store,
    hexes: Iterable[str],
    marked: set[str],
    marks: Marks | None = None,
    *,
    only_indexes: bool = False,
) -> list[str]:
    """Mark the leaves of the chunked blobs ``hexes`` (remembered by ``marks``, else read and
    remembered there); the problems met.

    ``only_indexes``: the objects are merely possibly indexes (young, unreferenced objects of an
    index's size): a leaf among them is no problem, and it marks nothing.
    """
    known = {} if marks is None else marks.leaves
    hexes = list(hexes)
    unknown = [h for h in hexes if h not in known]
    found = store.map(lambda h: _leaves(store, h, only_indexes), unknown)
    read = dict(zip(unknown, found, strict=True))
    problems: list[str] = []
    for hex_ in hexes:
        leaves = read[hex_] if hex_ in read else known[hex_]
        if isinstance(leaves, str):
            problems.append(f"blob {hex_}: {leaves}")
            continue
        marked.update(leaf.hex for leaf in leaves)
        if leaves:
            known[hex_] = leaves  # content-addressed: an index's leaves never change
    return problems


def _leaves(store: Store, hex_: str, only_indexes: bool) -> list[Digest] | str:
    key = blob_key_of_hex(hex_)
    backend = store.backend
    try:
        if only_indexes and isinstance(backend, SupportsReadInto):
            head = bytearray(HEADER_SIZE)
            backend.read_into(key, 0, memoryview(head))
            if framing.read_header(head, key) is not Framing.INDEX:
                return []
        data = backend.read(key)
        if framing.read_header(data, key) is not Framing.INDEX:
            if only_indexes:
                return []
            return "should be a chunked blob's index but is not, so its leaves are unknown"
        payload = memoryview(data)[HEADER_SIZE:]
        return framing.index_leaves(payload, framing.decode_index(payload, hex_, key))
    except NotFoundError:
        return []  # gone: its leaves are no longer its to keep
    except StoreError as exc:
        return f"its index cannot be read, so its leaves are unknown: {exc}"


# -- sweeping ------------------------------------------------------------------------------------


def _list(store: Store, prefix: str) -> tuple[list[Entry], float]:
    """Every entry under ``prefix`` (a layout folder of ``ab/`` subfolders), and when the
    listing started. A remote store's is listed in 16 key ranges side by side (by the first hex
    digit: its pages come one after another, the ranges need not); names outside them are not
    dagger's and would be kept anyway."""
    backend = store.backend
    assert isinstance(backend, SupportsEntries)
    started = time.time()
    if not backend.remote:
        return list(backend.iter_entries(prefix)), started
    parts = store.map(lambda digit: list(backend.iter_entries(prefix + digit)), list(_HEX_DIGITS))
    return [entry for part in parts for entry in part], started


def _delete(
    store: Store, entries: list[Entry], cutoff: float, listed_at: float | None = None
) -> list[bool]:
    """Delete each entry unless it was modified at or after ``cutoff`` since it was listed; in
    parallel: batches of ``DELETE_BATCH`` keys side by side where the backend deletes in
    batches (S3: one DeleteObjects each), else key by key.

    ``listed_at`` (manifests only, which are never touched): where a check costs requests (a
    remote store), a batch is checked again only if its listing started more than
    ``FRESH_LISTING`` seconds ago; a fresher listing is the check."""
    backend = store.backend
    if isinstance(backend, SupportsDeleteMany):
        batches = [
            [e.key for e in entries[i : i + DELETE_BATCH]]
            for i in range(0, len(entries), DELETE_BATCH)
        ]

        def delete_batch(keys: list[str]) -> list[bool]:
            fresh = (
                backend.remote
                and listed_at is not None
                and time.time() - listed_at <= FRESH_LISTING
            )
            return backend.delete_many(keys, modified_before=None if fresh else cutoff)

        return [gone for batch in store.map(delete_batch, batches) for gone in batch]
    assert isinstance(backend, SupportsDelete)

    def delete(entry: Entry) -> bool:
        return backend.delete(entry.key, modified_before=cutoff)

    return store.map(delete, entries)


def _may_be_index(size: int) -> bool:
    return size >= _MIN_INDEX and (size - _INDEX_BASE) % 32 == 0


def _counted(reasons: Mapping[str, int], what: str) -> str:
    total = sum(reasons.values())
    if not total:
        return f"0 {what}"
    return f"{total} {what} (" + ", ".join(f"{n} {r}" for r, n in reasons.items()) + ")"
