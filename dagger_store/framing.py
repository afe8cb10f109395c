"""Blob framing: how one stored object holds a leaf (raw or zstd) or a chunked blob's index.

Every blob object starts with an 8-byte header: ``b"DAGB"``, the frame version, the framing
(raw, zstd or index), two zero bytes. The framing is recorded per object because the choice is
per object: zstd only where it pays (dense float weights compress ~1.08x at ~0.3 GB/s, so they
are stored raw). Digests are of the uncompressed bytes, so the framing can change without
changing identity. ("Codec" is kept for attribute codecs, ``dagger_orchestrate.codecs``.)

Nothing here trusts what it reads: ``decode_*`` verify against the expected digest and raise
IntegrityError, naming the object, before any byte is handed on.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence

import zstandard
from blake3 import blake3

from dagger_store.backends.base import fill
from dagger_store.digest import ALGORITHM, LEAF_SIZE, Digest, tree_digest
from dagger_store.errors import FormatError, IntegrityError

MAGIC = b"DAGB"
FRAME_VERSION = 1
HEADER_SIZE = 8
# A sample compressing to more than this fraction of its size is stored raw: not worth the CPU.
# zstd runs at 100-500 MB/s on numeric data, about the speed of the disk whose writes it would
# save; it earns its CPU where it at least halves the bytes (text, zeros, sparse or quantised
# tensors), not on a dense or pruned float tensor's 5-35 % (measured: a 50 %-pruned float32
# matrix compresses to 0.64 at 115 MB/s, level 3).
WORTHWHILE_RATIO = 0.5
# The samples judged: 4 of 16 KiB, at level 1 (or the store's level, if lower). On float
# weights, dense or pruned, and on integers, they give the ratio of 4 x 64 KiB at level 3
# within 0.02, for 0.2-0.4 ms a leaf instead of 0.7-3 ms: a writer judging 20 MB a node spent
# ~100 ms of the 13-state tree's run on it.
_PROBE_BYTES = 16 * 1024
_PROBES = 4
_PROBE_LEVEL = 1


class Framing(enum.IntEnum):
    RAW = 0
    ZSTD = 1
    INDEX = 2  # a chunked blob: the raw 32-byte digests of its leaves, in order


def header(kind: Framing) -> bytes:
    return MAGIC + bytes([FRAME_VERSION, kind, 0, 0])


def read_header(head: bytes | bytearray | memoryview, key: str) -> Framing:
    """The framing of an object from its first HEADER_SIZE bytes."""
    if len(head) < HEADER_SIZE or bytes(head[:4]) != MAGIC:
        raise IntegrityError(f"blob object {key!r} has no valid header (truncated?)", key=key)
    if head[4] != FRAME_VERSION:
        raise FormatError(
            f"blob object {key!r} has frame version {head[4]}; this dagger reads version "
            f"{FRAME_VERSION}: upgrade dagger",
            key=key,
        )
    try:
        return Framing(head[5])
    except ValueError:
        raise FormatError(f"blob object {key!r} has unknown framing {head[5]}", key=key) from None


class Compressor:
    """zstd at one level, with one (non-thread-safe) context per thread."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def _context(self, probe: bool = False) -> zstandard.ZstdCompressor:
        name = "probe" if probe else "ctx"
        ctx = getattr(self._local, name, None)
        if ctx is None:
            level = min(self.level, _PROBE_LEVEL) if probe else self.level
            ctx = zstandard.ZstdCompressor(level=level)
            setattr(self._local, name, ctx)
        return ctx

    def pays_off(self, data: memoryview) -> bool:
        """Whether zstd is worth it, judged on a few samples spread over ``data``."""
        if self.level <= 0 or len(data) < 1024:
            return False
        step = max(len(data) // _PROBES, 1)
        samples = b"".join(data[i : i + _PROBE_BYTES] for i in range(0, len(data), step))
        return len(self._context(probe=True).compress(samples)) < WORTHWHILE_RATIO * len(samples)

    def encode_leaf(self, data: memoryview, compress: bool) -> tuple[bytes, bytes | memoryview]:
        """Header and payload for a leaf; raw (zero-copy) when zstd does not pay."""
        if compress:
            packed = self._context().compress(data)
            if len(packed) < WORTHWHILE_RATIO * len(data):
                return header(Framing.ZSTD), packed
        return header(Framing.RAW), data


def verify(data: bytes | memoryview, expected: Digest, key: str) -> None:
    """Raise IntegrityError unless ``data`` is exactly the content ``expected`` names."""
    if len(data) != expected.size:
        raise IntegrityError(
            f"blob {key!r} holds {len(data)} bytes where its digest says {expected.size}: "
            "the stored object is truncated or corrupt; delete it and put the value again",
            key=key,
        )
    if blake3(data).hexdigest() != expected.hex:
        raise IntegrityError(
            f"blob {key!r} does not match its digest {expected.hex[:16]}...: the stored object "
            "is corrupt; delete it and put the value again",
            key=key,
        )


def decompress(payload: bytes | memoryview, max_size: int, key: str) -> bytes:
    """Inflate a zstd payload of at most ``max_size`` bytes (a corrupt frame cannot balloon)."""
    try:
        # max_output_size is ignored when the frame header states a content size, so a flipped
        # bit there could ask for gigabytes: check the stated size first.
        stated = zstandard.frame_content_size(payload)
        if stated > max_size:
            raise IntegrityError(
                f"blob {key!r} claims {stated} bytes where at most {max_size} are possible: "
                "corrupt",
                key=key,
            )
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"blob {key!r} is not valid zstd: {exc}", key=key) from exc


