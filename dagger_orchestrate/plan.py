"""resolve(nodes, store) -> Plan: which nodes of a tree must run. Pure but for one batched query.

Invariants:

- Every node's key is known before anything runs: root = H("state", state class, arguments);
  child = H("recipe", recipe class, VERSION, PROPERTIES, parent key). Tags are not identity.
- A node is cached when the store holds a complete manifest for its key; ``missing`` lists the
  others, parents before children. Nothing is loaded: deciding costs no payload bytes.
- Nodes asked to be recomputed are missing although cached; ``Plan.replaces`` gives the manifest
  generation each one supersedes (one more batched question, only when there are any).
- This module imports neither dask nor anything that writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dagger_store as ds
from dagger_orchestrate.usercode import class_path

if TYPE_CHECKING:
    from dagger_orchestrate.recipe import Recipe
    from dagger_orchestrate.state import ExperimentState


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of a tree: everything needed to compute it, picklable, no payload."""

    key: ds.NodeKey
    parent: ds.NodeKey | None
    state_class: type[ExperimentState]
    recipe: Recipe | None = None  # None: the root, built by initialize_state(**arguments)
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``Recipe(prop=value, ...)``, or ``State(arg=value, ...)`` for a root."""
        if self.recipe is not None:
            return repr(self.recipe)
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.state_class.__name__}({args})"


def root_spec(state_class: type[ExperimentState], arguments: Mapping[str, Any]) -> NodeSpec:
    """The root node of a tree spawned with ``arguments``; they must cover PROPERTIES.

    Arguments beyond PROPERTIES are legitimate (hashed too, and handed to initialize_state);
    only when a PROPERTY is missing are they named, as likely typos, with the close matches.
    """
    missing = [p for p in state_class.PROPERTIES if p not in arguments]
    if missing:
        import difflib  # only on this error path

        message = (
            f"spawn_new_tree() is missing PROPERTIES {missing} of {state_class.__name__}; "
            f"pass every one of {list(state_class.PROPERTIES)} as a keyword argument"
        )
        unknown = sorted(a for a in arguments if a not in state_class.PROPERTIES)
        if unknown:
            close = {u: difflib.get_close_matches(u, missing, n=1) for u in unknown}
            hints = ", ".join(f"{m[0]}= for {u}=" for u, m in close.items() if m)
            message += (
                f". Not PROPERTIES (they would only go to initialize_state), so likely typos: "
                f"{unknown}{f'; did you mean {hints}?' if hints else ''}"
            )
        raise TypeError(message)
    arguments = dict(sorted(arguments.items()))
    for name, value in arguments.items():
        ds.canonical_encode(value, f"{state_class.__name__}.{name}")
    key = ds.node_key("state", {"class": class_path(state_class), "arguments": arguments})
    return NodeSpec(key, None, state_class, None, arguments)


def child_spec(recipe: Recipe, parent: NodeSpec) -> NodeSpec:
    """The node made by applying ``recipe`` to ``parent``."""
    key = ds.node_key(
        "recipe",
        {
            "class": class_path(type(recipe)),
            "version": type(recipe).VERSION,
            "properties": recipe.properties,
            "parent": parent.key,
        },
    )
    return NodeSpec(key, parent.key, parent.state_class, recipe)


@dataclass(frozen=True, slots=True)
class Plan:
    """Every node of the tree (definition order) and those that must run (parents first).

    ``replaces``: the nodes asked to be recomputed that have a manifest, each with the
    generation its new manifest supersedes (``Store.commit(replaces=...)``); they are in
    ``missing``, never in ``cached``.
    """

    nodes: tuple[NodeSpec, ...]
    missing: tuple[NodeSpec, ...]
    cached: Mapping[ds.NodeKey, ds.Manifest]
    replaces: Mapping[ds.NodeKey, int] = field(default_factory=dict)

    @property
    def missing_keys(self) -> frozenset[ds.NodeKey]:
        return frozenset(n.key for n in self.missing)


def resolve(
    nodes: Iterable[NodeSpec], store: ds.Store, recompute: Iterable[ds.NodeKey] = ()
) -> Plan:
    """Ask the store once which nodes exist; the rest are missing, parents first.

    ``recompute``: keys of nodes to compute again although cached (one more batched question,
    for their manifests' generations, only when there are any).
    """
    nodes = tuple(nodes)
    wanted = frozenset(recompute) & {n.key for n in nodes}
    cached = store.manifests([n.key for n in nodes])
    replaces = store.generations(sorted(wanted)) if wanted else {}
    cached = {k: m for k, m in cached.items() if k not in wanted}
    missing = tuple(n for n in _parents_first(nodes) if n.key not in cached)
    return Plan(nodes, missing, cached, replaces)


def _parents_first(nodes: tuple[NodeSpec, ...]) -> list[NodeSpec]:
    by_key = {n.key: n for n in nodes}
    ordered: list[NodeSpec] = []
    placed: set[ds.NodeKey] = set()
    for node in nodes:
        chain = []  # iterative: a 10,000-step chain must not hit the recursion limit
        current: NodeSpec | None = node
        while current is not None and current.key not in placed:
            chain.append(current)
            current = by_key.get(current.parent) if current.parent is not None else None
        for pending in reversed(chain):
            placed.add(pending.key)
            ordered.append(pending)
    return ordered
