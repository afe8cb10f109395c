"""How user code is named in keys and manifests, and fingerprinted to notice it changed."""

from __future__ import annotations

import hashlib
import inspect


def class_path(cls: type) -> str:
    """``module.QualName``: how a class is named in keys and manifests."""
    return f"{cls.__module__}.{cls.__qualname__}"


def source_hash(cls: type) -> str:
    """A hash of the class's source, to warn when cached results came from other code.

    Cached per class: ``inspect.getsource`` parses the whole module (10-25 ms) on every call.
    """
    if cls not in _source_hashes:
        try:
            text = inspect.getsource(cls)
        except (OSError, TypeError):
            text = ""
        _source_hashes[cls] = hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""
    return _source_hashes[cls]


_source_hashes: dict[type, str] = {}