def decompress_into(payload: bytes | memoryview, target: memoryview, key: str) -> None:
    """Inflate a zstd payload straight into ``target``, which it must fill exactly."""
    try:
        stated = zstandard.frame_content_size(payload)
        if stated not in (-1, len(target)):
            raise IntegrityError(
                f"blob {key!r} inflates to {stated} bytes where {len(target)} are expected: "
                "corrupt",
                key=key,
            )
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            filled = fill(reader.readinto, target)
            overflow = reader.read(1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"blob {key!r} is not valid zstd: {exc}", key=key) from exc
    if filled != len(target) or overflow:
        raise IntegrityError(
            f"blob {key!r} does not inflate to the {len(target)} bytes its digest says: corrupt",
            key=key,
        )


def encode_index(size: int, leaves: Sequence[Digest]) -> bytes:
    """The object of a chunked blob: its size, then its leaves' raw digests in order."""
    return (
        header(Framing.INDEX)
        + size.to_bytes(8, "big")
        + b"".join(bytes.fromhex(leaf.hex) for leaf in leaves)
    )


def decode_index(payload: bytes | memoryview, expected_hex: str, key: str) -> Digest:
    """The digest a chunked blob's index describes, verified to have ``expected_hex``.

    The digest's leaves are ``index_leaves(payload, digest)``.
    """
    if len(payload) < 8 or (len(payload) - 8) % 32:
        raise IntegrityError(f"index {key!r} has a malformed payload: corrupt", key=key)
    size = int.from_bytes(payload[:8], "big")
    # Check the count arithmetically first: a corrupt size must not build a huge list.
    if size <= LEAF_SIZE or (len(payload) - 8) // 32 != -(-size // LEAF_SIZE):
        raise IntegrityError(f"index {key!r} names the wrong number of leaves: corrupt", key=key)
    digest = Digest(ALGORITHM, expected_hex, size)
    if tree_digest(size, index_leaves(payload, digest)).hex != expected_hex:
        raise IntegrityError(f"index {key!r} does not match its digest: corrupt", key=key)
    return digest


def index_leaves(payload: bytes | memoryview, digest: Digest) -> list[Digest]:
    return [
        Digest(ALGORITHM, bytes(payload[8 + 32 * i : 40 + 32 * i]).hex(), size)
        for i, size in enumerate(digest.leaf_sizes())
    ]
