"""Function results as data: stored with the node they evaluated, and the results table.

A result is stored like a node: under a key made of who computed it from what, write-once
(first writer wins), so collaborators on one store see each other's results and a garbage
collector keeps it while an experiment's records name it::

    key    node_key("result", {"function": "module.qualname", "version": Function version,
                               "source": source hash, "node": the evaluated node's key})
    blobs  {"value": ..., "value#0": ..., ...}    the value, through the attribute codecs
    meta   {"schema": 1,
            "result": {"function": "module.qualname", "name": qualname, "version": ...,
                       "source": ..., "node": node hex},
            "value": the codec's spec (how to read the blobs back),
            "provenance": {"seconds": compute seconds, "finished": epoch time, "host": ...,
                           "user": ..., "python": ..., "pid": ...}}

Plain values (numbers, str, bool, None, numpy scalars and arrays, lists, tuples and dicts of
those) are stored without pickle and load from any store; anything else is pickled and loads only
from a trusted store (``UntrustedError`` elsewhere).

The results table (``Experiment.results()``, ``NodeSet.results()``, ``dagger-lab results``) is a
pandas DataFrame with one row per node, in graph order (depth-first from the roots, children in
the order they were defined), built from the experiment's records alone: no state is loaded.
Its columns, left to right:

- ``key`` (the node key's first 12 hex digits), ``label``, ``recipe`` (the recipe's class name;
  None for a root), ``depth`` (0 for a root), ``tags`` (sorted, joined with ", ");
- ``<Class>.<property>``: every property along the node's path, the root's arguments included
  (``State.seed``, ``Train.lr``). When a class occurs more than once on a path, occurrences are
  numbered from the root: ``Prune.fraction``, ``Prune#2.fraction``, ``Prune#3.fraction``. A node
  has no value (NaN/None) in the columns of steps below it;
- ``<function>`` (``Function.name``): the latest result of that Function on the node, when it is
  a scalar; a dict result is spread one level into ``<function>.<field>`` columns. Results are
  shown in their tabular form: numbers, str, bool and None as they are, numpy scalars as Python
  ones, anything else as a short repr. A Function column that would take a name already used by
  another column is named ``result.<function>`` instead;
- ``seconds``: how long the node took to compute, when a run of this experiment computed it
  (else NaN), and ``created``: when it was computed (a UTC ``pandas.Timestamp``, else NaT);
- with ``provenance=True``: ``provenance.<field>`` for each field of the node manifest's
  provenance (nested dicts flattened with dots); this reads one small manifest per node.

Property, Function and provenance columns each come in the order they first appear going down
the table (and, within a row, from the root down, and in the order the Functions first ran).
"""

from __future__ import annotations

import math
import os
import platform
import reprlib
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

import dagger_store as ds
from dagger_orchestrate.codecs import load_attribute, save_attribute
from dagger_store.host import host, user
from dagger_store.plain import MAX_INT, MIN_INT
from dagger_store.records import read_records

if TYPE_CHECKING:
    import pandas as pd

    from dagger_orchestrate.graph import Graph, GraphNode

RESULT_SCHEMA = 1
FIXED_COLUMNS = ("key", "label", "recipe", "depth", "tags")
TIME_COLUMNS = ("seconds", "created")

# -- stored results -------------------------------------------------------------------------------


def result_key(identity: Mapping[str, Any], node: ds.NodeKey) -> ds.NodeKey:
    """The key a Function's result on ``node`` is stored under (``identity``: Function.identity)."""
    return ds.node_key("result", {**identity, "node": node})


def save_result(
    store: ds.Store,
    key: ds.NodeKey,
    identity: Mapping[str, Any],
    name: str,
    node: ds.NodeKey,
    value: Any,
    seconds: float,
    *,
    replaces: int | None = None,
) -> ds.Commit:
    """Put ``value``'s blobs and commit its manifest under ``key`` (unless a complete one is
    there; one that names a lost blob is superseded, as is generation ``replaces``).

    ``identity`` (``Function.identity``, as the key was made from it) and ``name``
    (``Function.name``) describe the Function in the manifest; ``node`` is the node it ran on.
    """
    try:
        blobs, spec = save_attribute(store, "value", value)
    except TypeError as exc:
        reason: BaseException = exc
        while reason.__cause__ is not None:  # the pickler's own words, not the codec's advice
            reason = reason.__cause__
        raise TypeError(
            f"{name} returned a {type(value).__name__} on node {node.hex[:12]}, which "
            f"cannot be stored: it is neither plain data nor picklable ({reason}); return plain "
            "data (numbers, str, bool, None, numpy scalars or arrays, and lists, tuples or dicts "
            "of those)"
        ) from exc
    meta = {
        "schema": RESULT_SCHEMA,
        "result": {**identity, "name": name, "node": node.hex},
        "value": spec,
        "provenance": {
            "seconds": round(seconds, 6),
            "finished": time.time(),
            "host": host(),
            "user": user(),
            "python": platform.python_version(),
            "pid": os.getpid(),
        },
    }
    return store.commit(key, ds.Manifest(blobs, meta), repair=True, replaces=replaces)


