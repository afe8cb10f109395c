"""Manifest: what a node is, stored under its node key, written once.

A manifest names blobs (each named entry is one blob; a caller groups them as it likes, e.g.
``"model/0"``) and carries free metadata made of plain data (description, provenance, timings).

On storage (a ``Frame``), byte by byte::

    0   b"DAGM"
    4   format version (1)
    5   flags: bit 0 set = signed; other bits zero (else IntegrityError)
    6   two zero bytes
    8   BLAKE3 of the payload (32 bytes)
    40  signed only: the HMAC-SHA256 signature under the lab key (32 bytes; see ``signing.py``)
    40 or 72: the payload: canonical msgpack (sorted keys, tuples as lists)

So equal manifests are equal payloads, and an unsigned manifest is equal bytes. The checksum makes
a flipped byte an IntegrityError instead of a plausible wrong answer; anyone can recompute it,
which is what the signature is for: only a holder of the lab key can make one that verifies. The
signature is not part of the Manifest value (nor of its equality): the Store signs what it commits
and checks a frame's signature before its payload is decoded.
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
from dagger_store.plain import MAX_INT, MIN_INT

MAGIC = b"DAGM"
FORMAT_VERSION = 1
SIGNED = 0x01  # flags bit 0
SIGNATURE_SIZE = 32
_HEADER = 8
_CHECKSUM = 32
# What ``_canonical`` lets through as is: exact types, as msgpack decodes them.
_SCALARS = (bool, float, str, bytes)
_STR = {str}


@dataclass(frozen=True, slots=True)
class Frame:
    """A stored manifest taken apart: its payload and, if it was signed, its signature.

    ``parse`` checks the header and the checksum; whether the signature is valid is for the
    reader to decide (``Store``, through ``signing.Signatures``) before it decodes the payload.
    Experiment records use the same frame under their own ``magic`` (``records.py``); ``what``
    names the object in errors.
    """

    payload: bytes
    signature: bytes | None = None

    def __post_init__(self) -> None:
        if self.signature is not None and len(self.signature) != SIGNATURE_SIZE:
            raise ValueError(f"a manifest signature has {SIGNATURE_SIZE} bytes")

    def encode(self, magic: bytes = MAGIC) -> bytes:
        """The stored bytes: header, checksum, the signature if any, payload."""
        _check_magic(magic)
        checksum = blake3(self.payload).digest()
        if self.signature is None:
            return magic + bytes([FORMAT_VERSION, 0, 0, 0]) + checksum + self.payload
        return (
            magic + bytes([FORMAT_VERSION, SIGNED, 0, 0]) + checksum + self.signature + self.payload
        )

    @classmethod
    def parse(cls, data: bytes, *, key: str, magic: bytes = MAGIC, what: str = "manifest") -> Frame:
        """Split stored bytes, verifying header and checksum; ``key`` names them in errors."""
        _check_magic(magic)
        if len(data) < _HEADER + _CHECKSUM or data[:4] != magic:
            raise IntegrityError(f"{what} {key!r} has no valid header (truncated?)", key=key)
        if data[4] != FORMAT_VERSION:
            raise FormatError(
                f"{what} {key!r} has format version {data[4]}; this dagger reads version "
                f"{FORMAT_VERSION}: upgrade dagger",
                key=key,
            )
        flags = data[5]
        if flags & ~SIGNED or data[6:8] != b"\0\0":
            # Version 1 defines these bits: any other value is a damaged header.
            raise IntegrityError(
                f"{what} {key!r} has unknown header flags {data[5:8].hex()}: corrupt", key=key
            )
        checksum = data[_HEADER : _HEADER + _CHECKSUM]
        start = _HEADER + _CHECKSUM + (SIGNATURE_SIZE if flags & SIGNED else 0)
        if len(data) < start:
            raise IntegrityError(f"{what} {key!r} is truncated", key=key)
        payload = data[start:]
        if blake3(payload).digest() != checksum:
            raise IntegrityError(f"{what} {key!r} fails its checksum: corrupt", key=key)
        signature = data[_HEADER + _CHECKSUM : start] if flags & SIGNED else None
        return cls(payload, signature)


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

    def payload(self) -> bytes:
        """The canonical msgpack of this manifest: equal manifests, equal bytes."""
        return msgpack.packb(
            {
                "blobs": {n: [d.algorithm, d.hex, d.size] for n, d in self.blobs.items()},
                "meta": dict(self.meta),
            },
            use_bin_type=True,
        )

    def encode(self) -> bytes:
        """The stored form, unsigned: header, checksum, canonical msgpack."""
        return Frame(self.payload()).encode()

    @classmethod
    def decode(cls, data: bytes, *, key: str) -> Manifest:
        """Parse and verify a stored manifest; ``key`` names it in errors.

        Checks the checksum, not a signature (that takes the lab key: ``Store`` does it).
        """
        return cls.from_payload(Frame.parse(data, key=key).payload, key=key)

    @classmethod
    def from_payload(cls, payload: bytes, *, key: str, trusted: bool = False) -> Manifest:
        """The manifest in a verified frame's payload; FormatError if it is not one.

        ``trusted``: it comes from a store whose every writer is trusted (``Store.trusted``),
        and its checksum held, so only dagger can have written it: its metadata is taken as
        decoded, without walking it for types (half the cost of a warm run's reads).
        """
        try:
            doc = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            named = doc["blobs"]
            blobs = {n: Digest(a, h, s) for n, (a, h, s) in named.items()} if named else {}
            meta = doc["meta"]
            if type(meta) is dict and _sorted_names(blobs) and (trusted or _canonical(meta)):
                return cls._decoded(blobs, meta)
            return cls(blobs, meta)
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"manifest {key!r} is not a valid manifest: {exc}", key=key) from exc

    @classmethod
    def _decoded(cls, blobs: dict[str, Digest], meta: dict[str, Any]) -> Manifest:
        """A manifest of freshly decoded values that are canonical already (``_canonical``):
        what ``__post_init__`` would check, copy and sort is so, and nobody else holds them.

        A warm run decodes a manifest per node; walking and copying every one's metadata in
        Python cost more than reading it.
        """
        manifest = object.__new__(cls)
        object.__setattr__(manifest, "blobs", MappingProxyType(blobs))
        object.__setattr__(manifest, "meta", MappingProxyType(meta))
        return manifest


def _sorted_names(blobs: dict[str, Digest]) -> bool:
    """Whether a manifest's entry names are non-empty str, sorted (as ``__post_init__`` makes
    them)."""
    if not blobs:  # the common case where every value is inline
        return True
    names = list(blobs)
    return all(type(n) is str and n for n in names) and names == sorted(names)


def _canonical(value: Any) -> bool:
    """Whether ``value`` is a str-keyed dict that ``_plain`` would copy unchanged: its dicts'
    keys str and sorted all the way down, its values plain data. Fast, no paths: on False,
    ``_plain`` says what is wrong, or makes it canonical."""
    if type(value) is not dict:
        return False
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            keys = list(item)
            if not set(map(type, keys)) <= _STR or keys != sorted(keys):
                return False
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not MIN_INT <= item <= MAX_INT:
                return False
        elif item is not None and kind not in _SCALARS:
            return False
    return True


def _check_magic(magic: bytes) -> None:
    if not isinstance(magic, bytes) or len(magic) != len(MAGIC):
        raise ValueError(f"a frame's magic is {len(MAGIC)} bytes, got {magic!r}")


def _plain(value: Any, path: str) -> Any:
    """A canonical copy of plain data (dicts sorted, tuples as lists); TypeError names the path."""
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return value
    if kind is int:
        if not MIN_INT <= value <= MAX_INT:
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
