"""Experiment: a thin facade over definition (promises, tags), plan, execute and records."""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blake3 import blake3

import dagger_store as ds
from dagger_orchestrate.codecs import plain_or_repr
from dagger_orchestrate.definition import Definition, FunctionCall, StatePromise
from dagger_orchestrate.execute import CallSpec, Done, Failed, Returned, Skipped, Waited, execute
from dagger_orchestrate.folder import absolute, is_url, open_folder
from dagger_orchestrate.graph import Graph
from dagger_orchestrate.inflight import LeaseTerms
from dagger_orchestrate.plan import resolve
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.storeref import StoreRef
from dagger_orchestrate.usercode import class_path, source_hash
from dagger_store.host import host
from dagger_store.records import add_record

if TYPE_CHECKING:
    from dagger_orchestrate.plan import NodeSpec


class StaleCodeWarning(UserWarning):
    """A cached result was computed by a recipe whose source has changed since."""


@dataclass(frozen=True, slots=True)
class FunctionResult:
    function: str
    key: ds.NodeKey
    tags: tuple[str, ...]
    value: Any
    seconds: float


@dataclass(frozen=True)
class RunReport:
    """What ``Experiment.run`` did."""

    executed: tuple[ds.NodeKey, ...]
    cached: tuple[ds.NodeKey, ...]
    waited: tuple[ds.NodeKey, ...]  # computed by another run while this one waited
    failed: tuple[ds.NodeKey, ...]
    skipped: tuple[ds.NodeKey, ...]
    results: tuple[FunctionResult, ...]
    timings: Mapping[ds.NodeKey, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{len(self.executed)} executed, {len(self.cached)} cached, {len(self.waited)} "
            f"computed by another run, {len(self.failed)} failed, {len(self.skipped)} skipped, "
            f"{len(self.results)} function results "
            f"in {self.seconds:.2f} s"
        )


class RunError(Exception):
    """A recipe or Function failed; the other branches still ran. ``report`` says what did."""

    def __init__(self, message: str, report: RunReport, failures: list[str]) -> None:
        super().__init__(message)
        self.report = report
        self.failures = failures


