"""Experiment records in a store: append-only, one immutable object per addition, verified.

::

    v1/experiments/<name>/<time in ns>-<random>.<kind>     one record: a map, in a verified frame

Nothing is ever read-modified-written: two collaborators adding to one experiment at the same
time each write their own object, so nothing is lost and nothing needs a lock. An experiment is
the union of its records, oldest first. Every record lists the node keys it refers to under
``"keys"``: those are the roots a garbage collector must keep. Names and the experiment name
rule (``check_name``) are ``layout.py``'s.

On storage a record is the manifests' frame (``manifest.Frame``) under its own magic::

    0   b"DAGR"
    4   format version (1)
    5   flags: bit 0 set = signed; other bits zero
    6   two zero bytes
    8   BLAKE3 of the payload (32 bytes)
    40  signed only: HMAC-SHA256 under the lab key of the record's path and payload (32 bytes;
        ``signing.py``: its own domain, so that it never verifies as a manifest's or the reverse)
    40 or 72: the payload: the record's msgpack map

The payload keeps the writer's order of map keys (a node's properties are listed in the order
they were declared, which the results table shows); the checksum and the signature cover exactly
the stored bytes. A store with a lab key signs every record it writes, as it signs manifests.

Records written before they were framed are a bare msgpack map, told apart by the first byte (a
map never starts with ``D``): they still read, checked only for being a map that lists node
keys. They carry no checksum, so a flipped byte in one may still decode; and they are unsigned.

Reading, what is done with a record that does not verify (``read_records``):

- corrupt (bad header, checksum, or not a record map): skipped with a ``RecordWarning`` naming
  it and what is wrong; with ``strict=True``, IntegrityError (FormatError for a newer format);
- unsigned where the store requires signatures, or signed with another key than the store's:
  skipped with a ``RecordWarning``; with ``strict=True``, UntrustedError. UntrustedError too
  when nothing is left and some were refused so: every record refused is the sign of a wrong
  lab key (or of an old, unsigned experiment read where signatures are required), which an
  empty experiment would hide.

Garbage collection (``referenced_keys``) reads every record's keys whatever its signature (a
forged record can only keep objects alive) and raises for a record it cannot read: the roots
it names are unknown, and roots are never guessed.

Records are read concurrently, on the store's pool (on S3: one round of parallel GETs).
"""

from __future__ import annotations

import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from dagger_store.digest import HEX
from dagger_store.errors import FormatError, IntegrityError, StoreError, UntrustedError
from dagger_store.keys import NodeKey
from dagger_store.layout import (
    EXPERIMENTS,
    check_name,
    experiment_prefix,
    record_experiment,
    record_key,
    record_kind,
)
from dagger_store.manifest import Frame
from dagger_store.signing import Signatures
from dagger_store.store import Store

__all__ = [
    "MAGIC",
    "RecordWarning",
    "add_record",
    "check_name",
    "experiments",
    "read_records",
    "referenced_keys",
]

MAGIC = b"DAGR"
_WHAT = "record"
_KEY_DIGITS = 64  # a node key's hex digits (HEX)
_HEX_RUN = re.compile(f"(?:{HEX.pattern})*")  # node keys' hex digits, one after another


