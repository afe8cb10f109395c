"""Run a Plan on dask: one task per missing node, one per Function call. The only dask importer.

The store is the data plane: a task receives keys, loads its parent state from the store (a
fresh copy, so siblings never see each other's mutations), runs its recipe, and commits the
result before returning a small outcome. States never travel through the scheduler, which is
why every scheduler (synchronous, threads, processes, distributed) behaves the same. Where a
task runs in the run's own process, it hands its staged state to the run's write-behind
instead (``writebehind.py``), and its children read it from there: the same bytes, decoded
the same way, without waiting for the disk.

The task graph is written out as a dict (dask's graph specification), each task's arguments
one literal object: building it through ``dask.delayed`` cost about a millisecond a node.

A task never raises: a failure becomes a ``Failed`` outcome and its descendants ``Skipped``, so
the other branches still finish and commit.

A Function call's task also stores its value (``results.save_result``) unless its result is
stored already; calls whose stored result is reused (``Function(cache=True)``) never get here.
"""

from __future__ import annotations

import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import dask.base
import dask.local
import dask.multiprocessing
import dask.threaded

import dagger_store as ds
from dagger_orchestrate import writebehind
from dagger_orchestrate.inflight import LeaseTerms, claim, holding
from dagger_orchestrate.outcomes import Done, Failed, Outcome, Skipped, Waited, portable
from dagger_orchestrate.persist import label, load_state, save_state
from dagger_orchestrate.plan import NodeSpec, Plan
from dagger_orchestrate.results import save_result
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.storeref import StoreRef
from dagger_orchestrate.writebehind import Staged, WriteBehind


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One Function applied to one node, with the tags it was called under.

    ``result_key``: where its value is stored, made from ``identity`` (``Function.identity``,
    computed once, where the run was started); ``save``: whether to store it (False when a
    result is stored there already: the first writer's stays); ``replaces``: the generation of
    a stored result to supersede (its node was recomputed on demand: the value is of the
    superseded state).
    """

    index: int
    function: Any  # dagger_orchestrate.Function
    node: NodeSpec
    tags: tuple[str, ...]
    result_key: ds.NodeKey
    identity: Mapping[str, Any]
    save: bool = True
    replaces: int | None = None


@dataclass(frozen=True, slots=True)
class Returned:
    index: int
    value: Any
    seconds: float
    cached: bool = False  # a stored result, reused: the Function did not run


@dataclass(frozen=True, slots=True)
class NodeTask:
    """What a node's task needs, as one literal argument (dask looks into tuples, not into
    this). ``run``: the run's id, which finds its write-behind where the task runs in the
    run's own process."""

    node: NodeSpec
    ref: StoreRef
    tags: tuple[str, ...]
    terms: LeaseTerms
    run: str
    replaces: int | None = None


def execute(
    plan: Plan,
    calls: Sequence[CallSpec],
    ref: StoreRef,
    tags: Mapping[ds.NodeKey, tuple[str, ...]],
    terms: LeaseTerms,
    scheduler: Any = None,
    progress: bool | None = None,
) -> tuple[dict[ds.NodeKey, Outcome], list[Returned | Failed | Skipped]]:
    """Run the missing nodes, then every Function call; return their outcomes."""
    run = uuid.uuid4().hex
    chosen = scheduler_for(scheduler)
    # The task graph is written out directly (dask's graph specification): building it
    # through dask.delayed costs more per node than a tiny node's whole computation.
    graph: dict[str, tuple[Any, ...]] = {}
    names: dict[ds.NodeKey, str] = {}
    for node in plan.missing:
        task = NodeTask(node, ref, tags.get(node.key, ()), terms, run, plan.replaces.get(node.key))
        parent = names.get(node.parent) if node.parent is not None else None
        names[node.key] = name = f"node-{node.key.hex}"
        graph[name] = (run_node, task, parent)
    previous: str | None = None
    for call in calls:
        # In one thread, Functions run in the order they were defined (their prints read in
        # order); elsewhere they run as soon as their node is ready.
        after = previous if chosen.in_order else None
        graph[previous := f"call-{call.index}"] = (
            run_function, call, ref, names.get(call.node.key), after, run,
        )  # fmt: skip
    if not graph:
        return {}, []
    _check_main_guard(chosen)
    readers = Counter(n.parent for n in plan.missing if n.parent in names)
    readers.update(c.node.key for c in calls if c.node.key in names)
    writebehind.start(run, writebehind.WriteBehind(ref.open(), readers, terms))
    try:
        with _progress_bar(progress, chosen):
            results = _get(chosen)(graph, list(graph))
    finally:
        written = writebehind.stop(run)
    node_results: list[Outcome] = results[: len(names)]
    outcomes = {o.key: written.get(o.key, o) for o in node_results}
    return outcomes, list(results[len(names) :])


