"""Experiment: a thin facade over definition (promises, tags), plan, execute and records."""

from __future__ import annotations

import fnmatch
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from blake3 import blake3

import dagger_store as ds
from dagger_orchestrate.codecs import plain_or_repr
from dagger_orchestrate.definition import Definition, FunctionCall, StatePromise
from dagger_orchestrate.execute import CallSpec, Returned, execute
from dagger_orchestrate.folder import absolute, is_url, open_folder
from dagger_orchestrate.graph import Graph
from dagger_orchestrate.graph import GraphNode as GraphNodeType
from dagger_orchestrate.inflight import LeaseTerms
from dagger_orchestrate.outcomes import Done, Failed, Skipped, Waited
from dagger_orchestrate.plan import resolve
from dagger_orchestrate.results import (
    load_result,
    result_key,
    reusable,
    table,
    tabular,
)
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.storeref import StoreRef
from dagger_orchestrate.usercode import class_path, helper_hashes, source_hash
from dagger_store.gcpause import collection_paused
from dagger_store.host import host
from dagger_store.records import add_record, add_record_once, read_records
from dagger_store.usercache import cache_dir

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from dagger_orchestrate.function import Function
    from dagger_orchestrate.graph import GraphNode
    from dagger_orchestrate.outcomes import Outcome
    from dagger_orchestrate.plan import NodeSpec


class StaleCodeWarning(UserWarning):
    """Cached nodes were computed by code that has changed since; ``run`` reuses them as they are.

    A node's code is its recipe class (its state class, for a root): its source, and the
    module-level functions of its module that it calls by name (``usercode.helper_hashes``),
    both recorded in the node's manifest when it is computed (metadata: keys do not change).
    The warning names the stale nodes (short key and label) and is given once per process for
    a given node and code. It stops for a node once that node is recomputed (bump the recipe's
    VERSION: a new key; or ``run(recompute=...)``: a new manifest of the current code), or once
    the change is accepted: ``Experiment.accept_stale()`` records, in the experiment's records,
    that the node's result stands for the current code; a later change warns again.
    """