def load_result(store: ds.Store, key: ds.NodeKey, manifest: ds.Manifest | None = None) -> Any:
    """The value stored under result ``key`` (its ``manifest``, if already read).

    NotFoundError if there is none; UntrustedError for a pickled value from a store that is not
    trusted; MissingClassError for one that needs a class this process cannot import.
    """
    if manifest is None:
        manifest = store.get_manifest(key)
    return load_attribute(store, manifest.blobs, "value", manifest.meta["value"], node=key)


def reusable(
    store: ds.Store, manifests: Mapping[ds.NodeKey, ds.Manifest]
) -> dict[ds.NodeKey, tuple[Any, float]]:
    """The stored values (and their compute seconds) among ``manifests`` that load here.

    A value that does not (pickled, from a store that is not trusted; a class this process
    cannot import) is left out: the Function runs again instead. Values load side by side on a
    pool of their own (the store's pool serves the reads of large values inside each load).
    """

    def load(item: tuple[ds.NodeKey, ds.Manifest]) -> tuple[Any, float] | None:
        key, manifest = item
        try:
            value = load_result(store, key, manifest)
        except (ds.UntrustedError, ds.FormatError, ImportError):  # MissingClassError: ImportError
            return None
        return value, float(manifest.meta.get("provenance", {}).get("seconds", math.nan))

    items = list(manifests.items())
    if len(items) <= 1:
        loaded = [load(item) for item in items]
    else:
        with ThreadPoolExecutor(min(16, len(items)), thread_name_prefix="dagger-result") as pool:
            loaded = list(pool.map(load, items))
    return {key: found for (key, _), found in zip(items, loaded, strict=True) if found is not None}


# -- the tabular form of a value ------------------------------------------------------------------

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_LONGEST_TEXT = 200


def tabular(value: Any) -> Any:
    """``value`` as the run record and the results table hold it.

    None, bool, int, float and str as they are (str cut at 200 characters); numpy scalars as
    the Python scalars ``.item()`` gives; a dict spread one level into ``{field: scalar}``;
    anything else its short repr.
    """
    if type(value) is dict:
        return {str(k): _scalar(v) for k, v in value.items()}
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
        item = value.item()
        if item is None or type(item) in (bool, int, float, str):
            value = item
    kind = type(value)
    if value is None or kind in (bool, float):
        return value
    if kind is int and MIN_INT <= value <= MAX_INT:
        return value
    if kind is str:
        return value if len(value) <= _LONGEST_TEXT else value[: _LONGEST_TEXT - 1] + "…"
    return _SHORT.repr(value)


# -- the results table ----------------------------------------------------------------------------


