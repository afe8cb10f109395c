"""Manifests remembered between runs on this machine, for a store whose objects can say when
they were replaced (a folder: ``SupportsIdentity``).

A cached re-run of a 10,000-node experiment reads a manifest per node: open, read, close,
verify the frame's checksum, decode. A stored manifest never changes: the object at a path is
the same bytes until it is deleted, and one written there again is a new file, with another
identity (inode, size, modification and change times). So the payloads of manifests read
here are remembered with their identity, and the next run on this machine takes a payload
from here when the path's identity (one ``stat``) is the one remembered, instead of reading
and verifying the file again.

Why a remembered payload is right: it was read from the file and its checksum held when it
was remembered, and it is used only for a file with exactly that identity. It is remembered
only once the file is ``SETTLE_NS`` old by this host's clock, so a file deleted and written
again at the same path after it was remembered has later times (unless the storage's clock
is behind this host's by more than that). On NFS a client may answer a ``stat`` from its
attribute cache for a few seconds (``actimeo``): a manifest that a colleague's collection
deleted and their run committed again within that time may be answered as it was. It is a
planning answer only (cached or not, stale code or not); loading a state reads the manifest
from the store. Stores that sign manifests are not served from here (a lab key or a
signature requirement may change between runs; the check stays with the reader).

Kept in the user's cache folder (``$DAGGER_CACHE_DIR``, else ``~/.cache/dagger``), one file
per question: a store URL and the exact set of node keys asked about (a re-run asks the same
question; another experiment, or the same one grown, asks another and reads its manifests
from the store), so that a file holds only what its question needs and loading it costs no
more than the question. Files are replaced atomically; the ``MAX_FILES`` used last are kept.
A file that cannot be read is no file (everything is read from the store); one that cannot be
written costs the next run its speed.

Newer generations: whether a node has a generation beyond 0 is asked by listing the folders
of its manifests (~50 ms for 10,101 nodes). A memo also keeps the identity of each folder as
it was when every manifest remembered in it was its node's newest (a folder's times change
whenever a name is added to it or taken away); a folder whose identity is the one remembered
has had no generation added since, and is not listed again (a stat instead).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
from blake3 import blake3

from dagger_store.usercache import cache_dir, replace_file

logger = logging.getLogger(__name__)

VERSION = 2
SETTLE_NS = 2_000_000_000
MAX_FILES = 32

Identity = tuple[int, ...]


@dataclass(slots=True)
class ManifestMemo:
    """Manifest payloads by path, each with the identity of the file it was read from."""

    url: str
    path: str
    entries: dict[str, tuple[Identity, bytes]] = field(default_factory=dict)
    folders: dict[str, Identity] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def load(cls, url: str, question: Iterable[str]) -> ManifestMemo:
        """What earlier runs on this machine remembered for the store at ``url`` asked about
        the node keys (hex) in ``question``."""
        asked = blake3(url.encode())
        for hex_ in sorted(question):
            asked.update(hex_.encode())
        memo = cls(url, os.path.join(cache_dir(), "manifests", asked.hexdigest()[:32]))
        try:
            with open(memo.path, "rb") as file:
                document = msgpack.unpackb(file.read(), raw=False)
            if document["version"] != VERSION or document["url"] != url:
                return memo
            memo.entries = {
                path: (tuple(identity), payload)
                for path, (identity, payload) in document["entries"].items()
            }
            memo.folders = {path: tuple(identity) for path, identity in document["folders"].items()}
            os.utime(memo.path)  # used: kept among the MAX_FILES
        except FileNotFoundError:
            pass
        except Exception as exc:  # torn, foreign or of another version: read everything
            logger.info("manifest memo for %s not used (%s): manifests are read", url, exc)
            memo.entries.clear()
            memo.folders.clear()
        return memo

    def payload(self, path: str, identity: Identity) -> bytes | None:
        """The payload remembered for the manifest at ``path``, if its file is the one it was
        read from."""
        entry = self.entries.get(path)
        return None if entry is None or entry[0] != identity else entry[1]

    def remember(self, path: str, identity: Identity, payload: bytes) -> None:
        """``payload``, verified, read from the file at ``path`` with ``identity`` (whose third
        field is its modification time in ns): kept once the file is old enough."""
        if _settled(identity):
            self.entries[path] = (identity, payload)
            self.changed = True

    def forget(self, path: str) -> None:
        """The manifest at ``path`` is no longer its node's newest: not answered from here."""
        if self.entries.pop(path, None) is not None:
            self.changed = True

    def quiet(self, folder: str, identity: Identity) -> bool:
        """Whether ``folder`` is as it was when every manifest remembered in it was its
        node's newest: no generation added since."""
        return self.folders.get(folder) == identity

    def remember_folder(self, folder: str, identity: Identity) -> None:
        """``folder`` had ``identity`` before it was listed, and every manifest remembered in
        it is its node's newest (the caller forgot the others): kept once the folder is old
        enough, as a file is."""
        if _settled(identity) and self.folders.get(folder) != identity:
            self.folders[folder] = identity
            self.changed = True

    def save(self) -> None:
        """Write what is remembered, if anything new was; keep the ``MAX_FILES`` memo files
        used last."""
        if not self.changed:
            return
        document = {
            "version": VERSION,
            "url": self.url,
            "entries": {p: list(entry) for p, entry in self.entries.items()},
            "folders": {p: list(identity) for p, identity in self.folders.items()},
        }
        try:
            replace_file(self.path, msgpack.packb(document, use_bin_type=True))
            self.changed = False
            folder = os.path.dirname(self.path)
            files = [os.path.join(folder, name) for name in os.listdir(folder)]
            files = [f for f in files if not os.path.basename(f).startswith(".")]
            for old in sorted(files, key=os.path.getmtime)[:-MAX_FILES]:
                os.unlink(old)
        except OSError as exc:
            logger.info("manifest memo for %s not saved (%s)", self.url, exc)


def _settled(identity: Identity) -> bool:
    """Whether the file or folder with ``identity`` (third field: its modification time in
    ns) was last changed ``SETTLE_NS`` or more ago by this host's clock."""
    return identity[2] < time.time_ns() - SETTLE_NS
