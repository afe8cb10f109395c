"""The analysis API: the slim graph of an experiment, NodeSet filters, restore, draw.

Built from the experiment's records alone: no payload is loaded until ``node.restore()``.
Order is deterministic: depth-first from the roots, children in the order they were defined.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import dagger_store as ds
from dagger_orchestrate.persist import load_state
from dagger_orchestrate.state import ExperimentState
from dagger_store.gcpause import collection_paused
from dagger_store.records import read_records

if TYPE_CHECKING:
    import graphviz
    import pandas as pd
    from matplotlib.figure import Figure

_GLOB_CHARS = re.compile(r"[*?[]")  # what fnmatch reads as a pattern; anything else is literal


class GraphNode:
    """One node: its recipe and properties, tags, parent and children. ``restore()`` loads it."""

    def __init__(
        self,
        graph: Graph,
        key: ds.NodeKey,
        label: str,
        recipe: str | None,
        properties: dict[str, Any],
    ) -> None:
        self.graph = graph
        self.key = key
        self.label = label
        self.recipe = recipe
        self.properties = properties
        self.tags: frozenset[str] = frozenset()
        self.parent: GraphNode | None = None
        self.children: list[GraphNode] = []
        self.state: ExperimentState | None = None  # filled by Experiment.restore(slim=False)

    @property
    def depth(self) -> int:
        depth, node = 0, self.parent
        while node is not None:
            depth, node = depth + 1, node.parent
        return depth

    def restore(self, attributes: Iterable[str] | None = None) -> ExperimentState:
        """Load this node's state from the store (a fresh copy each call).

        ``attributes``: load only these (e.g. ``["model"]``); default: every stored attribute.
        MissingClassError if an attribute's object needs a class not importable here (the error
        names node, attribute and class; ``error.state`` has the other attributes).
        """
        return load_state(
            self.graph.store,
            self.key,
            self.graph.state_class,
            tuple(sorted(self.tags)),
            attributes,
        )

    def __repr__(self) -> str:
        tags = f" [{', '.join(sorted(self.tags))}]" if self.tags else ""
        return f"<{self.label}{tags} {self.key.hex[:12]}>"


class NodeSet(Sequence[GraphNode]):
    """An ordered set of nodes: ``filter``, ``&``, ``|``, ``-``, ``len``, indexing.

    Held as a set of the graph's nodes, put in graph order only when read in order: filters and
    set operations are set algebra, never a pass over the whole graph.
    """

    def __init__(self, graph: Graph, nodes: Iterable[GraphNode]) -> None:
        self._graph = graph
        self._members = graph._own(nodes)
        self._ordered: tuple[GraphNode, ...] | None = None

    @classmethod
    def _of(cls, graph: Graph, members: frozenset[GraphNode]) -> NodeSet:
        """The NodeSet of ``members``, already nodes of ``graph`` (no matching by key)."""
        nodes = cls.__new__(cls)
        nodes._graph, nodes._members, nodes._ordered = graph, members, None
        return nodes

    @property
    def _nodes(self) -> tuple[GraphNode, ...]:
        if self._ordered is None:
            self._ordered = tuple(n for n in self._graph._order if n in self._members)
        return self._ordered

    def filter(self, *patterns: str) -> NodeSet:
        """Nodes with a tag matching every glob pattern; ``"!pat"``: with no tag matching it."""
        members = self._members
        for pattern in patterns:
            hits = self._graph._tagged(pattern.lstrip("!"))
            members = members - hits if pattern.startswith("!") else members & hits
        return NodeSet._of(self._graph, members)

    def _check(self, other: object) -> NodeSet:
        if not isinstance(other, NodeSet) or other._graph is not self._graph:
            raise TypeError("set operations combine NodeSets of the same graph")
        return other

    def __and__(self, other: object) -> NodeSet:
        return NodeSet._of(self._graph, self._members & self._check(other)._members)

    def __or__(self, other: object) -> NodeSet:
        return NodeSet._of(self._graph, self._members | self._check(other)._members)

    def __sub__(self, other: object) -> NodeSet:
        return NodeSet._of(self._graph, self._members - self._check(other)._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, node: object) -> bool:
        return node in self._members

    @overload
    def __getitem__(self, index: int) -> GraphNode: ...
    @overload
    def __getitem__(self, index: slice) -> NodeSet: ...
    def __getitem__(self, index: int | slice) -> GraphNode | NodeSet:
        if isinstance(index, slice):
            return NodeSet._of(self._graph, frozenset(self._nodes[index]))
        return self._nodes[index]

    def __iter__(self) -> Iterator[GraphNode]:
        return iter(self._nodes)

    def results(self, provenance: bool = False) -> pd.DataFrame:
        """The results table of these nodes, one row each, in graph order: the columns of
        ``Experiment.results`` (documented there and in ``dagger_orchestrate.results``)."""
        from dagger_orchestrate.results import table

        return table(self._graph, self, provenance=provenance)

    def plot(self, x: str, y: str, hue: str | None = None) -> Figure:
        """A matplotlib figure of column ``y`` against column ``x`` of ``results()``.

        Lines per ``hue`` group where x is numeric and distinct within the group, else points;
        see ``dagger_orchestrate.plots.plot``. Needs matplotlib: ``pip install
        'dagger-lab[plots]'`` (ImportError otherwise).
        """
        from dagger_orchestrate.plots import plot, require_matplotlib

        require_matplotlib("NodeSet.plot")
        return plot(self.results(), x, y, hue)

    def _repr_html_(self) -> str | None:
        """Jupyter's view: the results table of these nodes (sortable by its headers)."""
        from dagger_orchestrate.report import notebook_html

        return notebook_html(self, tree=False)

    def __repr__(self) -> str:
        return f"NodeSet({list(self._nodes)})"