def run_node(task: NodeTask, parent: Outcome | None) -> Outcome:
    """Compute one node and commit it (or submit it to the run's write-behind), unless another
    run does; never raises.

    ``task.replaces``: recompute the node although its manifest (this generation) is complete,
    and commit the result as the next generation (``Store.commit(replaces=...)``).
    """
    node = task.node
    if isinstance(parent, Failed | Skipped):
        return _skipped(node.key, parent)
    start = time.perf_counter()
    lease = None
    behind = writebehind.running(task.run)
    try:
        store = task.ref.open()
        # No lease to recompute: waiting for "a manifest" would find the one being replaced.
        # Two runs recomputing one node both compute; the commit picks one winner.
        if task.replaces is None and not (
            behind is not None and node.parent is not None and behind.lease_later(node)
        ):
            lease = claim(store, node.key, task.terms)
            if lease is None:
                return Waited(node.key, time.perf_counter() - start)
        if behind is None:
            with holding(store, lease, task.terms) if lease else nullcontext():
                state = _state(store, node, task.tags, None)
                seconds = time.perf_counter() - start
                manifest = save_state(store, state, node, seconds)
                store.commit(node.key, manifest, repair=True, replaces=task.replaces)
            return Done(node.key, time.perf_counter() - start, time.time())
        if lease is not None:
            behind.keeper.hold(lease)
        because = behind.failed(node.parent)
        if because is not None:  # its parent was computed, then could not be written
            behind.forget(node.key)
            return Skipped(node.key, because)
        state = _state(store, node, task.tags, behind)
        seconds = time.perf_counter() - start
        with store.staged(behind.known) as stage:
            manifest = save_state(store, state, node, seconds)
        behind.submit(
            Staged(
                node,
                manifest,
                stage.objects,
                frozenset(stage.named),
                seconds,
                task.replaces,
                stage.kept,
                frozenset(stage.rewritten),
            )
        )
        return Done(node.key, seconds)  # until the write-behind says how its write went
    except Exception as exc:
        if behind is not None:
            behind.forget(node.key)
            # Reading the parent may fail because the run could not write it (or an
            # ancestor): then this node is skipped, not failed.
            parent_written = behind.written(node.parent) if node.parent is not None else None
            if isinstance(parent_written, Failed | Skipped):
                return _skipped(node.key, parent_written)
        return Failed(node.key, portable(exc), traceback.format_exc())


def _skipped(key: ds.NodeKey, parent: Failed | Skipped) -> Skipped:
    return Skipped(key, parent.key if isinstance(parent, Failed) else parent.because)


