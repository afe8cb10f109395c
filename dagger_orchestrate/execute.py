"""Run a Plan on dask: one task per missing node, one per Function call. The only dask importer.

The store is the data plane: a task receives keys, loads its parent state from the store (a
fresh copy, so siblings never see each other's mutations), runs its recipe, and commits the
result before returning a small outcome. States never travel through the scheduler, which is
why every scheduler (synchronous, threads, processes, distributed) behaves the same.

A task never raises: a failure becomes a ``Failed`` outcome and its descendants ``Skipped``, so
the other branches still finish and commit.
"""

from __future__ import annotations

import getpass
import os
import pickle
import platform
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask.base import compute
from dask.delayed import Delayed, delayed

import dagger_store as ds
from dagger_orchestrate.inflight import LeaseTerms, claim, holding
from dagger_orchestrate.plan import NodeSpec, Plan
from dagger_orchestrate.recipe import source_hash
from dagger_orchestrate.serialize import load_attribute, save_attribute
from dagger_orchestrate.state import ExperimentState, class_path

MANIFEST_SCHEMA = 1


@dataclass(frozen=True, slots=True)
class StoreRef:
    """How a worker (thread, process or machine) opens the experiment's store."""

    url: str
    storage_options: tuple[tuple[str, Any], ...] = ()
    cache_dir: str | None = None  # remote stores: a local read-through copy; "~" is expanded
    # on the machine that opens the store, so each worker caches on its own disk
    trust: bool | None = None  # open_store's trust: may pickled attributes load from here

    def open(self, *, fresh: bool = False) -> ds.Store:
        """The process's Store for this URL; ``fresh`` opens (and checks) it anew."""
        key = (self.url, repr((self.storage_options, self.trust)))  # options: unhashable dicts
        with _stores_lock:
            if fresh or key not in _stores:
                _stores[key] = ds.open_store(
                    self.url,
                    storage_options=dict(self.storage_options),
                    cache_dir=os.path.expanduser(self.cache_dir) if self.cache_dir else None,
                    trust=self.trust,
                )
            return _stores[key]


_stores: dict[tuple[str, str], ds.Store] = {}
_stores_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Done:
    key: ds.NodeKey
    seconds: float


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
    """One Function applied to one node, with the tags it was called under."""

    index: int
    function: Any  # dagger_orchestrate.Function
    node: NodeSpec
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Returned:
    index: int
    value: Any
    seconds: float


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
            node, ref, tags.get(node.key, ()), terms, parent, dask_key_name=f"node-{node.key.hex}"
        )
    get = _scheduler(scheduler)
    call_tasks: list[Delayed] = []
    for call in calls:
        # In one thread, Functions run in the order they were defined (their prints read in
        # order); elsewhere they run as soon as their node is ready.
        after = call_tasks[-1] if call_tasks and get == "synchronous" else None
        call_tasks.append(
            delayed(run_function, pure=False)(
                call, ref, tasks.get(call.node.key), after, dask_key_name=f"call-{call.index}"
            )
        )
    node_tasks = list(tasks.values())
    if not node_tasks and not call_tasks:
        return {}, []
    with _progress_bar(progress, get):
        node_results, call_results = compute(node_tasks, call_tasks, scheduler=get)
    return {o.key: o for o in node_results}, list(call_results)


def run_node(
    node: NodeSpec,
    ref: StoreRef,
    tags: tuple[str, ...],
    terms: LeaseTerms,
    parent: Outcome | None,
) -> Outcome:
    """Compute one node and commit it, unless another run does; never raises."""
    if isinstance(parent, Failed | Skipped):
        return Skipped(node.key, parent.key if isinstance(parent, Failed) else parent.because)
    start = time.perf_counter()
    try:
        store = ref.open()
        lease = claim(store, node.key, terms)
        if lease is None:
            return Waited(node.key, time.perf_counter() - start)
        with holding(store, lease, terms):
            _compute(store, node, tags, start)
        return Done(node.key, time.perf_counter() - start)
    except Exception as exc:
        return Failed(node.key, _portable(exc), traceback.format_exc())


