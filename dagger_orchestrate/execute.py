"""Run a Plan on dask: one task per missing node, one per Function call. The only dask importer.

The store is the data plane: a task receives keys, loads its parent state from the store (a
fresh copy, so siblings never see each other's mutations), runs its recipe, and commits the
result before returning a small outcome. States never travel through the scheduler, which is
why every scheduler (synchronous, threads, processes, distributed) behaves the same.

A task never raises: a failure becomes a ``Failed`` outcome and its descendants ``Skipped``, so
the other branches still finish and commit.

A Function call's task also stores its value (``results.save_result``) unless its result is
stored already; calls whose stored result is reused (``Function(cache=True)``) never get here.
"""

from __future__ import annotations

import pickle
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.local
import dask.multiprocessing
import dask.threaded
from dask.base import compute
from dask.delayed import Delayed, delayed

import dagger_store as ds
from dagger_orchestrate.inflight import LeaseTerms, claim, holding
from dagger_orchestrate.persist import label, load_state, save_state
from dagger_orchestrate.plan import NodeSpec, Plan
from dagger_orchestrate.results import save_result
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.storeref import StoreRef


@dataclass(frozen=True, slots=True)
class Done:
    key: ds.NodeKey
    seconds: float
    finished: float = 0.0  # epoch time its manifest was committed


@dataclass(frozen=True, slots=True)
class Waited:
    """Another run computed the node while this one waited for it."""

    key: ds.NodeKey
    seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    key: ds.NodeKey
    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True)
class Skipped:
    key: ds.NodeKey
    because: ds.NodeKey  # the failed ancestor


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


Outcome = Done | Waited | Failed | Skipped


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
    tasks: dict[ds.NodeKey, Delayed] = {}
    for node in plan.missing:
        parent = tasks.get(node.parent) if node.parent is not None else None
        tasks[node.key] = delayed(run_node, pure=False)(
            node, ref, tags.get(node.key, ()), terms, parent, plan.replaces.get(node.key),
            dask_key_name=f"node-{node.key.hex}",
        )  # fmt: skip
    chosen = scheduler_for(scheduler)
    call_tasks: list[Delayed] = []
    for call in calls:
        # In one thread, Functions run in the order they were defined (their prints read in
        # order); elsewhere they run as soon as their node is ready.
        after = call_tasks[-1] if call_tasks and chosen.in_order else None
        call_tasks.append(
            delayed(run_function, pure=False)(
                call, ref, tasks.get(call.node.key), after, dask_key_name=f"call-{call.index}"
            )
        )
    node_tasks = list(tasks.values())
    if not node_tasks and not call_tasks:
        return {}, []
    _check_main_guard(chosen)
    with _progress_bar(progress, chosen):
        node_results, call_results = compute(node_tasks, call_tasks, scheduler=chosen.get)
    return {o.key: o for o in node_results}, list(call_results)


def run_node(
    node: NodeSpec,
    ref: StoreRef,
    tags: tuple[str, ...],
    terms: LeaseTerms,
    parent: Outcome | None,
    replaces: int | None = None,
) -> Outcome:
    """Compute one node and commit it, unless another run does; never raises.

    ``replaces``: recompute the node although its manifest (this generation) is complete, and
    commit the result as the next generation (``Store.commit(replaces=...)``).
    """
    if isinstance(parent, Failed | Skipped):
        return Skipped(node.key, parent.key if isinstance(parent, Failed) else parent.because)
    start = time.perf_counter()
    try:
        store = ref.open()
        if replaces is not None:
            # No lease: waiting for "a manifest" would find the one being replaced. Two runs
            # recomputing one node both compute; the commit picks one winner.
            _compute(store, node, tags, start, replaces)
            return Done(node.key, time.perf_counter() - start, time.time())
        lease = claim(store, node.key, terms)
        if lease is None:
            return Waited(node.key, time.perf_counter() - start)
        with holding(store, lease, terms):
            _compute(store, node, tags, start)
        return Done(node.key, time.perf_counter() - start, time.time())
    except Exception as exc:
        return Failed(node.key, _portable(exc), traceback.format_exc())


def _compute(
    store: ds.Store,
    node: NodeSpec,
    tags: tuple[str, ...],
    start: float,
    replaces: int | None = None,
) -> None:
    if node.recipe is None:
        state = node.state_class.__new__(node.state_class)
        for name, value in node.arguments.items():
            if name in node.state_class.PROPERTIES:
                setattr(state, name, value)
        label(state, node.key, tags)
        state.initialize_state(**node.arguments)
    else:
        assert node.parent is not None
        state = load_state(store, node.parent, node.state_class, tags)
        label(state, node.key, tags)
        state = node.recipe.run(state)
        if not isinstance(state, ExperimentState):
            raise TypeError(
                f"{type(node.recipe).__name__}.run must return the state "
                f"(an ExperimentState), but returned {type(state).__name__}"
            )
    seconds = time.perf_counter() - start
    store.commit(node.key, save_state(store, state, node, seconds), repair=True, replaces=replaces)


def run_function(
    call: CallSpec, ref: StoreRef, node: Outcome | None, after: object = None
) -> Returned | Failed | Skipped:
    """Run one Function on a (fresh copy of a) committed state and store its value (unless
    ``call.save`` is False); never raises.

    ``after`` is only an ordering edge (the previous call's outcome) and is ignored.
    """
    if isinstance(node, Failed | Skipped):
        return Skipped(call.node.key, node.key if isinstance(node, Failed) else node.because)
    start = time.perf_counter()
    try:
        store = ref.open()
        state = load_state(store, call.node.key, call.node.state_class, call.tags)
        value = call.function.fn(state)
        seconds = time.perf_counter() - start
        if call.save:
            save_result(
                store, call.result_key, call.identity, call.function.name, call.node.key,
                value, seconds, replaces=call.replaces,
            )  # fmt: skip
        return Returned(call.index, value, seconds)
    except Exception as exc:
        return Failed(call.node.key, _portable(exc), traceback.format_exc())


def _portable(exc: Exception) -> BaseException:
    # Outcomes cross process boundaries: an exception that cannot be pickled is replaced by
    # one that carries its type and message.
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")


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
