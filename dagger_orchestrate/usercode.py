"""How user code is named in keys and manifests, and fingerprinted to notice it changed."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import weakref
from collections.abc import Callable
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
        text = inspect.getsource(code)
    except (OSError, TypeError):
        text = ""
    found = hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""
    with contextlib.suppress(TypeError):
        _source_hashes[code] = found
    return found


_source_hashes: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
