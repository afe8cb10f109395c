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
process reading the store would see. An object stays in memory while it is not yet written,
or while a node that names it has reads to come (its children and Function calls in the plan);
then it is dropped, and read from the store if it is needed again.

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
from dataclasses import dataclass

import dagger_store as ds
from dagger_orchestrate.inflight import Keeper, LeaseTerms
from dagger_orchestrate.outcomes import Done, Failed, Skipped, portable
from dagger_orchestrate.plan import NodeSpec
from dagger_store.leases import Lease

# How long the writer lets submissions gather before it writes them as one group.
GATHER_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class Staged:
    """A computed node, staged: its manifest, the objects it staged, the key of every blob it
    names (staged by it or by a node before it), and its lease, to release once written."""

    node: NodeSpec
    manifest: ds.Manifest
    objects: Mapping[str, bytes]
    named: frozenset[str]
    seconds: float
    lease: Lease | None = None
    replaces: int | None = None


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
        self._memory: dict[str, bytes] = {}
        self._refs: Counter[str] = Counter()
        self._held: dict[ds.NodeKey, tuple[ds.Manifest, list[str]]] = {}
        self._readers = Counter(readers)
        self._queue: list[Staged] = []
        self._submitted: set[ds.NodeKey] = set()
        self._waiting = 0  # tasks waiting in ``written``: the writer does not linger then
        self._closing = False
        self._lock = threading.Condition()
        self._outcomes: dict[ds.NodeKey, Done | Failed | Skipped] = {}
        self._failed: dict[ds.NodeKey, ds.NodeKey] = {}  # node -> the failed node it descends from
        self._thread = threading.Thread(target=self._run, name="dagger-write-behind", daemon=True)
        self._thread.start()

    # -- the computing side ----------------------------------------------------------------

    def parent(self, key: ds.NodeKey) -> tuple[ds.Manifest, Mapping[str, bytes]] | None:
        """The manifest of ``key`` and the objects to read its state from (``Store.reading``),
        if this run staged it and holds it for its readers; call ``read`` once read."""
        with self._lock:
            held = self._held.get(key)
        return None if held is None else (held[0], self._memory)

    def read(self, key: ds.NodeKey) -> None:
        """One of the readers of ``key`` has read it (or will not)."""
        with self._lock:
            self._readers[key] -= 1
            if self._readers[key] <= 0 and key in self._held:
                self._unref(self._held.pop(key)[1])

    def written(self, key: ds.NodeKey) -> Done | Failed | Skipped | None:
        """Wait until ``key`` is written, if this run submitted it; how that went (None: not
        this run's to write).

        A node's recipe starts only once its parent is written: a crash while a long child
        computes must not take the parent's work with it. Its siblings, its reading of the
        parent and everything after it still overlap the writing."""
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
        with self._lock:
            self._submitted.add(key)
            for name, data in staged.objects.items():
                self._memory.setdefault(name, data)
            self._ref(staged.objects)  # the write's own hold, until it is written
            if self._readers[key] > 0:
                named = [name for name in staged.named if name in self._memory]
                self._ref(named)
                self._held[key] = (staged.manifest, named)
            self.known.update(staged.objects)
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
                # does), unless a task waits for what is queued.
                self._lock.wait_for(lambda: self._closing or self._waiting, GATHER_SECONDS)
                group, self._queue = self._queue, []
            if not group:
                return
            try:
                self._write(group)
            finally:
                self.keeper.release([s.node.key for s in group if s.lease is not None])
                with self._lock:
                    for staged in group:
                        self._unref(staged.objects)

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

    def _ref(self, names: Iterable[str]) -> None:
        for name in names:  # (not Counter.update: it takes a mapping's values for counts)
            self._refs[name] += 1

    def _unref(self, names: Iterable[str]) -> None:
        for name in names:
            self._refs[name] -= 1
            if self._refs[name] <= 0:
                del self._refs[name]
                self._memory.pop(name, None)


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
