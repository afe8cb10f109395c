"""Manifest: what a node is, stored under its node key, written once.

A manifest names blobs (each named entry is one blob; a caller groups them as it likes, e.g.
``"model/0"``) and carries free metadata made of plain data (description, provenance, timings).

On storage: ``b"DAGM"``, the format version, three zero bytes, the BLAKE3 of the payload, and
the payload: canonical msgpack (sorted keys, tuples as lists), so equal manifests are equal bytes.
The checksum makes a flipped byte an IntegrityError instead of a plausible wrong answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
from blake3 import blake3

from dagger_store.digest import Digest
from dagger_store.errors import FormatError, IntegrityError, InvalidKeyError

MAGIC = b"DAGM"
FORMAT_VERSION = 1
_HEADER = MAGIC + bytes([FORMAT_VERSION, 0, 0, 0])
_CHECKSUM = 32
_MAX_INT = 2**64 - 1
_MIN_INT = -(2**63)


@dataclass(frozen=True, slots=True)
class Manifest:
    """The blobs of a node, by name, and its metadata (plain data only).

    Parameters
    ----------
    blobs
        Entry name to blob digest.
    meta
        str-keyed plain data: None, bool, int (64-bit), float, str, bytes, and lists/tuples and
        str-keyed dicts of those. Tuples are stored as lists.
    """

    blobs: Mapping[str, Digest]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.blobs, Mapping):
            raise TypeError(f"Manifest blobs must be a mapping, got {type(self.blobs).__name__}")
        for name, digest in self.blobs.items():
            if not isinstance(name, str) or not name:
                raise InvalidKeyError(f"manifest entry names are non-empty str, got {name!r}")
            if not isinstance(digest, Digest):
                raise TypeError(
                    f"manifest entry {name!r} must be a Digest (from Store.put), "
                    f"got {type(digest).__name__}"
                )
        meta = _plain(self.meta, "meta")
        if not isinstance(meta, dict):
            raise TypeError(f"Manifest meta must be a str-keyed dict, got {type(meta).__name__}")
        object.__setattr__(self, "blobs", MappingProxyType(dict(sorted(self.blobs.items()))))
        object.__setattr__(self, "meta", MappingProxyType(meta))

    def encode(self) -> bytes:
        """The stored form: header, checksum, canonical msgpack."""
        payload = msgpack.packb(
            {
                "blobs": {n: [d.algorithm, d.hex, d.size] for n, d in self.blobs.items()},
                "meta": dict(self.meta),
            },
            use_bin_type=True,
        )
        return _HEADER + blake3(payload).digest() + payload

    @classmethod
    def decode(cls, data: bytes, *, key: str) -> Manifest:
        """Parse and verify a stored manifest; ``key`` names it in errors."""
        if len(data) < len(_HEADER) + _CHECKSUM or data[:4] != MAGIC:
            raise IntegrityError(f"manifest {key!r} has no valid header (truncated?)", key=key)
        if data[4] != FORMAT_VERSION:
            raise FormatError(
                f"manifest {key!r} has format version {data[4]}; this dagger reads version "
                f"{FORMAT_VERSION}: upgrade dagger",
                key=key,
            )
        checksum, payload = data[8 : 8 + _CHECKSUM], data[8 + _CHECKSUM :]
        if blake3(payload).digest() != checksum:
            raise IntegrityError(f"manifest {key!r} fails its checksum: corrupt", key=key)
        try:
            doc = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            blobs = {n: Digest(a, h, s) for n, (a, h, s) in doc["blobs"].items()}
            return cls(blobs, doc["meta"])
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"manifest {key!r} is not a valid manifest: {exc}", key=key) from exc


def _plain(value: Any, path: str) -> Any:
    """A canonical copy of plain data (dicts sorted, tuples as lists); TypeError names the path."""
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return value
    if kind is int:
        if not _MIN_INT <= value <= _MAX_INT:
            raise TypeError(f"{path} = {value} does not fit in 64 bits; store it as a str")
        return value
    if kind in (list, tuple):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{path} has a non-str key {k!r}; manifest metadata keys are str")
        return {k: _plain(value[k], f"{path}[{k!r}]") for k in sorted(value)}
    raise TypeError(
        f"{path} is a {kind.__name__}; manifest metadata holds only None, bool, int, float, "
        "str, bytes, lists and str-keyed dicts (store arrays and objects as blobs)"
    )