class Graph:
    """The tree(s) of an experiment. Read-only once built: filters index the nodes' tags."""

    def __init__(
        self,
        store: ds.Store,
        state_class: type[ExperimentState],
        experiment: str | None = None,
        *,
        strict: bool = False,
    ) -> None:
        self.store = store
        self.state_class = state_class
        self.experiment = experiment  # whose records it was built from (for results())
        self.strict = strict  # a bad record raises (else it is skipped with a RecordWarning)
        self._by_key: dict[ds.NodeKey, GraphNode] = {}
        self._order: list[GraphNode] = []
        self._all: frozenset[GraphNode] | None = None  # built on first use, as is _by_tag
        self._by_tag: dict[str, frozenset[GraphNode]] | None = None

    @classmethod
    def from_records(
        cls,
        store: ds.Store,
        experiment: str,
        state_class: type[ExperimentState] | None,
        *,
        strict: bool = False,
    ) -> Graph:
        with collection_paused():
            definitions = read_records(store, experiment, "def", strict=strict)
            if state_class is None:
                state_class = _recorded_state_class(store, definitions)
            graph = cls(store, state_class, experiment, strict=strict)
            graph._link(definitions)
        return graph

    def _link(self, definitions: list[dict[str, Any]]) -> None:
        """The nodes of every definition (a node's first entry wins; its tags are the union of
        all of its entries), linked to their parents, in graph order."""
        # Keyed by hex while building: a str caches its hash, a NodeKey hashes in Python, and a
        # re-run's definition repeats every node.
        nodes: dict[str, GraphNode] = {}
        parents: dict[str, str | None] = {}
        # One frozenset per distinct set of tags (a sweep's siblings share theirs): fewer objects.
        tag_sets: dict[frozenset[str], frozenset[str]] = {}
        for definition in definitions:
            for entry in definition["nodes"]:
                key = entry["key"]
                node = nodes.get(key)
                if node is None:
                    node = nodes[key] = GraphNode(
                        self, ds.NodeKey(key), entry["label"], entry["recipe"], entry["properties"]
                    )
                    parents[key] = entry["parent"] or None
                elif node.tags.issuperset(entry["tags"]):
                    continue
                tags = node.tags.union(entry["tags"])
                node.tags = tag_sets.setdefault(tags, tags)
        for key, node in nodes.items():
            parent = parents[key]
            if parent in nodes:
                node.parent = nodes[parent]
                node.parent.children.append(node)
            elif parent is not None:
                ds.NodeKey(parent)  # a parent not in the records is dropped, a malformed one raises
        self._by_key = {node.key: node for node in nodes.values()}
        self._order = [n for root in self.roots for n in _preorder(root)]

    @property
    def nodes(self) -> NodeSet:
        if self._all is None:
            self._all = frozenset(self._order)
        return NodeSet._of(self, self._all)

    def _own(self, nodes: Iterable[GraphNode]) -> frozenset[GraphNode]:
        """This graph's nodes among ``nodes``: a node of another Graph counts by its key."""
        found: set[GraphNode] = set()
        for node in nodes:
            mine = node if node.graph is self else self._by_key.get(node.key)
            if mine is not None:
                found.add(mine)
        return frozenset(found)

    def _tagged(self, pattern: str) -> frozenset[GraphNode]:
        """The nodes with a tag matching the glob ``pattern``.

        Matched against the distinct tags, not the nodes: a sweep has far fewer tags than nodes.
        """
        if self._by_tag is None:
            by_tag: dict[str, set[GraphNode]] = {}
            for node in self._order:
                for tag in node.tags:
                    by_tag.setdefault(tag, set()).add(node)
            self._by_tag = {tag: frozenset(found) for tag, found in by_tag.items()}
        if not _GLOB_CHARS.search(pattern):  # a plain tag (fnmatch would compare it whole)
            return self._by_tag.get(pattern, frozenset())
        return frozenset().union(
            *(found for tag, found in self._by_tag.items() if fnmatch.fnmatchcase(tag, pattern))
        )

    @property
    def roots(self) -> tuple[GraphNode, ...]:
        return tuple(n for n in self._by_key.values() if n.parent is None)

    @property
    def root(self) -> GraphNode:
        """The root, when the experiment has exactly one tree."""
        if len(self.roots) != 1:
            raise ValueError(f"this graph has {len(self.roots)} roots; use graph.roots")
        return self.roots[0]

    def node(self, key: str | ds.NodeKey) -> GraphNode:
        """The node with this key, or with this unique key prefix."""
        text = key.hex if isinstance(key, ds.NodeKey) else key
        found = [n for n in self._order if n.key.hex.startswith(text)] if text else []
        if len(found) != 1:
            raise KeyError(
                f"{len(found)} nodes match {text!r}; give a longer key prefix"
                if found
                else f"no node {text!r} in this experiment"
            )
        return found[0]

    def nodes_at_distance(self, distance: int) -> NodeSet:
        """Nodes ``distance`` steps below a root (0: the roots)."""
        return NodeSet(self, (n for n in self._order if n.depth == distance))

    def __len__(self) -> int:
        return len(self._order)

    def __str__(self) -> str:
        return self.render()

    def render(self, annotate: Callable[[GraphNode], str] | None = None) -> str:
        """The text tree; ``annotate(node)``, if given, is appended to each node's line."""
        lines: list[str] = []
        for root in self.roots:
            stack = [(root, "", "")]
            while stack:
                node, first, rest = stack.pop()
                tags = f"  [{', '.join(sorted(node.tags))}]" if node.tags else ""
                note = f"  {annotate(node)}" if annotate else ""
                lines.append(f"{first}{node.label}{tags}  {node.key.hex[:12]}{note}")
                for i in reversed(range(len(node.children))):
                    last = i == len(node.children) - 1
                    branch = (
                        rest + ("└── " if last else "├── "),
                        rest + ("    " if last else "│   "),
                    )
                    stack.append((node.children[i], *branch))
        return "\n".join(lines)

    def plot(self, x: str, y: str, hue: str | None = None) -> Figure:
        """A matplotlib figure of column ``y`` against column ``x`` of the results table.

        Parameters
        ----------
        x
            The horizontal axis: numeric (lines per ``hue`` group where x values are distinct
            within the group, else points; a log scale when positive and spanning at least two
            orders of magnitude) or categorical (points).
        y
            The vertical axis; a numeric column.
        hue
            A column splitting the rows into series, each with its colour and legend entry.

        Returns
        -------
        matplotlib.figure.Figure
            Shows inline in Jupyter; ``fig.savefig("plot.png")`` writes it.

        Raises
        ------
        ImportError
            matplotlib is missing: ``pip install 'dagger-lab[plots]'``.
        """
        return self.nodes.plot(x, y, hue)

    def _repr_html_(self) -> str:
        """Jupyter's view: the tree coloured by the first numeric result, and the table."""
        from dagger_orchestrate.report import notebook_html

        return notebook_html(self.nodes, tree=True) or ""

    def draw(self, path: str | None = None, *, color_by: str | None = None) -> graphviz.Digraph:
        """A ``graphviz.Digraph`` (shows inline in Jupyter); with ``path``, also render it there.

        Rendering needs Graphviz's ``dot`` program; the Digraph itself does not.

        ``color_by`` fills the nodes, with a legend: by a column of the results table (a
        viridis scale from its minimum to its maximum for numbers, the value shown in the box;
        a colour per value otherwise), or by tags, ``"tag:GLOB"`` (e.g. ``"tag:lr:*"``: a
        colour per set of matching tags). Nodes without a value are white, dashed grey.
        """
        import graphviz

        dot = graphviz.Digraph("experiment", graph_attr={"rankdir": "TB"})
        colors = None
        if color_by is not None:
            from dagger_orchestrate.report import coloring, graphviz_legend, graphviz_style

            results = None if color_by.startswith("tag:") else self.nodes.results()
            colors = coloring(self._order, results, color_by)
            legend = graphviz_legend(colors)
            if legend is not None:
                with dot.subgraph(name="cluster_legend") as box:
                    box.attr(label="", style="rounded", color="#bbbbbb")
                    box.node("legend", legend, shape="plaintext")
        for node in self._order:
            tags = f"\n[{', '.join(sorted(node.tags))}]" if node.tags else ""
            label = f"{node.label}{tags}\n{node.key.hex[:12]}"
            if colors is None:
                dot.node(node.key.hex, label, shape="box")
            else:
                short = node.key.hex[:12]
                if colors.kind == "scale" and short in colors.shown:
                    label += f"\n{colors.by} = {colors.shown[short]}"
                dot.node(node.key.hex, label, shape="box", **graphviz_style(colors, short))
            if node.parent is not None:
                dot.edge(node.parent.key.hex, node.key.hex)
        if path is not None:
            if shutil.which("dot") is None:
                raise RuntimeError(
                    f"cannot render {path!r}: Graphviz's 'dot' program is not installed "
                    "(apt-get install graphviz, brew install graphviz, or conda install "
                    "graphviz); graph.draw() without a path still returns the Digraph"
                )
            stem, ext = os.path.splitext(path)
            dot.render(stem, format=ext.lstrip(".") or "svg", cleanup=True)
        return dot