class Experiment:
    """A tree of states over a store, as in the paper.

    Parameters
    ----------
    path
        The experiment folder (local path, or an fsspec URL: ``s3://bucket/exp``,
        ``memory://name``): a marker naming the experiment and its store, and the embedded
        store unless the experiment uses a shared one.
    state_class
        The ExperimentState subclass of the trees spawned here.
    store
        A shared store URL (``s3://lab-cache/dagger``, an NFS folder) for a new experiment.
        Default: the ``DAGGER_STORE`` environment variable, else ``<path>/store``. An
        experiment keeps its store; pass ``store`` again only to say where it moved.
    storage_options
        For s3:// locations (endpoint_url, key, secret, ...).
    name
        The experiment's name in the store's records (``dagger-lab ls``). Default: the
        folder's name plus a short hash of its path.
    cache_dir
        For a remote store, a local folder keeping a read-through copy of what is read, so a
        state restored twice is downloaded once. True (default): ``$DAGGER_CACHE_DIR``, else
        ``~/.cache/dagger``, one subfolder per store; False: no cache.
    trust
        Whether pickled attributes may load from the store (see ``dagger_store.open_store``);
        default: a local store you created, or one whose manifests must be signed with the lab
        key (``DAGGER_LAB_KEY``). True: you trust everyone who can write there.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        state_class: type[ExperimentState] | None = None,
        *,
        store: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        cache_dir: str | bool = True,
        trust: bool | None = None,
        _create: bool = True,
    ) -> None:
        if state_class is not None and not (
            isinstance(state_class, type) and issubclass(state_class, ExperimentState)
        ):
            raise TypeError(f"state_class must subclass ExperimentState, got {state_class!r}")
        self.path = absolute(path)
        self.state_class = state_class
        options = dict(storage_options or {})
        folder = open_folder(self.path, options, store=store, name=name, create=_create)
        self.name = folder.name
        # Options are for URLs (s3://, a plugin's scheme); a local path takes none.
        store_options = options if is_url(folder.store) else {}
        self._ref = StoreRef(
            folder.store,
            tuple(sorted(store_options.items())),
            _cache_dir(folder.store, cache_dir),
            trust,
        )
        # Opened anew, so a store deleted since this process last used it is recreated.
        self.store = self._ref.open(fresh=True)
        self._definition = Definition(repr(self))
        self._graph: Graph | None = None

    def __repr__(self) -> str:
        return f"Experiment({self.path!r}, name={self.name!r}, store={self.store.url!r})"

    # -- definition ----------------------------------------------------------------------------

    def spawn_new_tree(self, **arguments: Any) -> StatePromise:
        """The root of a new tree; ``arguments`` cover PROPERTIES and go to initialize_state."""
        if self.state_class is None:
            raise TypeError("this Experiment has no state_class: pass one to Experiment(...)")
        return self._definition.spawn(self.state_class, arguments)

    def tag(self, *tags: str) -> AbstractContextManager[None]:
        """Tag every node and Function call defined inside the block; blocks nest."""
        return self._definition.tag(*tags)

    @property
    def _nodes(self) -> dict[ds.NodeKey, NodeSpec]:
        return self._definition.nodes

    @property
    def _calls(self) -> list[FunctionCall]:
        return self._definition.calls

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        scheduler: Any = None,
        *,
        progress: bool | None = None,
        lease_seconds: float = 60.0,
        wait_timeout: float | None = None,
    ) -> RunReport:
        """Compute every missing node, then run every Function; return what happened.

        Parameters
        ----------
        scheduler
            None or "sync" (default, in this thread), "threads", "processes", or a
            ``dask.distributed.Client``.
        progress
            Show a progress bar; default: when stderr is a terminal.
        lease_seconds
            How long a lease on a node being computed lasts unrenewed: another run that needs
            the node waits for it, and takes over this long after its holder died.
        wait_timeout
            How long to wait for a node another run is computing (None: while it is alive).
        """
        start = time.perf_counter()
        nodes = list(self._nodes.values())
        # Recorded first, so that the cached nodes this run relies on are already garbage
        # collection roots when it looks them up.
        self._record_definition()
        plan = resolve(nodes, self.store)
        self._warn_stale(plan.cached)
        tags = self._definition.all_tags()
        calls = [
            CallSpec(i, c.function, c.promise.node, tags[c.promise.key])
            for i, c in enumerate(self._calls)
        ]
        terms = LeaseTerms(f"{host()}:{os.getpid()}:{uuid.uuid4().hex}",
                           lease_seconds, wait_timeout)  # fmt: skip
        outcomes, returned = execute(plan, calls, self._ref, tags, terms, scheduler, progress)
        failed = [o for o in outcomes.values() if isinstance(o, Failed)]
        failures = [
            _describe_failure("", StatePromise(self._definition, self._nodes[o.key]), o)
            for o in failed
        ]
        results = []
        for call, returned_or_not in zip(self._calls, returned, strict=True):
            if isinstance(returned_or_not, Returned):
                call.result = returned_or_not.value
                results.append(
                    FunctionResult(
                        call.function.name, call.promise.key, call.tags,
                        returned_or_not.value, returned_or_not.seconds,
                    )
                )  # fmt: skip
            elif isinstance(returned_or_not, Failed):
                failed.append(returned_or_not)
                failures.append(
                    _describe_failure(f"{call.function.name} on", call.promise, returned_or_not)
                )
        report = RunReport(
            executed=tuple(k for k, o in outcomes.items() if isinstance(o, Done)),
            cached=tuple(n.key for n in nodes if n.key in plan.cached),
            waited=tuple(k for k, o in outcomes.items() if isinstance(o, Waited)),
            failed=tuple(k for k, o in outcomes.items() if isinstance(o, Failed)),
            skipped=tuple(k for k, o in outcomes.items() if isinstance(o, Skipped)),
            results=tuple(results),
            timings={k: o.seconds for k, o in outcomes.items() if isinstance(o, Done)},
            seconds=time.perf_counter() - start,
        )
        self._record_run(report)
        self._graph = None
        if failures:
            more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
            raise RunError(failures[0] + more, report, failures) from failed[0].error
        return report

    def _warn_stale(self, cached: Mapping[ds.NodeKey, ds.Manifest]) -> None:
        for key, manifest in cached.items():
            recipe = self._nodes[key].recipe
            if recipe is None:
                continue
            recorded = manifest.meta.get("node", {}).get("source", "")
            current = source_hash(type(recipe))
            name = class_path(type(recipe))
            if recorded and current and recorded != current and name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"cached results of {name} were computed by different source code than "
                    f"the current {type(recipe).__name__}; if the change matters, bump "
                    f"{type(recipe).__name__}.VERSION to recompute",
                    StaleCodeWarning,
                    stacklevel=3,
                )

    def _record_definition(self) -> None:
        nodes = [
            {
                "key": n.key.hex,
                "parent": n.parent.hex if n.parent is not None else None,
                "label": n.label,
                "recipe": type(n.recipe).__name__ if n.recipe is not None else None,
                "properties": plain_or_repr(
                    n.recipe.properties if n.recipe is not None else dict(n.arguments)
                ),
                "tags": list(self._definition.tags_of(n.key)),
            }
            for n in self._nodes.values()
        ]
        calls = [{"function": c.function.name, "node": c.promise.key.hex} for c in self._calls]
        state_class = class_path(self.state_class) if self.state_class is not None else None
        document = {"state_class": state_class, "nodes": nodes, "calls": calls}
        add_record(self.store, self.name, "def", self._nodes, document)

    def _record_run(self, report: RunReport) -> None:
        document = {
            "seconds": report.seconds,
            "executed": [k.hex for k in report.executed],
            "cached": [k.hex for k in report.cached],
            "failed": [k.hex for k in report.failed],
        }
        add_record(self.store, self.name, "run", (), document)

    # -- analysis ------------------------------------------------------------------------------

    @property
    def graph(self) -> Graph:
        """Every node this experiment has run, with tags, from its records (no payloads)."""
        if self._graph is None:
            self._graph = Graph.from_records(self.store, self.name, self.state_class)
        return self._graph

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        slim: bool = True,
        *,
        store: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | bool = True,
        trust: bool | None = None,
    ) -> Experiment:
        """Reopen an experiment folder for analysis; ``slim=False`` also loads every state.

        The store is the experiment's own, unless ``store`` says where it moved.
        """
        exp = cls(
            path,
            None,
            store=store,
            storage_options=storage_options,
            cache_dir=cache_dir,
            trust=trust,
            _create=False,
        )
        if not slim:
            for node in exp.graph.nodes:
                node.state = node.restore()
        return exp


_warned: set[str] = set()


def _cache_dir(store_url: str, wanted: str | bool) -> str | None:
    if wanted is False:
        return None
    if isinstance(wanted, str):
        return wanted
    base = os.environ.get("DAGGER_CACHE_DIR") or "~/.cache/dagger"
    return f"{base}/{blake3(store_url.encode()).hexdigest()[:16]}"


def _describe_failure(prefix: str, promise: StatePromise, failed: Failed) -> str:
    tags = ", ".join(promise.tags) or "none"
    where = f"{prefix} {promise.node.label}".strip()
    return (
        f"{where} (node {promise.key.hex[:12]}, tags: {tags}) failed: "
        f"{type(failed.error).__name__}: {failed.error}"
    )