@dataclass(frozen=True, slots=True)
class FunctionResult:
    """A Function's value on the node ``key``; ``result_key``: where the value is stored.

    ``cached``: a stored result was reused (``Function(cache=True)``): the Function did not run,
    and ``seconds`` are those its stored evaluation took.
    """

    function: str
    key: ds.NodeKey
    tags: tuple[str, ...]
    value: Any
    seconds: float
    cached: bool = False
    result_key: ds.NodeKey | None = None


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
            f"{len(self.results)} function results"
            + (f" ({reused} reused)" if (reused := sum(r.cached for r in self.results)) else "")
            + f" in {self.seconds:.2f} s"
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
    strict_records
        Reading this experiment's records (graph, results, ``load_result``): False (default)
        skips a corrupt or untrusted record with a ``RecordWarning`` naming it; True raises
        (IntegrityError or UntrustedError naming it) instead.
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
        strict_records: bool = False,
        _create: bool = True,
    ) -> None:
        if state_class is not None and not (
            isinstance(state_class, type) and issubclass(state_class, ExperimentState)
        ):
            raise TypeError(f"state_class must subclass ExperimentState, got {state_class!r}")
        self.path = absolute(path)
        self.state_class = state_class
        self.strict_records = strict_records
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
            create=_create,
        )
        try:
            # Opened anew, so a store deleted since this process last used it is recreated
            # (by Experiment(...); restore creates nothing, and says what it did not find).
            self.store = self._ref.open(fresh=True)
        except ds.StoreOpenError as exc:
            named = (
                "given as store="
                if store
                else f"as {folder.marker} names it ({folder.recorded!r}); if it moved, pass "
                "store= with where it is now"
            )
            raise ds.StoreOpenError(
                f"{exc} (the store of experiment {self.name!r}, {named})", url=exc.url
            ) from exc
        self._definition = Definition(repr(self))
        self._graph: Graph | None = None

    def __repr__(self) -> str:
        return f"Experiment({self.path!r}, name={self.name!r}, store={self.store.url!r})"

    # -- definition ----------------------------------------------------------------------------

    def spawn_new_tree(self, **arguments: Any) -> StatePromise:
        """The root of a new tree; ``arguments`` cover PROPERTIES and go to initialize_state.

        Arguments beyond PROPERTIES are hashed too and handed to initialize_state; when a
        PROPERTY is missing, the TypeError names them as likely typos, with close matches.
        """
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
        recompute: Any = None,
        recompute_descendants: bool = True,
    ) -> RunReport:
        """Compute every missing node, then run every Function; return what happened.

        A node whose stored manifest names a lost blob is computed again (a repair); its new
        manifest supersedes the incomplete one, also when the recipe is nondeterministic.

        Each Function's value is stored with its node (``FunctionResult.result_key``); a
        ``Function(cache=True)`` whose result is stored already is not run again, and its
        node's state is not loaded.

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
        recompute
            Nodes to compute again although cached (a bug fixed in a recipe without a
            ``VERSION`` bump): a promise, a graph node or ``NodeSet``, a node key, a tag glob
            pattern (str: the nodes of this experiment with a tag matching it, as in
            ``NodeSet.filter``), or a list of those. Their new results supersede the stored
            ones (a new manifest generation; gc collects what only the old one named); they
            are listed in ``RunReport.executed``. ValueError if one names no node here.
        recompute_descendants
            Recompute the descendants of those nodes too (default), so that nothing is left
            built on a superseded result.
        """
        start = time.perf_counter()
        nodes = list(self._nodes.values())
        tags = self._definition.all_tags()
        redo = _recompute_keys(recompute, self._nodes, tags, recompute_descendants)
        identities = {id(c.function): c.function.identity for c in self._calls}
        calls = [
            CallSpec(
                i, c.function, c.promise.node, tags[c.promise.key],
                result_key(identities[id(c.function)], c.promise.key), identities[id(c.function)],
            )
            for i, c in enumerate(self._calls)
        ]  # fmt: skip
        # Planning builds objects for every node and frees none: no collections meanwhile.
        with collection_paused():
            # Recorded first, so that the cached nodes this run relies on, and the results it will
            # store, are already garbage collection roots when it looks them up or writes them.
            self._record_definition([c.result_key for c in calls], tags)
            plan = resolve(nodes, self.store, redo)
            self._warn_stale(plan.cached)
            # One batched question for every call's stored result: cached Functions reuse theirs
            # (no state loaded, nothing run); the others run, and store a value only where none is.
            stored = self.store.manifests([c.result_key for c in calls]) if calls else {}
            # A recomputed node's stored results are of the superseded state: never reused.
            hits = reusable(
                self.store,
                {c.result_key: stored[c.result_key] for c in calls
                 if c.function.cache and c.result_key in stored and c.node.key not in redo},
            )  # fmt: skip
            reused = {
                c.index: Returned(c.index, *hits[c.result_key], cached=True)
                for c in calls
                if c.function.cache and c.result_key in hits
            }
            # A recomputed node's stored results are superseded by the new values (one more
            # batched round, only when something is recomputed).
            superseded = (
                self.store.generations(
                    c.result_key for c in calls if c.node.key in redo and c.result_key in stored
                )
                if redo
                else {}
            )
            to_run = [
                replace(
                    c,
                    save=c.result_key not in stored or c.result_key in superseded,
                    replaces=superseded.get(c.result_key),
                )
                for c in calls
                if c.index not in reused
            ]
        terms = LeaseTerms(f"{host()}:{os.getpid()}:{uuid.uuid4().hex}",
                           lease_seconds, wait_timeout)  # fmt: skip
        outcomes, ran = execute(plan, to_run, self._ref, tags, terms, scheduler, progress)
        by_index = reused | {c.index: r for c, r in zip(to_run, ran, strict=True)}
        returned = [by_index[c.index] for c in calls]
        failed = [o for o in outcomes.values() if isinstance(o, Failed)]
        failures = [
            _describe_failure("", StatePromise(self._definition, self._nodes[o.key]), o)
            for o in failed
        ]
        results = []
        for call, spec, returned_or_not in zip(self._calls, calls, returned, strict=True):
            if isinstance(returned_or_not, Returned):
                call.result = returned_or_not.value
                results.append(
                    FunctionResult(
                        call.function.name, call.promise.key, call.tags,
                        returned_or_not.value, returned_or_not.seconds,
                        returned_or_not.cached, spec.result_key,
                    )
                )  # fmt: skip
            elif isinstance(returned_or_not, Failed):
                failed.append(returned_or_not)
                failures.append(
                    _describe_failure(f"{call.function.name} on", call.promise, returned_or_not)
                )
        with collection_paused():
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
            self._record_run(report, outcomes)
        self._graph = None
        if failures:
            more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
            raise RunError(failures[0] + more, report, failures) from failed[0].error
        return report

    def _warn_stale(self, cached: Mapping[ds.NodeKey, ds.Manifest]) -> None:
        """One StaleCodeWarning naming the cached nodes whose code changed since (see there)."""
        stale = _stale(self._nodes, cached)
        if stale:  # the records are read only when some node looks stale
            accepted = _accepted(self.store, self.name)
            stale = [s for s in stale if accepted.get(s.key.hex) != s.current]
        if all((s.key, s.token) in _warned for s in stale):
            return
        _warned.update((s.key, s.token) for s in stale)
        warnings.warn(_stale_message(stale), StaleCodeWarning, stacklevel=3)

    def accept_stale(
        self, nodes: Iterable[StatePromise | GraphNode | ds.NodeKey] | None = None
    ) -> tuple[ds.NodeKey, ...]:
        """Accept that the code changes ``StaleCodeWarning`` reports do not matter.

        For each defined node (or each of ``nodes``) that is cached and whose code changed since
        it was computed, and is not accepted for the current code yet, records (one record of
        this experiment, kind ``accept``) that its result stands for the current code: the
        warning stops naming it, until that code changes again. Nothing is recomputed. Returns
        the keys accepted now (none: nothing written). To recompute instead, bump the recipe's
        VERSION or ``run(recompute=...)``.
        """
        if nodes is None:
            keys = list(self._nodes)
        else:
            keys = [n if isinstance(n, ds.NodeKey) else n.key for n in nodes]
            unknown = [k.hex[:12] for k in keys if k not in self._nodes]
            if unknown:
                raise ValueError(
                    f"accept_stale: node(s) {', '.join(unknown)} are not defined in this "
                    "experiment: the current code is known only for the nodes defined here"
                )
        stale = _stale(self._nodes, self.store.manifests(keys))
        if stale:
            accepted = _accepted(self.store, self.name)
            stale = [s for s in stale if accepted.get(s.key.hex) != s.current]
        if stale:
            document = {"nodes": {s.key.hex: s.current for s in stale}}
            add_record(self.store, self.name, "accept", (), document)
        return tuple(s.key for s in stale)

    def _record_definition(
        self,
        result_keys: Iterable[ds.NodeKey] = (),
        tags: Mapping[ds.NodeKey, tuple[str, ...]] | None = None,
    ) -> None:
        """The defined tree (nodes, tags, Function calls); its keys, the gc roots it makes,
        are the nodes' and the keys their Functions' results are stored under. ``tags``:
        ``Definition.all_tags()``, if the caller has it already."""
        tags = self._definition.all_tags() if tags is None else tags
        result_keys = list(result_keys)
        calls = [{"function": c.function.name, "node": c.promise.key.hex} for c in self._calls]
        state_class = class_path(self.state_class) if self.state_class is not None else None
        properties = list(self.state_class.PROPERTIES) if self.state_class is not None else []

        def document() -> dict[str, Any]:
            nodes = [
                {
                    "key": n.key.hex,
                    "parent": n.parent.hex if n.parent is not None else None,
                    "label": n.label,
                    "recipe": type(n.recipe).__name__ if n.recipe is not None else None,
                    "properties": plain_or_repr(
                        n.recipe.properties if n.recipe is not None else dict(n.arguments)
                    ),
                    "tags": list(tags[n.key]),
                }
                for n in self._nodes.values()
            ]
            return {
                "state_class": state_class,
                "state_properties": properties,
                "nodes": nodes,
                "calls": calls,
            }

        # A node's label, recipe and properties follow from its key; what else can differ
        # between two definitions is hashed, so that a re-run of the same tree adds nothing.
        identity = blake3(
            msgpack.packb(
                [
                    state_class,
                    properties,
                    [(k.hex, tags[k]) for k in self._nodes],
                    calls,
                    [k.hex for k in result_keys],
                ]
            )
        ).hexdigest()
        add_record_once(
            self.store, self.name, "def", identity,
            lambda: dict.fromkeys([*self._nodes, *result_keys]), document,
        )  # fmt: skip

    def _record_run(self, report: RunReport, outcomes: Mapping[ds.NodeKey, Outcome]) -> None:
        """What ran, per computed node its seconds and finish time, and per Function result
        its key and tabular value; the result keys are the record's ``keys``, so garbage
        collection keeps the stored results while the experiment exists."""
        computed = [
            {"node": k.hex, "seconds": o.seconds, "finished": o.finished}
            for k, o in outcomes.items()
            if isinstance(o, Done)
        ]
        results = [
            {
                "function": r.function,
                "node": r.key.hex,
                "result": r.result_key.hex if r.result_key is not None else None,
                "value": tabular(r.value),
                "seconds": r.seconds,
                "cached": r.cached,
            }
            for r in report.results
        ]
        document = {
            "seconds": report.seconds,
            "executed": [k.hex for k in report.executed],
            "cached": [k.hex for k in report.cached],
            "failed": [k.hex for k in report.failed],
            "computed": computed,
            "results": results,
        }
        keys = dict.fromkeys(r.result_key for r in report.results if r.result_key is not None)
        add_record(self.store, self.name, "run", keys, document)

    # -- analysis ------------------------------------------------------------------------------

    @property
    def graph(self) -> Graph:
        """Every node this experiment has run, with tags, from its records (no payloads)."""
        if self._graph is None:
            self._graph = Graph.from_records(
                self.store, self.name, self.state_class, strict=self.strict_records
            )
        return self._graph

    def results(self, provenance: bool = False) -> pd.DataFrame:
        """The results table: a pandas DataFrame, one row per node, in graph order.

        Built from the experiment's records (and, with ``provenance``, one small manifest per
        node): no state is loaded. Columns, left to right:

        - ``key`` (first 12 hex digits), ``label``, ``recipe`` (class name; None for a root),
          ``depth``, ``tags`` (sorted, joined with ", ");
        - ``<Class>.<property>`` for every property along the node's path, the root's arguments
          included (``State.seed``, ``Train.lr``); a class occurring again on the path is
          numbered from the root (``Prune.fraction``, ``Prune#2.fraction``); a node has NaN/None
          in the columns of steps below it;
        - ``<function>`` (``Function.name``): the Function's latest result on the node, a dict
          result spread into ``<function>.<field>`` (``result.<function>`` where the name is
          another column's already);
        - ``seconds`` and ``created`` (UTC Timestamp): when a run of this experiment computed
          the node, how long it took and when it finished (else NaN, NaT);
        - with ``provenance=True``: ``provenance.<field>`` for each field of the node
          manifest's provenance (nested dicts flattened with dots).

        Property, Function and provenance columns come in the order they first appear going
        down the table. ``graph.nodes.filter(...).results()`` gives the rows of some nodes.
        """
        return table(self.graph, provenance=provenance)

    def plot(self, x: str, y: str, hue: str | None = None) -> Figure:
        """A matplotlib Figure of column ``y`` against ``x`` of ``results()``, one colour per
        value of ``hue`` (needs the ``plots`` extra: ``pip install 'dagger-lab[plots]'``)."""
        return self.graph.plot(x, y, hue)

    def report(
        self,
        path: str | os.PathLike[str],
        *,
        color_by: str | None = None,
        x: str | None = None,
        y: str | None = None,
        hue: str | None = None,
    ) -> Path:
        """Write the self-contained HTML report (tree coloured by ``color_by``, the results
        table, a plot of ``y`` against ``x``) to ``path``; the path written.

        Defaults as ``dagger-lab report``: the first numeric Function result colours the tree
        and is plotted against the first varying numeric property.
        """
        from dagger_orchestrate.report import report_html  # matplotlib, if any, loads late

        nodes = self.graph.nodes
        page = report_html(
            nodes,
            nodes.results(),
            title=self.name,
            store_url=self.store.url,
            color_by=color_by,
            x=x,
            y=y,
            hue=hue,
        )
        target = Path(path)
        target.write_text(page, encoding="utf-8")
        return target

    def load_result(
        self, function: Function | str, node: StatePromise | GraphNode | ds.NodeKey | str
    ) -> Any:
        """A Function's stored result on ``node``, loaded from the store (whoever computed it).

        ``function``: the Function (its current identity: name, version, source) or its name
        (the result the latest run of this experiment recorded for it); ``node``: a promise,
        a graph node, a NodeKey or a unique key prefix. KeyError if no such result is stored;
        UntrustedError for a pickled result from a store that is not trusted.
        """
        if isinstance(node, str):
            key = self.graph.node(node).key
        else:
            key = node if isinstance(node, ds.NodeKey) else node.key
        if isinstance(function, str):
            latest = next(
                (
                    entry["result"]
                    for run in reversed(
                        read_records(self.store, self.name, "run", strict=self.strict_records)
                    )
                    for entry in reversed(run.get("results", ()))
                    if entry["function"] == function and entry["node"] == key.hex
                ),
                None,
            )
            if latest is None:
                raise KeyError(
                    f"no run of {self.name} recorded a result of {function} on node {key.hex[:12]}"
                )
            target = ds.NodeKey(latest)
        else:
            target = result_key(function.identity, key)
        try:
            return load_result(self.store, target)
        except ds.NotFoundError:
            raise KeyError(
                f"no stored result of {function if isinstance(function, str) else function.name}"
                f" on node {key.hex[:12]} in {self.store.url} (result key {target.hex[:12]}): "
                "it has not run on this node with this source and version"
            ) from None

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
        state_class: type[ExperimentState] | None = None,
        strict_records: bool = False,
    ) -> Experiment:
        """Reopen an experiment folder for analysis; ``slim=False`` also loads every state.

        The store is the experiment's own, unless ``store`` says where it moved. States restore
        as the class the records name, imported (from a trusted store), or as ``state_class``
        when given: for a class that cannot be imported here, such as one defined in the
        training script (a ``StandInWarning`` says so when a stand-in is used instead).
        ``strict_records``: raise on a corrupt or untrusted record instead of skipping it with
        a warning (see the class).
        """
        exp = cls(
            path,
            state_class,
            store=store,
            storage_options=storage_options,
            cache_dir=cache_dir,
            trust=trust,
            strict_records=strict_records,
            _create=False,
        )
        if not slim:
            for node in exp.graph.nodes:
                node.state = node.restore()
        return exp


