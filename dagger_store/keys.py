"""Node keys: the only place identity is made.

``node_key(kind, fields)`` hashes a canonical, tagged encoding of plain values. The encoding
depends on nothing but the values: not on the Python version, the pickle protocol, dict order,
or PYTHONHASHSEED. Each value is written as a one-byte type tag followed by a self-delimiting
body, so different kinds of values never collide (``1`` vs ``1.0`` vs ``True`` vs ``"1"``,
``[1]`` vs ``(1,)``, ``np.float32(1)`` vs ``np.float64(1)`` vs ``1.0``).

A ``File`` or ``Dir`` (``dagger_store.content``) is encoded by its content, never its path:
tag ``C``, then its kind (``"file"``/``"dir"``), the digest's algorithm (``"blake3"``,
``"blake3-dir"``, ``"s3-etag"``, ``"s3-etag-dir"``) and the digest, each a tagged str, then the
size in bytes. A new tag for a new kind of value changes no existing key.

A value with no deterministic encoding (a lambda, an arbitrary object, an int subclass whose
meaning the encoding would drop) is refused with an error naming where it was and its type,
never guessed at: a wrong guess is a silent cache miss, or worse, a wrong hit.

Changing anything here changes keys: bump ``KEY_SCHEMA`` and the golden vectors in
``tests/test_keys.py`` together.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

from dagger_store.content import Dir, File
from dagger_store.digest import HEX, Digest
from dagger_store.errors import InvalidKeyError, UnencodableValueError

KEY_SCHEMA = 1
_PREFIX = b"dagger.node-key\x00" + KEY_SCHEMA.to_bytes(2, "big")


@dataclass(frozen=True, slots=True, order=True)
class NodeKey:
    """The identity of a node: 64 lowercase hex characters of BLAKE3."""

    hex: str

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not HEX.fullmatch(self.hex):
            raise InvalidKeyError(f"not a node key (64 lowercase hex): {self.hex!r}")

    def __str__(self) -> str:
        return self.hex

    def __hash__(self) -> int:
        # The str's own hash, which it caches: the generated one hashes a new tuple at every
        # dict lookup, and a warm run of 10,000 nodes does about 200,000 of them.
        return hash(self.hex)


def node_key(kind: str, fields: Mapping[str, Any]) -> NodeKey:
    """The key of a record of ``kind`` with these fields.

    Parameters
    ----------
    kind
        What the record is ("state", "recipe", ...): records of different kinds never share a
        key even when their fields are equal.
    fields
        Field name to value; values may nest lists, tuples, dicts, sets, numpy scalars and
        arrays, NodeKeys, Digests, and Files and Dirs (by content).
    """
    if not isinstance(kind, str) or not kind:
        raise InvalidKeyError(f"node key kind must be a non-empty str, got {kind!r}")
    body = canonical_encode(kind, "kind") + canonical_encode(dict(fields), "fields")
    return NodeKey(blake3(_PREFIX + body).hexdigest())


def canonical_encode(value: Any, path: str = "value") -> bytes:
    """The canonical, tagged bytes of ``value``; ``path`` names it in errors."""
    out = bytearray()
    _encode(value, path, out)
    return bytes(out)


def _length(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _encode(value: Any, path: str, out: bytearray, active: dict[int, str] | None = None) -> None:
    # ``active``: the containers being encoded on the way down to ``value`` (id -> path).
    np = sys.modules.get("numpy")  # a numpy value implies numpy is imported; never import it
    if np is not None and isinstance(value, np.generic | np.ndarray):
        _encode_numpy(np, value, path, out)
        return
    kind = type(value)
    if value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif kind is int:
        body = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out += b"i" + _length(len(body)) + body
    elif kind is float:
        # Exact IEEE-754 bits: 1e-9 and 2e-9 differ, -0.0 and 0.0 differ; every NaN is one NaN.
        out += b"f" + (b"\x7f\xf8" + bytes(6) if math.isnan(value) else struct.pack(">d", value))
    elif kind is str:
        body = value.encode("utf-8", "surrogatepass")
        out += b"s" + _length(len(body)) + body
    elif kind is bytes or kind is bytearray:
        out += b"b" + _length(len(value)) + bytes(value)
    elif kind is list or kind is tuple:
        active = _entering(value, path, active)
        out += (b"l" if kind is list else b"t") + _length(len(value))
        for i, item in enumerate(value):
            _encode(item, f"{path}[{i}]", out, active)
        del active[id(value)]
    elif kind is dict:
        active = _entering(value, path, active)
        items = sorted((canonical_encode(k, f"{path} key {k!r}"), k, v) for k, v in value.items())
        out += b"d" + _length(len(items))
        for encoded_key, k, v in items:
            out += encoded_key
            _encode(v, f"{path}[{k!r}]", out, active)
        del active[id(value)]
    elif kind is set or kind is frozenset:
        members = sorted(canonical_encode(m, f"{path} member {m!r}") for m in value)
        out += b"S" + _length(len(members)) + b"".join(members)
    elif kind is NodeKey:
        out += b"K" + bytes.fromhex(value.hex)
    elif kind is Digest:
        out += b"D" + bytes.fromhex(value.hex) + _length(value.size)
    elif kind is File or kind is Dir:
        # Content, not path: the same data at another path (or machine) is the same value.
        out += b"C"
        for text in (value.kind, value.algorithm, value.digest):
            _encode(text, path, out)
        out += _length(value.size)
    else:
        hint = (
            " (for data, File(path) or Dir(path) stand for their content)"
            if hasattr(value, "__fspath__")
            else ""
        )
        raise UnencodableValueError(
            f"{path} is a {_type_name(value)}, which has no deterministic encoding for a node "
            "key; use None, bool, int, float, str, bytes, list, tuple, dict, set, or numpy "
            f"scalars and arrays (or convert it, e.g. to a str or a dict of those){hint}",
            path=path,
            value_type=_type_name(value),
        )


def _entering(value: Any, path: str, active: dict[int, str] | None) -> dict[int, str]:
    """``active`` with the container ``value`` added; refuses one that contains itself.

    Only the containers on the current path count: the same list twice side by side is fine.
    Hashable members (dict keys, set members) cannot lead back to a list or dict.
    """
    if active is None:
        active = {}
    elif id(value) in active:
        raise UnencodableValueError(
            f"{path} is {active[id(value)]} itself: a {type(value).__name__} that contains "
            "itself has no finite encoding for a node key; pass a value without the cycle",
            path=path,
            value_type=_type_name(value),
        )
    active[id(value)] = path
    return active


def _encode_numpy(np: Any, value: Any, path: str, out: bytearray) -> None:
    if value.dtype.hasobject or value.dtype.fields is not None:
        raise UnencodableValueError(
            f"{path} is a numpy value of dtype {value.dtype}, which has no deterministic "
            "encoding; use a plain numeric, bool, str or bytes dtype",
            path=path,
            value_type=f"numpy {value.dtype}",
        )
    # Little-endian, C order: the same array encodes the same on every machine.
    dtype = value.dtype if value.dtype.byteorder == "|" else value.dtype.newbyteorder("<")
    dtype_name = dtype.str.encode()
    if isinstance(value, np.generic):
        body = np.asarray(value, dtype=dtype).tobytes()
        out += b"n" + _length(len(dtype_name)) + dtype_name + _length(len(body)) + body
        return
    array = np.ascontiguousarray(value, dtype=dtype)
    content = blake3(array.reshape(-1).view(np.uint8)).digest()
    out += b"a" + _length(len(dtype_name)) + dtype_name + _length(array.ndim)
    out += b"".join(_length(n) for n in array.shape) + content


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