def table(
    graph: Graph, nodes: Iterable[GraphNode] | None = None, *, provenance: bool = False
) -> pd.DataFrame:
    """The results table of ``nodes`` (default: every node of ``graph``); see the module doc."""
    experiment = graph.experiment
    if experiment is None:
        raise ValueError(
            "this graph does not say which experiment it belongs to: take it from "
            "Experiment.graph (or Experiment.restore(...).graph), or call Experiment.results()"
        )
    import pandas as pd

    rows_of = list(graph.nodes if nodes is None else nodes)
    latest: dict[str, dict[str, Any]] = {}  # node hex -> Function name -> tabular value
    computed: dict[str, tuple[float, float]] = {}  # node hex -> (seconds, finished)
    for run in read_records(graph.store, experiment, "run", strict=graph.strict):
        for entry in run.get("results", ()):
            latest.setdefault(entry["node"], {})[entry["function"]] = entry["value"]
        for entry in run.get("computed", ()):
            computed[entry["node"]] = (entry["seconds"], entry["finished"])

    paths = _Paths(graph)
    rows: list[dict[str, Any]] = []
    properties: dict[str, None] = {}  # ordered sets of column names
    for node in rows_of:
        depth, columns = paths.of(node)
        properties.update(dict.fromkeys(columns))
        rows.append(
            {
                "key": node.key.hex[:12],
                "label": node.label,
                "recipe": node.recipe,
                "depth": depth,
                "tags": ", ".join(sorted(node.tags)),
                **columns,
            }
        )
    taken = {*FIXED_COLUMNS, *TIME_COLUMNS, *properties}
    functions: dict[str, None] = {}
    for node, row in zip(rows_of, rows, strict=True):
        for name, value in latest.get(node.key.hex, {}).items():
            fields = value.items() if isinstance(value, dict) else [(None, value)]
            for field, scalar in fields:
                column = name if field is None else f"{name}.{field}"
                if column in taken:
                    column = f"result.{column}"
                functions[column] = None
                row[column] = scalar
        seconds, finished = computed.get(node.key.hex, (math.nan, math.nan))
        row["seconds"], row["created"] = seconds, finished

    more: dict[str, None] = {}
    if provenance:
        manifests = graph.store.manifests([n.key for n in rows_of])
        for node, row in zip(rows_of, rows, strict=True):
            manifest = manifests.get(node.key)
            if manifest is not None:
                found = _flat("provenance", manifest.meta.get("provenance") or {})
                more.update(dict.fromkeys(found))
                row.update(found)

    order = [*FIXED_COLUMNS, *properties, *functions, *TIME_COLUMNS, *more]
    frame = pd.DataFrame.from_records(rows, columns=order) if rows else pd.DataFrame(columns=order)
    frame["recipe"] = pd.Series([n.recipe for n in rows_of], index=frame.index, dtype=object)
    frame["depth"] = frame["depth"].astype("int64")
    frame["seconds"] = frame["seconds"].astype("float64")
    frame["created"] = pd.to_datetime(frame["created"].astype("float64"), unit="s", utc=True)
    return frame


class _Paths:
    """Each node's depth and property columns, from its ancestors' (computed once per node)."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        # node key -> (depth, columns, occurrences of each class on the path)
        self._known: dict[ds.NodeKey, tuple[int, dict[str, Any], dict[str, int]]] = {}

    def of(self, node: GraphNode) -> tuple[int, dict[str, Any]]:
        chain: list[GraphNode] = []
        current: GraphNode | None = node
        while current is not None and current.key not in self._known:
            chain.append(current)  # iterative: a 10,000-step chain must not recurse
            current = current.parent
        for step in reversed(chain):
            if step.parent is None:
                depth, columns, seen = 0, {}, {}
            else:
                above = self._known[step.parent.key]
                depth, columns, seen = above[0] + 1, dict(above[1]), dict(above[2])
            name = step.recipe if step.recipe is not None else self._root_class(step)
            seen[name] = seen.get(name, 0) + 1
            prefix = name if seen[name] == 1 else f"{name}#{seen[name]}"
            for prop, value in step.properties.items():
                columns[f"{prefix}.{prop}"] = value
            self._known[step.key] = (depth, columns, seen)
        depth, columns, _ = self._known[node.key]
        return depth, columns

    def _root_class(self, root: GraphNode) -> str:
        # A root's recorded label is "<state class name>(arguments)", as the .def record has it.
        name = root.label.partition("(")[0]
        return name or self._graph.state_class.__name__


def _flat(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for field, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(f"{prefix}.{field}", value))
        else:
            flat[f"{prefix}.{field}"] = value
    return flat


# -- text -----------------------------------------------------------------------------------------

_WIDEST_CELL = 48


def text_table(frame: pd.DataFrame) -> str:
    """``frame`` as an aligned text table: numbers right-aligned, floats to 4 significant
    digits, times in UTC to the second, a missing value as "-", long text cut at 48 characters."""
    columns: list[list[str]] = []
    right: list[bool] = []
    for name in frame.columns:
        series = frame[name]
        cells = [_text(v) for v in series.tolist()]
        columns.append([str(name), *cells])
        right.append(series.dtype.kind in "iuf")
    widths = [max(len(c) for c in column) for column in columns]
    lines = []
    for i in range(len(frame) + 1):
        cells = [
            (column[i].rjust(w) if r else column[i].ljust(w))
            for column, w, r in zip(columns, widths, right, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _text(value: Any) -> str:
    import pandas as pd

    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, pd.Timestamp):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= _WIDEST_CELL else text[: _WIDEST_CELL - 1] + "…"