_warned: set[tuple[ds.NodeKey, str]] = set()  # (node, code token) warned about already


@dataclass(frozen=True, slots=True)
class _Stale:
    """A cached node whose code changed: what changed, and the current code's fingerprint."""

    key: ds.NodeKey
    node: NodeSpec
    code: type
    changed: str  # "its source", "function scale() it calls", or both
    current: dict[str, Any]  # {"class", "source", "helpers"}: as accept records store it

    @property
    def token(self) -> str:
        helpers = sorted(self.current["helpers"].items())
        return f"{self.current['class']}|{self.current['source']}|{helpers}"


def _stale(
    nodes: Mapping[ds.NodeKey, NodeSpec], cached: Mapping[ds.NodeKey, ds.Manifest]
) -> list[_Stale]:
    """The cached nodes whose recorded code differs from the current (unknown is not stale)."""
    found = []
    for key, manifest in cached.items():
        node = nodes.get(key)
        if node is None:
            continue
        code: type = node.state_class if node.recipe is None else type(node.recipe)
        recorded = manifest.meta.get("node", {})
        source, helpers = source_hash(code), helper_hashes(code)
        changed = []
        if recorded.get("source") and source and recorded["source"] != source:
            changed.append("its source")
        before = recorded.get("helpers")
        # (Not a dict: written before helpers were recorded, so unknown.)
        if isinstance(before, dict) and before != helpers:
            names = sorted(
                n
                for n in set(before) | set(helpers)
                if before.get(n) != helpers.get(n) and before.get(n) != "" and helpers.get(n) != ""
            )
            if names:
                changed.append(f"function{'s' * (len(names) > 1)} {', '.join(names)}() it calls")
        if changed:
            current = {"class": class_path(code), "source": source, "helpers": helpers}
            found.append(_Stale(key, node, code, " and ".join(changed), current))
    return found


