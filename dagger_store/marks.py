"""What each manifest names, remembered between garbage collections on this machine.

Marking is what a collection of a large store costs: every kept manifest is read to learn the
blobs it names, one GET each on S3. But a stored manifest never changes: a path holds the same
bytes until it is deleted, and a manifest written there again is a new object with a later
modification time. So a collection remembers, per manifest path, its modification time, its
size and the blobs it names (and, per chunked blob, the leaves its index names: content-
addressed, so they never change), and the next collection on this machine reads only the
manifests it has not seen with that time and size.

Kept in the user's cache folder (``$DAGGER_CACHE_DIR``, else ``~/.cache/dagger``), one file per
store URL, replaced atomically; never in the store, so that nobody who may write to a shared
store can make another user's collection forget a blob. A file that cannot be read is no file
(everything is read again); one that cannot be written costs the next collection its speed.

Why a remembered entry is right: it is used only for a listed object with exactly its
modification time and size. A manifest is remembered only once it is ``SETTLE`` seconds old
by this host's clock, so a manifest deleted and written again at the same path after it was
read (gc of an unreferenced node, then a colleague's new commit) has a later time, unless the
storage's clock is behind this host's by more than that; even then its blobs were put or
touched at its commit, younger than any grace period worth having, and are not collected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard
from blake3 import blake3

from dagger_store.backends.base import Entry
from dagger_store.digest import ALGORITHM, Digest
from dagger_store.usercache import cache_dir, replace_file

logger = logging.getLogger(__name__)

VERSION = 1
# Seconds a manifest must have existed (by this host's clock) before it is remembered.
SETTLE = 10.0


@dataclass(slots=True)
class Marks:
    """The remembered blobs of manifests (by path) and leaves of chunked blobs (by hex)."""

    url: str
    manifests: dict[str, tuple[float, int, list[Digest]]] = field(default_factory=dict)
    leaves: dict[str, list[Digest]] = field(default_factory=dict)

    @classmethod
    def load(cls, url: str) -> Marks:
        """What earlier collections of the store at ``url`` remembered here (maybe nothing)."""
        marks = cls(url)
        try:
            with open(_path(url), "rb") as file:
                document = msgpack.unpackb(
                    zstandard.ZstdDecompressor().decompress(file.read()), raw=False
                )
            if document["version"] != VERSION or document["url"] != url:
                return marks
            for key, (modified, size, named) in document["manifests"].items():
                marks.manifests[key] = (float(modified), int(size), _digests(named))
            for hex_, named in document["leaves"].items():
                marks.leaves[hex_] = _digests(named)
        except FileNotFoundError:
            pass
        except Exception as exc:  # torn, foreign or of another version: read everything again
            logger.info("gc marks for %s not used (%s): every manifest is read", url, exc)
            return cls(url)
        return marks

    def named(self, entry: Entry) -> list[Digest] | None:
        """The blobs the listed manifest ``entry`` names, if remembered for its time and size."""
        known = self.manifests.get(entry.key)
        if known is None or known[0] != entry.modified or known[1] != entry.size:
            return None
        return known[2]

    def remember(self, entry: Entry, named: list[Digest], now: float) -> None:
        if entry.modified < now - SETTLE:
            self.manifests[entry.key] = (entry.modified, entry.size, named)

    def save(self, listed: Iterable[str], indexes: Iterable[str]) -> None:
        """Write what is remembered of the manifests in ``listed`` and of the chunked blobs
        ``indexes`` (what is not among them is gone, or no longer named)."""
        present, chunked = set(listed), set(indexes)
        document = {
            "version": VERSION,
            "url": self.url,
            "manifests": {
                key: [modified, size, _plain(named)]
                for key, (modified, size, named) in self.manifests.items()
                if key in present
            },
            "leaves": {h: _plain(leaves) for h, leaves in self.leaves.items() if h in chunked},
        }
        data = zstandard.ZstdCompressor().compress(msgpack.packb(document, use_bin_type=True))
        try:
            replace_file(_path(self.url), data)  # another collection reads old or new, whole
        except OSError as exc:
            logger.info(
                "gc marks for %s not saved (%s): the next collection reads all", self.url, exc
            )


def _path(url: str) -> str:
    return os.path.join(cache_dir(), "gc-marks", blake3(url.encode()).hexdigest()[:32])


def _plain(digests: Sequence[Digest]) -> list[list[Any]]:
    return [[bytes.fromhex(d.hex), d.size] for d in digests]


def _digests(named: Sequence[Sequence[Any]]) -> list[Digest]:
    return [Digest(ALGORITHM, bytes(raw).hex(), int(size)) for raw, size in named]
