"""Function: a non-mutating action (evaluation). It adds no node and runs on every run()."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from dagger_orchestrate.definition import FunctionCall, StatePromise


class Function:
    """Wrap ``fn(state) -> value``: ``@dg.Function`` or ``dg.Function(fn)``.

    Calling it on a state promise schedules it for every ``run()``; its return value comes back
    in the run report (and on the returned ``FunctionCall``).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError(f"Function wraps a callable fn(state), got {type(fn).__name__}")
        self.fn = fn
        functools.update_wrapper(self, fn)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, state: StatePromise) -> FunctionCall:
        if not isinstance(state, StatePromise):
            raise TypeError(
                f"{self.name} is applied to a state promise, got {type(state).__name__}"
            )
        return state.definition.add_call(self, state)

    def __repr__(self) -> str:
        return f"Function({self.name})"