def _state(
    store: ds.Store, node: NodeSpec, tags: tuple[str, ...], behind: WriteBehind | None
) -> ExperimentState:
    """The node's state, computed: from its arguments (a root) or from its parent's state."""
    if node.recipe is None:
        state = node.state_class.__new__(node.state_class)
        for name, value in node.arguments.items():
            if name in node.state_class.PROPERTIES:
                setattr(state, name, value)
        label(state, node.key, tags)
        state.initialize_state(**node.arguments)
        return state
    assert node.parent is not None
    state = _load(store, node.parent, node.state_class, tags, behind, node.key)
    label(state, node.key, tags)
    state = node.recipe.run(state)
    if not isinstance(state, ExperimentState):
        raise TypeError(
            f"{type(node.recipe).__name__}.run must return the state "
            f"(an ExperimentState), but returned {type(state).__name__}"
        )
    return state


def _load(
    store: ds.Store,
    key: ds.NodeKey,
    state_class: type[ExperimentState],
    tags: tuple[str, ...],
    behind: WriteBehind | None,
    reader: ds.NodeKey | None = None,
) -> ExperimentState:
    """A fresh copy of the state of ``key``: from what the run staged, if it holds it, else
    from the store. ``reader``: the node computed from it (``WriteBehind.read``)."""
    held = behind.parent(key) if behind is not None else None
    if held is None:
        return load_state(store, key, state_class, tags)
    manifest, objects, copy = held
    try:
        with store.reading(objects, copy):
            return load_state(store, key, state_class, tags, manifest=manifest)
    finally:
        assert behind is not None
        behind.read(key, reader)


def run_function(
    call: CallSpec,
    ref: StoreRef,
    node: Outcome | None,
    after: object = None,
    run: str = "",
) -> Returned | Failed | Skipped:
    """Run one Function on a (fresh copy of a) computed state and store its value (unless
    ``call.save`` is False); never raises.

    ``after`` is only an ordering edge (the previous call's outcome) and is ignored.
    """
    if isinstance(node, Failed | Skipped):
        return _skipped(call.node.key, node)
    start = time.perf_counter()
    try:
        store = ref.open()
        behind = writebehind.running(run) if node is not None else None
        state = _load(store, call.node.key, call.node.state_class, call.tags, behind)
        written = behind.written(call.node.key) if behind is not None else None
        if isinstance(written, Failed | Skipped):  # its value would be of a state not stored
            return _skipped(call.node.key, written)
        value = call.function.fn(state)
        seconds = time.perf_counter() - start
        if call.save:
            save_result(
                store, call.result_key, call.identity, call.function.name, call.node.key,
                value, seconds, replaces=call.replaces,
            )  # fmt: skip
        return Returned(call.index, value, seconds)
    except Exception as exc:
        return Failed(call.node.key, portable(exc), traceback.format_exc())


def _get(scheduler: Scheduler) -> Callable[..., Any]:
    """The dask get function that computes with ``scheduler``."""
    if not isinstance(scheduler.get, str):
        return scheduler.get
    # dask's own lookup imports distributed to look for a client: a third of a second.
    get: Callable[..., Any] | None = _GETS.get(scheduler.get)
    return get or dask.base.get_scheduler(scheduler=scheduler.get)


@dataclass(frozen=True, slots=True)
class Scheduler:
    """What dask computes the tasks with.

    ``get`` is what ``dask.compute(scheduler=...)`` accepts: a name dask knows ("synchronous",
    "threads", "processes") or a get function (``dask.threaded.get``, a Ray-on-dask get, a
    ``distributed.Client.get``). ``in_order``: it runs one task at a time in this thread, so
    Functions are made to run in the order they were defined. ``local``: dask's local
    callbacks (the progress bar) see its tasks.
    """

    get: str | Callable[..., Any]
    in_order: bool = False
    local: bool = True


_SYNC = Scheduler("synchronous", in_order=True)
_SCHEDULERS: dict[str, Scheduler] = {
    "sync": _SYNC,
    "synchronous": _SYNC,
    "single-threaded": _SYNC,
    "threads": Scheduler("threads"),
    "processes": Scheduler("processes"),
}
_GETS: dict[str, Callable[..., Any]] = {
    "synchronous": dask.local.get_sync,
    "threads": dask.threaded.get,
    "processes": dask.multiprocessing.get,
}
# dask's own get functions, for what dagger knows of them.
_KNOWN_GETS: dict[Any, Scheduler] = {
    dask.local.get_sync: Scheduler(dask.local.get_sync, in_order=True),
    dask.threaded.get: Scheduler(dask.threaded.get),
    dask.multiprocessing.get: Scheduler(dask.multiprocessing.get),
}