def _accepted(store: ds.Store, experiment: str) -> dict[str, Any]:
    """Node (hex) -> the code fingerprint its result was accepted for, the latest record's."""
    accepted: dict[str, Any] = {}
    for record in read_records(store, experiment, "accept"):
        accepted.update(record.get("nodes", {}))
    return accepted


def _stale_message(stale: list[_Stale], shown: int = 3) -> str:
    groups: dict[tuple[str, str], list[_Stale]] = {}
    for s in stale:
        groups.setdefault((s.current["class"], s.changed), []).append(s)
    lines = []
    for (name, changed), group in groups.items():
        listed = ", ".join(f"{s.key.hex[:12]} {_short(s.node.label)}" for s in group[:shown])
        more = f" and {len(group) - shown} more" if len(group) > shown else ""
        lines.append(f"  {name} ({changed} changed): {listed}{more}")
    recipes = sorted({s.code.__name__ for s in stale if s.node.recipe is not None})
    bump = f"bump {', '.join(f'{r}.VERSION' for r in recipes)} or " if recipes else ""
    count = f"{len(stale)} cached node{'s were' if len(stale) > 1 else ' was'}"
    return (
        f"{count} computed by code that has changed since, and reused as computed:\n"
        + "\n".join(lines)
        + f"\nIf the change matters, recompute them: {bump}run(recompute=...); if it does not, "
        "Experiment.accept_stale() records that and this warning stops"
    )