class RecordWarning(UserWarning):
    """A record was skipped (corrupt, or not trusted); ``key`` is its path in the store."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def add_record(
    store: Store,
    experiment: str,
    kind: str,
    keys: Iterable[NodeKey],
    document: dict[str, Any],
    *,
    token: str | None = None,
) -> str:
    """Append one record of ``kind`` to ``experiment``, referring to node ``keys``; its key.

    Written in a verified frame, signed when the store has a lab key. ``token``: the hex part
    of its name after the time (default: random; ``add_record_once`` names it by content).
    """
    # Nanoseconds first, so names sort oldest first (to the clock's word) across machines.
    key = record_key(experiment, kind, time.time_ns(), token or uuid.uuid4().hex)
    body = {**document, "keys": [k.hex for k in keys], "written": time.time()}
    payload = msgpack.packb(body, use_bin_type=True)
    frame = Frame(payload, store.signatures.sign_record(key, payload))
    store.backend.write_once(key, frame.encode(MAGIC))
    return key


def add_record_once(
    store: Store,
    experiment: str,
    kind: str,
    identity: str,
    keys: Callable[[], Iterable[NodeKey]],
    document: Callable[[], dict[str, Any]],
) -> str:
    """``add_record`` unless ``experiment`` has a record of ``kind`` with the same ``identity``
    (a hex digest the caller made of what makes two such records the same); the key of the
    record written or found. ``keys`` and ``document`` are only called to write one.

    A re-run of an unchanged experiment then adds nothing (before, every run added a full
    definition, which every restore read again). One listing of the experiment's folder
    decides; two writers of the same record at once both write it, harmlessly.
    """
    token = identity[:32]
    for key in store.backend.iter_keys(experiment_prefix(experiment)):
        if record_kind(key) == kind and key.rsplit("-", 1)[-1] == f"{token}.{kind}":
            return key
    return add_record(store, experiment, kind, keys(), document(), token=token)


def read_records(
    store: Store, experiment: str, kind: str | None = None, *, strict: bool = False
) -> list[dict[str, Any]]:
    """The records of ``experiment`` (of one ``kind``, or all), oldest first, verified.

    A record that is corrupt, or not trusted (unsigned where the store requires signatures, or
    signed with another lab key), is left out with a ``RecordWarning`` naming it. When no
    record is left and some were refused as not trusted, UntrustedError instead: an experiment
    none of whose records verifies is most likely read with the wrong lab key (or none).

    Parameters
    ----------
    strict
        Raise instead of leaving a record out: IntegrityError for a corrupt one (FormatError
        for one written in a newer format), UntrustedError for one not trusted.
    """
    prefix = experiment_prefix(experiment)
    keys = sorted(
        k for k in store.backend.iter_keys(prefix) if kind is None or record_kind(k) == kind
    )
    read = _read(store, keys, store.signatures)
    refused = [r for r in read if isinstance(r, UntrustedError)]
    if refused and not any(isinstance(r, dict) for r in read):
        # Nothing verifies: most likely the wrong lab key, which an empty experiment would hide.
        raise UntrustedError(
            f"none of the {len(keys)} records of experiment {experiment!r} in {store.url} can "
            f"be used, {len(refused)} of them refused as not trusted; the first: {refused[0]}",
            key=refused[0].key,
        ) from refused[0]
    found: list[dict[str, Any]] = []
    for key, record in zip(keys, read, strict=True):
        if isinstance(record, dict):
            found.append(record)
        elif strict:
            raise record
        else:
            warnings.warn(
                RecordWarning(
                    f"{record} (in {store.url}). The record is skipped: experiment "
                    f"{experiment!r} shows nothing it recorded; remove the record, or put back "
                    "a good copy (read_records(..., strict=True) raises instead of skipping)",
                    key=key,
                ),
                stacklevel=2,
            )
    return found


def experiments(store: Store) -> list[str]:
    """The names of every experiment with records in ``store``, sorted (one listing)."""
    return sorted({record_experiment(k) for k in store.backend.iter_keys(EXPERIMENTS)})


def referenced_keys(store: Store) -> set[NodeKey]:
    """Every node key any record of any experiment refers to (roots for garbage collection).

    Signatures are not checked: a record that is not trusted still keeps what it names (a
    forged one can only keep objects alive). IntegrityError (FormatError for a newer format)
    naming the first record that cannot be read: the roots it names are unknown.
    """
    keys = list(store.backend.iter_keys(EXPERIMENTS))
    found: set[NodeKey] = set()
    for record in _read(store, keys, None):
        if not isinstance(record, dict):
            raise record
        found.update(NodeKey(h) for h in record["keys"])
    return found


def _read(
    store: Store, keys: Sequence[str], signatures: Signatures | None
) -> list[dict[str, Any] | StoreError]:
    """Each record at ``keys``, or why it cannot be used; read in parallel on the store's pool.

    A record that cannot be fetched at all (gone since it was listed, the storage failing)
    raises, as any read does: only what the bytes say is reported here.
    """

    def one(key: str) -> dict[str, Any] | StoreError:
        data = store.backend.read(key)
        try:
            return _decode(data, key, signatures, store.url)
        except (IntegrityError, FormatError, UntrustedError) as exc:
            return exc

    return store.map(one, keys)


def _all_node_keys(names: list[Any]) -> bool:
    """Whether every item is a node key's hex: one regex run over them all, joined (a definition
    lists every node; a match per key took half as long as decoding the record)."""
    return (
        all(isinstance(h, str) and len(h) == _KEY_DIGITS for h in names)
        and _HEX_RUN.fullmatch("".join(names)) is not None
    )


def _decode(data: bytes, key: str, signatures: Signatures | None, where: str) -> dict[str, Any]:
    """The record stored as ``data`` at ``key``, verified; its signature checked against
    ``signatures`` unless None. IntegrityError, FormatError or UntrustedError if unusable."""
    framed = data[: len(MAGIC)] == MAGIC
    if framed:
        frame = Frame.parse(data, key=key, magic=MAGIC, what=_WHAT)
        payload, signature = frame.payload, frame.signature
    else:  # written before records were framed: a bare msgpack map, unsigned
        payload, signature = data, None
    if signatures is not None:
        signatures.check_record(key, payload, signature, where)  # before the payload is decoded
    old = "" if framed else " (an unframed record of the old format)"
    try:
        record = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(
            f"record {key!r}{old} is not valid msgpack ({type(exc).__name__}: {exc}): corrupt",
            key=key,
        ) from exc
    names = record.get("keys") if isinstance(record, dict) else None
    if not isinstance(names, list) or not _all_node_keys(names):
        raise IntegrityError(
            f"record {key!r}{old} is not a record (a map listing node keys under 'keys'): corrupt",
            key=key,
        )
    document: dict[str, Any] = record
    return document