def register_scheduler(
    name: str, get: str | Callable[..., Any], *, in_order: bool = False, local: bool = True
) -> None:
    """Make ``exp.run(name)`` compute with ``get`` (see ``Scheduler``); replaces ``name``.

    For example ``register_scheduler("ray", ray.util.dask.ray_dask_get)``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a scheduler name is a non-empty str, got {name!r}")
    if not (isinstance(get, str) or callable(get)):
        raise TypeError(
            f"scheduler {name!r}: get is a dask scheduler name or a get function "
            f"get(graph, keys, **kwargs), got {type(get).__name__}"
        )
    _SCHEDULERS[name] = Scheduler(get, in_order=in_order, local=local)


def scheduler_for(scheduler: Any) -> Scheduler:
    """How to compute with ``scheduler``: None (synchronous), a registered name, a
    ``Scheduler``, a ``distributed.Client``, or a dask get function."""
    if scheduler is None:
        return _SYNC
    if isinstance(scheduler, Scheduler):
        return scheduler
    if isinstance(scheduler, str):
        if scheduler in _SCHEDULERS:
            return _SCHEDULERS[scheduler]
        raise ValueError(
            f"unknown scheduler {scheduler!r}: use None or one of "
            f"{', '.join(repr(n) for n in sorted(_SCHEDULERS))}, a dask.distributed Client, "
            "or a dask get function (dask.threaded.get, ...); "
            "dagger_orchestrate.register_scheduler(name, get) adds a name"
        )
    if hasattr(scheduler, "get") and hasattr(scheduler, "submit"):  # a distributed Client
        return Scheduler(scheduler.get, local=False)
    if callable(scheduler):
        return _KNOWN_GETS.get(scheduler) or Scheduler(scheduler)
    raise TypeError(
        f"a scheduler is None, a name, a dask.distributed Client or a dask get function, got "
        f"{type(scheduler).__name__}: {scheduler!r}"
    )


def _check_main_guard(scheduler: Scheduler) -> None:
    """Refuse, before any process starts, to compute in processes for a script that every
    worker would run again: dask starts its workers with "spawn", which imports the main script
    anew, so a run outside ``if __name__ == "__main__":`` re-runs in each and breaks the pool."""
    if not (
        scheduler.get in ("processes", "multiprocessing")
        or scheduler.get is dask.multiprocessing.get
    ):
        return
    if dask.multiprocessing.get_context().get_start_method() == "fork":
        return  # a forked worker does not import the script again
    from dagger_orchestrate.usercode import unguarded_main_line

    where = unguarded_main_line()
    if where is not None:
        path, line = where
        raise RuntimeError(
            f"{path}, line {line}, runs the experiment in processes outside an "
            '`if __name__ == "__main__":` block: every worker process imports the script again '
            "and would run it again. Put the code that defines and runs the experiment under "
            '`if __name__ == "__main__":` (keep states, recipes and Functions at module level, '
            'where workers import them), or run with "threads"'
        )


class _progress_bar:
    """dask's progress bar for local schedulers, in a terminal, on runs longer than a second."""

    def __init__(self, progress: bool | None, scheduler: Scheduler) -> None:
        wanted = sys.stderr.isatty() if progress is None else progress
        self._bar = None
        if wanted and scheduler.local:
            from dask.diagnostics.progress import ProgressBar

            self._bar = ProgressBar(minimum=1.0, out=sys.stderr)

    def __enter__(self) -> None:
        if self._bar is not None:
            self._bar.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