def _short(label: str, width: int = 60) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."


def _cache_dir(store_url: str, wanted: str | bool) -> str | None:
    if wanted is False:
        return None
    if isinstance(wanted, str):
        return wanted
    return f"{cache_dir()}/{blake3(store_url.encode()).hexdigest()[:16]}"


def _describe_failure(prefix: str, promise: StatePromise, failed: Failed) -> str:
    tags = ", ".join(promise.tags) or "none"
    where = f"{prefix} {promise.node.label}".strip()
    return (
        f"{where} (node {promise.key.hex[:12]}, tags: {tags}) failed: "
        f"{type(failed.error).__name__}: {failed.error}"
    )


def _recompute_keys(
    recompute: Any,
    nodes: Mapping[ds.NodeKey, NodeSpec],
    tags: Mapping[ds.NodeKey, tuple[str, ...]],
    descendants: bool,
) -> frozenset[ds.NodeKey]:
    """The keys ``Experiment.run(recompute=...)`` names, with their descendants if asked."""
    if recompute is None:
        return frozenset()
    items = (
        [recompute]
        if isinstance(recompute, str | ds.NodeKey | StatePromise | GraphNodeType)
        else list(recompute)
    )
    chosen: set[ds.NodeKey] = set()
    for item in items:
        if isinstance(item, str):
            negate = item.startswith("!")
            found = {
                k for k in nodes
                if any(fnmatch.fnmatchcase(t, item.lstrip("!")) for t in tags.get(k, ()))
                != negate
            }  # fmt: skip
            if not found:
                raise ValueError(
                    f"recompute={item!r}: no node of this experiment has a tag matching it"
                )
            chosen |= found
            continue
        key = item.key if isinstance(item, StatePromise | GraphNodeType) else item
        if not isinstance(key, ds.NodeKey):
            raise TypeError(
                "recompute takes promises, graph nodes (a NodeSet), node keys or tag patterns "
                f"(str), got {type(item).__name__}: {item!r}"
            )
        if key not in nodes:
            raise ValueError(
                f"recompute: node {key.hex[:12]} is not defined in this experiment "
                "(define it, or pass a node of this tree)"
            )
        chosen.add(key)
    if descendants:
        children: dict[ds.NodeKey, list[ds.NodeKey]] = {}
        for node in nodes.values():
            if node.parent is not None:
                children.setdefault(node.parent, []).append(node.key)
        pending = list(chosen)
        while pending:
            for child in children.get(pending.pop(), ()):
                if child not in chosen:
                    chosen.add(child)
                    pending.append(child)
    return frozenset(chosen)
