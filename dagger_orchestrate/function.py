"""Function: a non-mutating action (evaluation). It adds no node and runs on every run().

Its results are stored: each value under a key made of the Function's identity (qualified
name, ``version``, source hash) and the node's key, so collaborators see each other's results.
With ``cache=True`` a stored result is reused instead of running the Function again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, overload

from dagger_orchestrate.definition import FunctionCall, StatePromise
from dagger_orchestrate.usercode import function_path, source_hash


class Function:
    """Wrap ``fn(state) -> value``: ``@dg.Function``, ``dg.Function(fn)``, or with options
    ``@dg.Function(cache=True, version=2)`` and ``dg.Function(cache=True)(fn)``.

    Calling it on a state promise schedules it for every ``run()``; its return value comes back
    in the run report (and on the returned ``FunctionCall``), and is stored with the node.

    Parameters
    ----------
    fn
        The function, called with a fresh copy of a node's state; it should return plain data
        (numbers, str, bool, None, numpy scalars and small arrays, lists, tuples and dicts of
        those), which loads from any store. Anything else is pickled, and so loads back only
        from a trusted store.
    cache
        Reuse the result stored for this Function's identity and the node instead of running it
        (the node's state is then not loaded at all). Default: run on every ``run()``.
    version
        An int or str that is part of the identity: bump it to invalidate stored results when a
        change the source hash cannot see (a helper it calls, data it reads) matters.
    """

    @overload
    def __init__(
        self, fn: Callable[..., Any], *, cache: bool = ..., version: Any = ...
    ) -> None: ...

    @overload
    def __init__(self, fn: None = ..., *, cache: bool = ..., version: Any = ...) -> None: ...

    def __init__(
        self, fn: Callable[..., Any] | None = None, *, cache: bool = False, version: Any = None
    ) -> None:
        if not isinstance(cache, bool):
            raise TypeError(f"Function(cache=...) is True or False, got {cache!r}")
        if not (version is None or type(version) in (int, str)):
            raise TypeError(f"Function(version=...) is an int or str, got {version!r}")
        self.cache = cache
        self.version = version
        self._fn: Callable[..., Any] | None = None
        if fn is not None:
            self._bind(fn)

    def _bind(self, fn: Callable[..., Any]) -> None:
        if not callable(fn) or isinstance(fn, Function):
            raise TypeError(f"Function wraps a callable fn(state), got {type(fn).__name__}")
        self._fn = fn
        functools.update_wrapper(self, fn)

    @property
    def fn(self) -> Callable[..., Any]:
        """The wrapped function."""
        if self._fn is None:
            raise TypeError(
                "this Function(...) wraps no function yet: use it as a decorator, "
                "@dg.Function(cache=True), or call it on one: dg.Function(cache=True)(fn)"
            )
        return self._fn

    @property
    def name(self) -> str:
        """The function's ``__qualname__``: how reports, records and the results table name it."""
        return getattr(self.fn, "__qualname__", repr(self.fn))

    @property
    def identity(self) -> dict[str, Any]:
        """What names this Function's stored results, with the node's key: the qualified name
        (module and qualname), ``version``, and a hash of the source ("" if it has none)."""
        return {
            "function": function_path(self.fn),
            "version": self.version,
            "source": source_hash(self.fn),
        }

    @overload
    def __call__(self, state: StatePromise) -> FunctionCall: ...

    @overload
    def __call__(self, state: Callable[..., Any]) -> Function: ...

    def __call__(self, state: StatePromise | Callable[..., Any]) -> FunctionCall | Function:
        if self._fn is None and not isinstance(state, StatePromise):
            # Function(cache=True)(fn), or a decorator with options: the options stay reusable.
            return Function(state, cache=self.cache, version=self.version)
        if not isinstance(state, StatePromise):
            raise TypeError(
                f"{self.name} is applied to a state promise, got {type(state).__name__}"
            )
        return state.definition.add_call(self, state)

    def __repr__(self) -> str:
        name = self.name if self._fn is not None else "?"
        options = "".join(
            f", {k}={v!r}" for k, v in (("cache", self.cache), ("version", self.version)) if v
        )
        return f"Function({name}{options})"