def _compute(store: ds.Store, node: NodeSpec, tags: tuple[str, ...], start: float) -> None:
    if node.recipe is None:
        state = node.state_class.__new__(node.state_class)
        for name, value in node.arguments.items():
            if name in node.state_class.PROPERTIES:
                setattr(state, name, value)
        _label(state, node.key, tags)
        state.initialize_state(**node.arguments)
    else:
        assert node.parent is not None
        state = load_state(store, node.parent, node.state_class, tags)
        _label(state, node.key, tags)
        state = node.recipe.run(state)
        if not isinstance(state, ExperimentState):
            raise TypeError(
                f"{type(node.recipe).__name__}.run must return the state "
                f"(an ExperimentState), but returned {type(state).__name__}"
            )
    seconds = time.perf_counter() - start
    store.commit(node.key, save_state(store, state, node, seconds))


def run_function(
    call: CallSpec, ref: StoreRef, node: Outcome | None, after: object = None
) -> Returned | Failed | Skipped:
    """Run one Function on a (fresh copy of a) committed state; never raises.

    ``after`` is only an ordering edge (the previous call's outcome) and is ignored.
    """
    if isinstance(node, Failed | Skipped):
        return Skipped(call.node.key, node.key if isinstance(node, Failed) else node.because)
    start = time.perf_counter()
    try:
        state = load_state(ref.open(), call.node.key, call.node.state_class, call.tags)
        value = call.function.fn(state)
        return Returned(call.index, value, time.perf_counter() - start)
    except Exception as exc:
        return Failed(call.node.key, _portable(exc), traceback.format_exc())


def save_state(
    store: ds.Store, state: ExperimentState, node: NodeSpec, seconds: float
) -> ds.Manifest:
    """Put every stored attribute of ``state``; the manifest that describes node and state."""
    blobs: dict[str, ds.Digest] = {}
    attributes: dict[str, Any] = {}
    for name, value in state.stored_attributes().items():
        entries, attributes[name] = save_attribute(store, name, value)
        blobs.update(entries)
    recipe = node.recipe
    meta = {
        "schema": MANIFEST_SCHEMA,
        "node": {
            "label": node.label,
            "kind": "state" if recipe is None else "recipe",
            "class": class_path(node.state_class if recipe is None else type(recipe)),
            "state_class": class_path(type(state)),
            "parent": node.parent.hex if node.parent is not None else None,
            "source": source_hash(node.state_class if recipe is None else type(recipe)),
        },
        "attributes": attributes,
        "provenance": {
            "seconds": round(seconds, 6),
            "finished": time.time(),
            "host": socket.gethostname(),
            "user": _user(),
            "python": platform.python_version(),
            "pid": os.getpid(),
        },
    }
    return ds.Manifest(blobs, meta)


def load_state(
    store: ds.Store, key: ds.NodeKey, state_class: type[ExperimentState], tags: tuple[str, ...]
) -> ExperimentState:
    """A fresh state object rebuilt from the manifest under ``key``."""
    manifest = store.get_manifest(key)
    state = state_class.__new__(state_class)
    for name, spec in manifest.meta["attributes"].items():
        setattr(state, name, load_attribute(store, manifest.blobs, name, spec, node=key))
    _label(state, key, tags)
    return state


def _label(state: ExperimentState, key: ds.NodeKey, tags: tuple[str, ...]) -> None:
    state._dagger_key = key.hex
    state._dagger_tags = tags


def _portable(exc: Exception) -> BaseException:
    # Outcomes cross process boundaries: an exception that cannot be pickled is replaced by
    # one that carries its type and message.
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""


def _scheduler(scheduler: Any) -> Any:
    if scheduler is None or scheduler in ("sync", "synchronous", "single-threaded"):
        return "synchronous"
    if scheduler in ("threads", "processes"):
        return scheduler
    if hasattr(scheduler, "get") and hasattr(scheduler, "submit"):  # a distributed Client
        return scheduler.get
    raise ValueError(
        f"unknown scheduler {scheduler!r}: use None or 'sync', 'threads', 'processes', or a "
        "dask.distributed Client"
    )


class _progress_bar:
    """dask's progress bar for local schedulers, in a terminal, on runs longer than a second."""

    def __init__(self, progress: bool | None, get: Any) -> None:
        wanted = sys.stderr.isatty() if progress is None else progress
        self._bar = None
        if wanted and isinstance(get, str):
            from dask.diagnostics.progress import ProgressBar

            self._bar = ProgressBar(minimum=1.0, out=sys.stderr)

    def __enter__(self) -> None:
        if self._bar is not None:
            self._bar.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
