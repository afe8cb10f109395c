"""A state <-> the store: its attributes as blobs, and the manifest describing node and state."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import dagger_store as ds
from dagger_orchestrate.codecs import MissingClassError, load_attribute, save_attribute
from dagger_orchestrate.plan import NodeSpec
from dagger_orchestrate.provenance import provenance
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.usercode import class_path, helper_hashes, source_hash

MANIFEST_SCHEMA = 1


def save_state(
    store: ds.Store, state: ExperimentState, node: NodeSpec, seconds: float
) -> ds.Manifest:
    """Put every stored attribute of ``state``; the manifest that describes node and state.

    ``seconds``: how long the node took, up to now; ``meta["provenance"]`` records it with when,
    where and by what code and software it ran (``dagger_orchestrate.provenance``).
    """
    blobs: dict[str, ds.Digest] = {}
    attributes: dict[str, Any] = {}
    for name, value in state.stored_attributes().items():
        entries, attributes[name] = save_attribute(store, name, value)
        blobs.update(entries)
    recipe = node.recipe
    code = node.state_class if recipe is None else type(recipe)
    meta = {
        "schema": MANIFEST_SCHEMA,
        "node": {
            "label": node.label,
            "kind": "state" if recipe is None else "recipe",
            "class": class_path(code),
            "state_class": class_path(type(state)),
            "parent": node.parent.hex if node.parent is not None else None,
            "source": source_hash(code),
            "helpers": helper_hashes(code),
        },
        "attributes": attributes,
        "provenance": provenance(code, seconds, finished=time.time()),
    }
    return ds.Manifest(blobs, meta)


def load_state(
    store: ds.Store,
    key: ds.NodeKey,
    state_class: type[ExperimentState],
    tags: tuple[str, ...],
    attributes: Iterable[str] | None = None,
    manifest: ds.Manifest | None = None,
) -> ExperimentState:
    """A fresh state object rebuilt from the manifest under ``key`` (or from ``manifest``,
    that node's, in hand).

    ``attributes``: load only these (default: all). An attribute whose stored object needs a
    class that cannot be imported here raises MissingClassError naming the node, the attribute
    and the class, after every other attribute was loaded (``error.state`` holds them).
    """
    manifest = store.get_manifest(key) if manifest is None else manifest
    stored: dict[str, Any] = manifest.meta["attributes"]
    wanted = list(stored) if attributes is None else list(attributes)
    unknown = [name for name in wanted if name not in stored]
    if unknown:
        raise KeyError(
            f"node {key.hex[:12]} has no stored attribute {', '.join(map(repr, unknown))}; "
            f"it has {', '.join(map(repr, stored))}"
        )
    state = state_class.__new__(state_class)
    missing: dict[str, MissingClassError] = {}
    for name in wanted:
        try:
            value = load_attribute(store, manifest.blobs, name, stored[name], node=key)
            setattr(state, name, value)
        except MissingClassError as exc:
            missing[name] = exc  # the others still load: the error hands them over
    label(state, key, tags)
    if missing:
        first = next(iter(missing.values()))
        raise MissingClassError(
            ", ".join(dict.fromkeys(e.class_path for e in missing.values())),
            first.reason,
            node=key,
            attribute=", ".join(missing),
            state=state,
        ) from first
    return state


def label(state: ExperimentState, key: ds.NodeKey, tags: tuple[str, ...]) -> None:
    state._dagger_key = key.hex
    state._dagger_tags = tags
