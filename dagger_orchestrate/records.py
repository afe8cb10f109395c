"""Experiment records: append-only, one immutable object per addition, never rewritten.

Under the experiment folder (local, NFS, S3 or memory, through a dagger_store backend)::

    dagger-experiment                 marker
    records/<time>-<random>.def       the tree a run defined: nodes, parents, labels, tags, calls
    records/<time>-<random>.run       what a run did: executed, cached, failed, timings

Two writers adding to one experiment at once each add their own object, so nothing is lost and
nothing needs a lock. Reading an experiment is the union of its records.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack

import dagger_store as ds
from dagger_store.backends.base import Backend

MARKER = "dagger-experiment"
MARKER_TEXT = b"dagger-experiment\nrecords: v1\n"
PREFIX = "records/"


def check_marker(backend: Backend, *, create: bool) -> None:
    """Create the marker on a new experiment; refuse a folder that is something else."""
    try:
        text = backend.read(MARKER)
    except ds.NotFoundError:
        if not create:
            raise ds.NotFoundError(
                f"no dagger experiment at {backend.url}: check the path (and storage_options)",
                key=MARKER,
            ) from None
        if any(not key.startswith(("store/", MARKER)) for key in _first_keys(backend)):
            raise ds.StoreOpenError(
                f"{backend.url} is not empty and is not a dagger experiment (no {MARKER!r}); "
                "use a new or empty folder",
                url=backend.url,
            ) from None
        backend.write_once(MARKER, MARKER_TEXT)
        text = backend.read(MARKER)
    if text != MARKER_TEXT:
        raise ds.StoreOpenError(
            f"{backend.url} is an experiment of another format ({text[:64]!r})", url=backend.url
        )


def _first_keys(backend: Backend) -> list[str]:
    keys = []
    for key in backend.iter_keys():
        keys.append(key)
        if len(keys) >= 3:
            break
    return keys


def append(backend: Backend, kind: str, document: dict[str, Any]) -> str:
    """Add one record; returns its key."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    key = f"{PREFIX}{stamp}-{uuid.uuid4().hex[:12]}.{kind}"
    backend.write_once(key, msgpack.packb(document, use_bin_type=True))
    return key


def read_all(backend: Backend, kind: str) -> list[dict[str, Any]]:
    """Every record of ``kind``, oldest first."""
    keys = sorted(k for k in backend.iter_keys(PREFIX) if k.endswith(f".{kind}"))
    return [msgpack.unpackb(backend.read(k), raw=False) for k in keys]
