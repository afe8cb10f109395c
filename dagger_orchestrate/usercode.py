"""How user code is named in keys and manifests, and fingerprinted to notice it changed."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import os
import sys
import threading
import weakref
from collections.abc import Callable
from types import CodeType, FrameType, FunctionType, ModuleType
from typing import Any


def class_path(cls: type) -> str:
    """``module.QualName``: how a class is named in keys and manifests."""
    return f"{cls.__module__}.{cls.__qualname__}"


def function_path(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function; for a callable object without a name, its class's."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return class_path(type(fn))


def source_hash(code: type | Callable[..., Any]) -> str:
    """A hash of a class's or function's source ("" when it has none), to notice it changed.

    Cached per object: ``inspect.getsource`` parses the whole module (10-25 ms) on every call.
    The cache holds its objects weakly, so functions defined on the fly do not pile up.
    """
    try:
        return _source_hashes[code]
    except (KeyError, TypeError):  # TypeError: an object that cannot be weakly referenced
        pass
    try:
        with _parsing:
            text = inspect.getsource(code)
    except (OSError, TypeError):
        text = ""
    found = hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""
    with contextlib.suppress(TypeError):
        _source_hashes[code] = found
    return found


_source_hashes: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# One parse at a time: CPython 3.11's ast module is not safe in several threads at once (it can
# raise "SystemError: AST constructor recursion depth mismatch"), and getsource of a class
# parses its module; recipes' first states are saved by several worker threads together.
_parsing = threading.Lock()


def helper_hashes(cls: type) -> dict[str, str]:
    """The module-level functions of ``cls``'s module that its code calls, by name, each with
    its ``source_hash``: what a recipe's own source does not show changing.

    Found by name from the class's methods (and from those functions in turn): every global
    name their code uses that is a plain function defined in that same module. Functions of
    other modules, classes, and functions reached otherwise (through an attribute, a dict of
    callables) are not followed. Metadata only: it never takes part in a key. Cached per class.
    """
    try:
        return dict(_helper_hashes[cls])
    except (KeyError, TypeError):
        pass
    module = cls.__module__
    pending: list[tuple[CodeType, dict[str, Any]]] = []
    for klass in cls.__mro__:
        if klass.__module__ != module:
            continue  # the recipe's own module only: not dagger's Recipe, not libraries
        for value in vars(klass).values():
            for fn in _functions_of(value):
                pending.append((fn.__code__, fn.__globals__))
    found: dict[str, FunctionType] = {}
    while pending:
        code, names = pending.pop()
        pending.extend((c, names) for c in code.co_consts if isinstance(c, CodeType))
        for name in code.co_names:
            target = names.get(name)
            if not isinstance(target, FunctionType | ModuleType | type | None):
                # A decorated helper (functools.lru_cache, ...): the function it wraps.
                with contextlib.suppress(Exception):
                    target = inspect.unwrap(target)
            # Defined in this very module: its globals are the module's (not its __module__,
            # which reads "__mp_main__" for a script's functions in a spawned worker).
            if (
                isinstance(target, FunctionType)
                and target.__globals__ is names
                and name not in found
            ):
                found[name] = target
                pending.append((target.__code__, target.__globals__))
    hashes = {name: source_hash(fn) for name, fn in sorted(found.items())}
    with contextlib.suppress(TypeError):
        _helper_hashes[cls] = hashes
    return dict(hashes)


def _functions_of(value: Any) -> list[FunctionType]:
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if isinstance(f, FunctionType)]
    return [value] if isinstance(value, FunctionType) else []


_helper_hashes: weakref.WeakKeyDictionary[type, dict[str, str]] = weakref.WeakKeyDictionary()


def unguarded_main_line() -> tuple[str, int] | None:
    """Where the running script, at import level and outside ``if __name__ == "__main__":``,
    made the call that reached here: ``(script path, line)``; None if it did not, or if that
    cannot be told (no script file: an interactive session, a notebook, ``python -c``).

    A worker process started by "spawn" or "forkserver" imports the main script again (as
    ``__mp_main__``): whatever is not under the guard runs again in every worker.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return None
    line = None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "<module>"
            and frame.f_globals is vars(main)
            and os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path)
        ):
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return None
    try:
        with open(path, "rb") as source, _parsing:
            tree = ast.parse(source.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            end = node.body[-1].end_lineno or node.body[-1].lineno
            if node.body[0].lineno <= line <= end:
                return None
    return path, line


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    sides = (test.left, test.comparators[0])
    name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    text = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    return isinstance(test.ops[0], ast.Eq) and name and text
