"""Plain data: what msgpack stores as is, and so what manifests' metadata may hold.

None, bool, int within msgpack's 64-bit range (``MIN_INT`` to ``MAX_INT``), float, str, bytes,
and lists and str-keyed dicts of those. Anything else (a tuple, an array, an object) is not plain:
it is stored another way (as blobs, or refused).
"""

from __future__ import annotations

from typing import Any

# msgpack's integers: int64 for negatives, uint64 for the rest.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data: msgpack stores it as is and reads back an equal value.

    Exact types only (a bool subclass, an IntEnum, a tuple or an OrderedDict is not plain): a
    subclass's meaning would not survive the round trip.
    """
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return True
    if kind is int:
        return bool(MIN_INT <= value <= MAX_INT)
    if kind is list:
        return all(is_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and is_plain(v) for k, v in value.items())
    return False