def _preorder(root: GraphNode) -> Iterator[GraphNode]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


class StandInWarning(UserWarning):
    """The experiment's state class cannot be imported: states restore onto a stand-in."""


def _recorded_state_class(
    store: ds.Store, definitions: list[dict[str, Any]]
) -> type[ExperimentState]:
    """The state class the records name; a stand-in of that name where it cannot be imported.

    Importing runs a module's code, and records are not signed: a class is imported only from a
    trusted store; elsewhere states come back as a stand-in, silently (that is the rule).
    """
    named = [d for d in definitions if d.get("state_class")]
    if not named:
        return ExperimentState
    path: str = named[-1]["state_class"]
    properties = named[-1].get("state_properties")
    if properties is None:  # written before state_properties were recorded: the root's arguments
        roots = [n for n in named[-1]["nodes"] if n["parent"] is None]
        properties = list(roots[0]["properties"]) if roots else []
    if not store.trusted:
        return _stand_in(path, properties)
    try:
        return _import_class(path)
    except ImportError as exc:
        module = path.rpartition(".")[0]
        where = (
            "it was defined in a script run as __main__"
            if module == "__main__"
            else f"module {module!r} is not importable here"
        )
        warnings.warn(
            f"the state class {path} cannot be imported ({where}: {exc}); states restore onto a "
            "stand-in class of that name that carries every stored attribute and its "
            f"PROPERTIES {list(properties)}. For the real class, pass it: "
            "Experiment.restore(path, state_class=...), or make its module importable "
            "(PYTHONPATH, or install the package)",
            StandInWarning,
            stacklevel=4,
        )
        return _stand_in(path, properties)


def _import_class(path: str) -> type[ExperimentState]:
    module, _, qualname = path.rpartition(".")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ImportError(f"{module!r} has no {qualname!r}") from None
    if not (isinstance(found, type) and issubclass(found, ExperimentState)):
        raise ImportError(f"{path} is not an ExperimentState subclass")
    return found


def _stand_in(path: str, properties: Sequence[str]) -> type[ExperimentState]:
    """A class of the same name to restore attributes onto, when the real one is not at hand."""
    namespace = {"PROPERTIES": tuple(properties), "__module__": path.rpartition(".")[0]}
    return type(path.rsplit(".", 1)[-1], (ExperimentState,), namespace)
