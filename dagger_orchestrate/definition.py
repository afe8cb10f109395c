"""The tree being defined: nodes, their tags, Function calls, and the promises that name them.

Recipes and Functions called on a ``StatePromise`` add to its ``Definition``; nothing runs.
``Experiment`` owns one Definition and hands it to the planner when it runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagger_store as ds
from dagger_orchestrate.plan import NodeSpec, child_spec, root_spec

if TYPE_CHECKING:
    from dagger_orchestrate.function import Function
    from dagger_orchestrate.recipe import Recipe
    from dagger_orchestrate.state import ExperimentState


class StatePromise:
    """A node of the tree, defined but not (necessarily) computed. Knows its key already."""

    __slots__ = ("definition", "node")

    def __init__(self, definition: Definition, node: NodeSpec) -> None:
        self.definition = definition
        self.node = node

    @property
    def key(self) -> ds.NodeKey:
        return self.node.key

    @property
    def tags(self) -> tuple[str, ...]:
        return self.definition.tags_of(self.node.key)

    def __repr__(self) -> str:
        return f"<StatePromise {self.node.label} {self.key.hex[:12]}>"


@dataclass
class FunctionCall:
    """A Function applied to a promise; ``result`` holds the value from the latest run()."""

    function: Function
    promise: StatePromise
    tags: tuple[str, ...]
    result: Any = None


class Definition:
    """Nodes (in definition order), the tags each was defined under, and Function calls.

    ``owner`` names the experiment in errors (a promise used with another experiment's tree).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.nodes: dict[ds.NodeKey, NodeSpec] = {}
        self.calls: list[FunctionCall] = []
        self._tags: dict[ds.NodeKey, set[str]] = {}
        self._tag_stack: list[str] = []

    @contextmanager
    def tag(self, *tags: str) -> Iterator[None]:
        """Tag every node and Function call defined inside the block; blocks nest."""
        for tag in tags:
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"tags are non-empty str, got {tag!r}")
        depth = len(self._tag_stack)
        self._tag_stack.extend(tags)
        try:
            yield
        finally:
            del self._tag_stack[depth:]

    def spawn(
        self, state_class: type[ExperimentState], arguments: Mapping[str, Any]
    ) -> StatePromise:
        return self._define(root_spec(state_class, arguments))

    def add_recipe(self, recipe: Recipe, parent: StatePromise) -> StatePromise:
        self._check_own(parent)
        return self._define(child_spec(recipe, parent.node))

    def add_call(self, function: Function, promise: StatePromise) -> FunctionCall:
        self._check_own(promise)
        call = FunctionCall(function, promise, tuple(self._tag_stack))
        self.calls.append(call)
        return call

    def tags_of(self, key: ds.NodeKey) -> tuple[str, ...]:
        return tuple(sorted(self._tags[key]))

    def all_tags(self) -> dict[ds.NodeKey, tuple[str, ...]]:
        """Every node's tags, sorted."""
        return {key: tuple(sorted(tags)) for key, tags in self._tags.items()}

    def _define(self, node: NodeSpec) -> StatePromise:
        self.nodes.setdefault(node.key, node)
        self._tags.setdefault(node.key, set()).update(self._tag_stack)
        return StatePromise(self, node)

    def _check_own(self, promise: StatePromise) -> None:
        if promise.definition is not self:
            raise ValueError(
                f"{promise!r} belongs to another Experiment ({promise.definition.owner}), "
                f"not {self.owner}"
            )
