"""The on-storage layout: every name dagger gives an object in a store, and the rules for names.

::

    dagger-store                                    MARKER: the layout (MARKER_TEXT), written first
    v1/blobs/ab/<hex>                               blobs: leaves, and indexes of chunked blobs
    v1/manifests/ab/<hex>                           manifests, by node key (generation 0)
    v1/manifests/ab/<hex>.<n>                       generation n >= 1 of a node's manifest
    v1/experiments/<name>/<ns>-<random>.<kind>      experiment records (records.py)
    v1/leases/<node hex>/<generation>               leases on nodes being computed (leases.py)
    v1/pins/<name>                                  pins (pins.py)

``ab`` is the first two hex digits of the name (so that no folder grows too long to list),
``<ns>`` the writer's clock in nanoseconds (20 digits: names sort oldest first) and
``<generation>`` 12 digits. Backends keep nothing else beside these but their own private names,
which start with ``.`` (``.tmp/``) and so are never keys.

This module is the one place where these names are made and taken apart. Changing any of them
changes the format that every store already written is in: bump ``LAYOUT`` (and with it
``MARKER_TEXT``), never edit a name in place.
"""

from __future__ import annotations

import re

from dagger_store.digest import HEX, Digest
from dagger_store.errors import InvalidKeyError
from dagger_store.keys import NodeKey

MARKER = "dagger-store"
LAYOUT = "v1"
MARKER_TEXT = f"dagger-store\nlayout: {LAYOUT}\n".encode()

OBJECTS = f"{LAYOUT}/"  # every object of this layout: all but the marker
BLOBS = f"{LAYOUT}/blobs/"
MANIFESTS = f"{LAYOUT}/manifests/"
EXPERIMENTS = f"{LAYOUT}/experiments/"
LEASES = f"{LAYOUT}/leases/"
PINS = f"{LAYOUT}/pins/"
JOBLIB = f"{LAYOUT}/joblib/"  # joblib.Memory's index, code and metadata (dagger_store.joblib)

# Experiment and pin names: one segment of a key, readable, never hidden or option-like.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_KIND = re.compile(r"[a-z]{1,16}")


def check_name(name: str, what: str = "experiment") -> str:
    """Return ``name`` if it can name an experiment or a pin (``what``), else InvalidKeyError.

    Up to 128 letters, digits, '.', '_' and '-', not starting with '.' or '-'.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidKeyError(
            f"invalid {what} name {name!r}: use up to 128 letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    return name


# -- blobs and manifests ---------------------------------------------------------------------------


def blob_key(digest: Digest) -> str:
    """Where the blob ``digest`` is stored (a chunked blob: its index)."""
    return blob_key_of_hex(digest.hex)


def blob_key_of_hex(hex_: str) -> str:
    """Where the blob whose digest's hex is ``hex_`` is stored (the inverse of ``blob_hex``)."""
    return f"{BLOBS}{hex_[:2]}/{hex_}"


def manifest_key(node: NodeKey) -> str:
    """Where the manifest of ``node`` is stored."""
    return f"{MANIFESTS}{node.hex[:2]}/{node.hex}"


def manifest_generation_key(node: NodeKey, generation: int) -> str:
    """Where generation ``generation`` of the manifest of ``node`` is stored: generation 0 is
    ``manifest_key(node)``, a later one (a repair, a recompute) ``<that>.<generation>``."""
    if not isinstance(generation, int) or generation < 0:
        raise ValueError(f"a manifest generation is an int >= 0, got {generation!r}")
    path = manifest_key(node)
    return path if generation == 0 else f"{path}.{generation}"


def manifest_generation(key: str) -> int | None:
    """The generation of the manifest stored at ``key`` (listed under ``MANIFESTS``); None if it
    names none."""
    match = _MANIFEST_NAME.fullmatch(key.rsplit("/", 1)[-1])
    if match is None:
        return None
    return int(match.group(2)) if match.group(2) else 0


def blob_hex(key: str) -> str | None:
    """The hex of the blob stored at ``key`` (listed under ``BLOBS``); None if it names none."""
    name = key.rsplit("/", 1)[-1]
    return name if HEX.fullmatch(name) else None


def manifest_node(key: str) -> NodeKey | None:
    """The node whose manifest is stored at ``key`` (listed under ``MANIFESTS``); None if it
    names none."""
    match = _MANIFEST_NAME.fullmatch(key.rsplit("/", 1)[-1])
    return NodeKey(match.group(1)) if match else None


# A manifest's name: the node's hex, then ``.<generation>`` for generations after the first.
_MANIFEST_NAME = re.compile(r"([0-9a-f]{64})(?:\.([1-9][0-9]{0,8}))?")


# -- experiment records ----------------------------------------------------------------------------


def experiment_prefix(name: str) -> str:
    """The folder holding the records of experiment ``name``; InvalidKeyError for a bad name."""
    return f"{EXPERIMENTS}{check_name(name)}/"


def record_key(experiment: str, kind: str, written_ns: int, token: str) -> str:
    """Where a record of ``kind`` of ``experiment`` goes, written at ``written_ns`` (epoch ns)
    by a writer that drew the random ``token`` (hex): unique, and sorting oldest first."""
    prefix = experiment_prefix(experiment)
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise InvalidKeyError(f"invalid record kind {kind!r}: use 1-16 lowercase letters")
    return f"{prefix}{written_ns:020d}-{token}.{kind}"


def record_experiment(key: str) -> str:
    """The name of the experiment a record (listed under ``EXPERIMENTS``) belongs to."""
    return key[len(EXPERIMENTS) :].split("/", 1)[0]


def record_kind(key: str) -> str:
    """The kind of the record stored at ``key`` (``"def"``, ``"run"``, ...)."""
    return key.rsplit(".", 1)[-1]


# -- leases ----------------------------------------------------------------------------------------


def lease_prefix(node: NodeKey) -> str:
    """The folder holding the generations of the lease on ``node``."""
    return f"{LEASES}{node.hex}/"


def lease_key(node: NodeKey, generation: int) -> str:
    """Where generation ``generation`` of the lease on ``node`` goes."""
    return f"{lease_prefix(node)}{generation:012d}"


def lease_generation(key: str) -> int:
    """The generation a lease object (listed under ``lease_prefix``) is; ValueError if none."""
    return int(key.rsplit("/", 1)[-1])


def leased_node(key: str) -> NodeKey:
    """The node a lease object (listed under ``LEASES``) is about; InvalidKeyError if none."""
    return NodeKey(key[len(LEASES) :].split("/", 1)[0])


# -- pins ------------------------------------------------------------------------------------------


def pin_key(name: str) -> str:
    """Where the pin called ``name`` goes; InvalidKeyError for a bad name."""
    return PINS + check_name(name, "pin")


def pin_name(key: str) -> str:
    """The name of the pin stored at ``key`` (listed under ``PINS``)."""
    return key[len(PINS) :]
