"""Recipe: a mutating step (train, prune, fine-tune) that makes a child node, as in the paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import dagger_store as ds
from dagger_orchestrate.definition import StatePromise

if TYPE_CHECKING:
    from dagger_orchestrate.state import ExperimentState


class Recipe:
    """Subclass it; list PROPERTIES (the hashed parameters); implement ``run(state) -> state``.

    Construct with exactly the PROPERTIES as keyword arguments. Bump the optional ``VERSION``
    class attribute when a code change should invalidate cached results.
    """

    PROPERTIES: ClassVar[Sequence[str]] = ()
    VERSION: ClassVar[Any] = None

    def __init__(self, **properties: Any) -> None:
        name = type(self).__name__
        expected, given = set(self.PROPERTIES), set(properties)
        if given != expected:
            problems = []
            if expected - given:
                problems.append(f"missing {sorted(expected - given)}")
            if given - expected:
                problems.append(f"unknown {sorted(given - expected)}")
            raise TypeError(
                f"{name}() takes exactly its PROPERTIES {list(self.PROPERTIES)} as keyword "
                f"arguments: {', '.join(problems)}"
            )
        for prop, value in properties.items():
            # Refuse a value with no deterministic encoding now, not when the tree runs.
            ds.canonical_encode(value, f"{name}.{prop}")
            setattr(self, prop, value)

    @property
    def properties(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.PROPERTIES}

    def run(self, state: ExperimentState) -> ExperimentState:
        raise NotImplementedError(f"{type(self).__name__} must implement run(state) -> state")

    def __call__(self, state: StatePromise) -> StatePromise:
        if not isinstance(state, StatePromise):
            raise TypeError(
                f"{type(self).__name__}(...) is applied to a state promise (from "
                f"spawn_new_tree or another recipe), got {type(state).__name__}"
            )
        return state.definition.add_recipe(self, state)

    def __repr__(self) -> str:
        props = ", ".join(f"{k}={v!r}" for k, v in self.properties.items())
        return f"{type(self).__name__}({props})"
