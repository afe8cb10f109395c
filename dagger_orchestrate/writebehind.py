"""Write-behind for the nodes a run computes in its own process: they are written in groups
while the next ones compute, and a child reads its parent's state from memory.

Under the synchronous and threaded schedulers (and any whose tasks run in the process that
started the run) a node's task stages its state (``Store.staged``: hashed and encoded, nothing
written) and submits it here; this module's thread writes whatever accumulated since its last
group: the blobs (one durable group), then the manifests (one group), then it releases the
nodes' leases (one batched delete). A folder store pays one flush of its file system per group
where it paid two fsyncs per object; an S3 store sends a group's requests side by side.

A child computed meanwhile reads its parent's state from the staged objects
(``Store.reading``), through the same decoding as from storage, so it sees exactly what a
process reading the store would see. A node's manifest is kept while it has readers to come
(its children and Function calls in the plan). Its objects are kept until they are written;
after that, only large arrays staged whole (in sealed regions, ``dagger_store.resident``, or in
recycled memory) and small objects stay, while a node with readers to come names them:
children map an array in a region copy-on-write instead of copying it, and name it again
without hashing it if they leave it unwritten, so a data set that every node carries is held
once and never copied. The rest is read back from the store. Memory stays within about three
states: the one computing, the staged objects of its parent, those being written
(``PENDING_BYTES``), with the regions shared among them.

Order and failures: groups are written in submission order, and a node is submitted after its
parent. A node whose parent this run failed to write is not written (Skipped). A group that
fails is written again node by node, so that a bad node fails alone; a node that names a blob
which another node staged and failed to write fails too. ``close`` waits for everything and
says how each node ended.

Tasks in other processes (a process pool, a distributed cluster) find no write-behind of the
run in their process (``running``) and take the ordinary path: load from the store, commit
before returning.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import dagger_store as ds
from dagger_orchestrate.inflight import Keeper, LeaseTerms
from dagger_orchestrate.outcomes import Done, Failed, Skipped, portable
from dagger_orchestrate.plan import NodeSpec
from dagger_store.staging import RawLeaf, StagedObject

# How long the writer lets submissions gather before it writes them as one group, while they
# hold fewer bytes than GATHER_UP_TO.
GATHER_SECONDS = 0.02
GATHER_UP_TO = 8 * 2**20
# Bytes staged and not yet written that a submission may add to before it waits for the
# writer; one node larger than this waits until nothing else is pending. Memory then stays
# within about three states (the one computing, its parent held for reading, one being
# written), and computing never runs more than one large node ahead of the disk.
PENDING_BYTES = 32 * 2**20
# Written objects at most this large stay in memory while a node to be read names them.
RETAIN_SMALL = 64 * 2**10
# Written large arrays (staged whole) stay in memory, while a node to be read names them, up to
# this many bytes in all (at least one always may): a data set carried down a tree and the
# root's model, say. Beyond it they are dropped once written, and read back from the store: in a
# wide tree whose scheduler computes many siblings before their children, every one of them
# is held for its children at once.
RETAIN_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class Staged:
    """A computed node, staged: its manifest, the objects it staged, the key of every blob it
    names (staged by it or by a node before it), the generation it supersedes, if any, the
    objects of the regions it named through a lent array (``Stage.kept``), and the keys of
    the blobs it was lent and rewrote (``Stage.rewritten``)."""

    node: NodeSpec
    manifest: ds.Manifest
    objects: Mapping[str, StagedObject]
    named: frozenset[str]
    seconds: float
    replaces: int | None = None
    kept: Mapping[str, StagedObject] = field(default_factory=dict)
    rewritten: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        """Bytes of the objects it staged (what waits for the writer)."""
        return sum(len(data) for data in self.objects.values())


@dataclass(frozen=True, slots=True)
class _Held:
    """A node held for its readers: its manifest and every blob it names (kept in memory for
    them)."""

    manifest: ds.Manifest
    named: frozenset[str]


class WriteBehind:
    """One run's writer (see the module docstring). ``readers``: how many tasks of the run
    will read each node's state (its missing children and its Function calls)."""

    def __init__(self, store: ds.Store, readers: Mapping[ds.NodeKey, int], terms: LeaseTerms):
        self.store = store
        self.keeper = Keeper(store, terms)
        self.pid = os.getpid()
        # Blob keys staged by this run, written or queued: a later stage does not encode them.
        self.known: set[str] = set()
        self._written: set[str] = set()
        self._memory: dict[str, StagedObject] = {}
        self._held: dict[ds.NodeKey, _Held] = {}  # nodes with readers to come
        self._holders: Counter[str] = Counter()  # blob key -> held nodes naming it
        self._borrowed: dict[ds.NodeKey, frozenset[str]] = {}  # node -> its parent's blobs
        self._kept: set[str] = set()  # written objects still in memory (``_retained``)
        self._kept_bytes = 0
        self._rewritten: set[str] = set()  # blob keys a node rewrote after mapping them
        self._readers = Counter(readers)
        self._queue: list[Staged] = []
        self._submitted: set[ds.NodeKey] = set()
        self._waiting = 0  # tasks waiting in ``written``: the writer does not linger then
        self._pending = 0  # bytes submitted and not yet written
        self._lease_after: dict[ds.NodeKey, list[ds.NodeKey]] = {}  # parent -> children
        self._closing = False
        self._lock = threading.Condition()
        self._outcomes: dict[ds.NodeKey, Done | Failed | Skipped] = {}
        self._failed: dict[ds.NodeKey, ds.NodeKey] = {}  # node -> the failed node it descends from
        self._thread = threading.Thread(target=self._run, name="dagger-write-behind", daemon=True)
        self._thread.start()

    # -- the computing side ----------------------------------------------------------------

    def parent(
        self, key: ds.NodeKey
    ) -> tuple[ds.Manifest, Mapping[str, StagedObject], frozenset[str]] | None:
        """The manifest of ``key``, the objects to read its state from and the keys of those
        to copy rather than map (``Store.reading``), if this run staged it and holds it for its
        readers; call ``read`` once read.

        Copied: the blobs that a node of this run was lent and rewrote (``Stage.rewritten``:
        a model in training). The next one likely rewrites them too, and a mapped array
        rewritten whole costs about four times a copy into recycled memory (a page faulted in
        and copied at each page's first write). The rest is mapped: what nodes pass on
        unchanged (a data set) or change here and there costs nothing, or a page, mapped.
        (Large arrays staged in recycled memory, not in regions, are copied whatever this
        says: ``Store.get_private``.)
        """
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return None
            return held.manifest, self._memory, held.named & self._rewritten

    def read(self, key: ds.NodeKey, by: ds.NodeKey | None = None) -> None:
        """One of the readers of ``key`` has read it (or will not). ``by``: the node computed
        from it, which holds the blobs ``key`` names until it is submitted or forgotten: it
        names most of them again (a data set carried down), and they must still be in memory
        then for its own children to map them, although ``key`` itself has no reader left."""
        with self._lock:
            held = self._held.get(key)
            if by is not None and held is not None:
                self._borrowed[by] = held.named
                self._holders.update(held.named)
            self._readers[key] -= 1
            held = self._held.pop(key, None) if self._readers[key] <= 0 else None
            if held is not None:
                self._release(held.named)

    def _release(self, names: Iterable[str]) -> None:
        """(Under the lock.) One holder fewer for each of ``names``; a written object that no
        held node names any more leaves memory."""
        for name in names:
            self._holders[name] -= 1
            if self._holders[name] <= 0:
                del self._holders[name]
                if name in self._written:
                    self._drop(name)

    def lease_later(self, node: NodeSpec) -> bool:
        """Whether the lease on ``node`` is left to the writer, which takes it right after it
        has written the node's parent (True while this run is still writing the parent).

        The node then computes from its parent's staged state straight away, and its lease
        appears only once the parent is written: whoever sees the lease finds the parent
        stored, and a crash before the parent is written loses what it would have lost in the
        parent's own commit. Nobody else can be computing the node meanwhile: they would
        first have to compute its parent, whose lease this run holds until it is written."""
        assert node.parent is not None
        with self._lock:
            if node.parent not in self._submitted or node.parent in self._outcomes:
                return False
            self._lease_after.setdefault(node.parent, []).append(node.key)
            return True

    def forget(self, key: ds.NodeKey) -> None:
        """``key``'s task failed: nothing of it will be submitted; let its lease go."""
        with self._lock:
            for children in self._lease_after.values():
                if key in children:
                    children.remove(key)
            self._submitted.discard(key)
            self._release(self._borrowed.pop(key, frozenset()))
        self.keeper.release([key])

    def failed(self, key: ds.NodeKey | None) -> ds.NodeKey | None:
        """If this run failed to write ``key`` (or skipped it): the node whose write failed."""
        return None if key is None else self._failed.get(key)

    def written(self, key: ds.NodeKey) -> Done | Failed | Skipped | None:
        """Wait until ``key`` is written, if this run submitted it; how that went (None: not
        this run's to write)."""
        with self._lock:
            if key not in self._submitted:
                return None
            self._waiting += 1
            self._lock.notify_all()
            try:
                self._lock.wait_for(lambda: key in self._outcomes)
            finally:
                self._waiting -= 1
            return self._outcomes[key]

    def submit(self, staged: Staged) -> None:
        key = staged.node.key
        size = staged.size
        with self._lock:
            self._lock.wait_for(
                lambda: not self._pending or self._pending + size <= max(PENDING_BYTES, size)
            )
            self._pending += size
            self._submitted.add(key)
            for name, data in staged.objects.items():
                self._memory.setdefault(name, data)  # until written
            if self._readers[key] > 0:
                self._held[key] = _Held(staged.manifest, staged.named)
                self._holders.update(staged.named)
                for name, data in staged.kept.items():  # its lent regions, for its readers
                    if name not in self._memory and self._may_keep(len(data)):
                        self._memory[name] = data
                        self._keep(name)
            self.known.update(staged.objects)
            self._rewritten.update(staged.rewritten)
            self._release(self._borrowed.pop(key, frozenset()))  # after its own holds
            self._queue.append(staged)
            self._lock.notify_all()

    def close(self) -> dict[ds.NodeKey, Done | Failed | Skipped]:
        """Wait until everything submitted is written; how each node ended."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()
        self.keeper.close()
        return self._outcomes

    # -- the writing side ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                # A moment for more to come (a group's flush costs about what one object's
                # does), unless a task waits for what is queued, or what is queued is large:
                # its flush then costs by the byte, not by the group, and another large node
                # could not join it without waiting for it (``PENDING_BYTES``).
                self._lock.wait_for(
                    lambda: self._closing or self._waiting or self._pending >= GATHER_UP_TO,
                    GATHER_SECONDS,
                )
                group, self._queue = self._queue, []
            if not group:
                return
            try:
                self._write(group)
            finally:
                self._lease_children(group)  # before the parents' go: no gap between the two
                self.keeper.release([s.node.key for s in group])
                with self._lock:
                    for staged in group:
                        for name in staged.objects:
                            if self._retained(name):
                                self._keep(name)
                            else:
                                self._drop(name)
                        self._pending -= staged.size
                    self._lock.notify_all()

    def _retained(self, name: str) -> bool:
        """Whether a written object stays in memory (under the lock): a node still to be read
        names it, and it is small, or a large array's within ``RETAIN_BYTES``."""
        if name in self._kept:
            return True
        data = self._memory.get(name)
        if data is None or self._holders[name] <= 0:
            return False
        if isinstance(data, RawLeaf):
            return self._may_keep(len(data))
        return len(data) <= RETAIN_SMALL

    def _may_keep(self, size: int) -> bool:
        return not self._kept_bytes or self._kept_bytes + size <= RETAIN_BYTES

    def _keep(self, name: str) -> None:
        if name not in self._kept:
            self._kept.add(name)
            self._kept_bytes += len(self._memory[name])

    def _drop(self, name: str) -> None:
        data = self._memory.pop(name, None)
        if name in self._kept:
            self._kept.discard(name)
            self._kept_bytes -= len(data) if data is not None else 0

    def _lease_children(self, group: list[Staged]) -> None:
        """Take the leases ``lease_later`` left here, of the children of nodes just written
        (not of those of nodes that failed, nor of children written already: in this group)."""
        with self._lock:
            children = [
                child
                for staged in group
                for child in self._lease_after.pop(staged.node.key, [])
                if isinstance(self._outcomes.get(staged.node.key), Done)
                and child not in self._outcomes
            ]
        for child in children:
            self.keeper.take(child)

    def _write(self, group: list[Staged]) -> None:
        alive = [s for s in group if not self._skipped(s)]
        try:
            self._write_together(alive)
        except Exception as exc:
            if len(alive) == 1:
                self._fail(alive[0], exc)
                return
            for staged in alive:  # again one by one: a bad node fails alone
                if self._skipped(staged):
                    continue
                try:
                    self._write_together([staged])
                except Exception as exc:
                    self._fail(staged, exc)

    def _write_together(self, group: list[Staged]) -> None:
        objects = {name: data for s in group for name, data in s.objects.items()}
        self.store.write_staged(objects)
        self._written.update(objects)
        for staged in group:
            lost = sorted(staged.named - self._written)
            if lost:
                raise ds.IncompleteManifestError(
                    f"cannot commit {staged.node.key}: blobs it shares with another node of "
                    f"this run could not be written ({', '.join(lost[:3])})",
                    key=str(staged.node.key),
                    missing=tuple(lost),
                )
        self.store.commit_written([(s.node.key, s.manifest, s.replaces) for s in group])
        finished = time.time()
        for staged in group:
            self._settle(Done(staged.node.key, staged.seconds, finished))

    def _skipped(self, staged: Staged) -> bool:
        parent = staged.node.parent
        if parent is None or parent not in self._failed:
            return False
        because = self._failed[staged.node.key] = self._failed[parent]
        self._settle(Skipped(staged.node.key, because))
        return True

    def _fail(self, staged: Staged, exc: Exception) -> None:
        """(Called in the ``except`` block: the traceback is the current one.)"""
        key = staged.node.key
        self._failed[key] = key
        self._settle(Failed(key, portable(exc), traceback.format_exc()))

    def _settle(self, outcome: Done | Failed | Skipped) -> None:
        with self._lock:
            self._outcomes[outcome.key] = outcome
            self._lock.notify_all()


_RUNS: dict[str, WriteBehind] = {}


def running(run: str) -> WriteBehind | None:
    """The write-behind of run ``run`` if it was started in this process (a forked worker
    inherits the table, not the thread: the pid tells)."""
    behind = _RUNS.get(run)
    return behind if behind is not None and behind.pid == os.getpid() else None


def start(run: str, behind: WriteBehind) -> None:
    _RUNS[run] = behind


def stop(run: str) -> dict[ds.NodeKey, Done | Failed | Skipped]:
    return _RUNS.pop(run).close()
