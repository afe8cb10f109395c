"""A state <-> the store: its attributes as blobs, and the manifest describing node and state."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import dagger_store as ds
from dagger_orchestrate.codecs import load_attribute, save_attribute
from dagger_orchestrate.plan import NodeSpec
from dagger_orchestrate.state import ExperimentState
from dagger_orchestrate.usercode import class_path, source_hash
from dagger_store.host import host, user

MANIFEST_SCHEMA = 1


def save_state(
    store: ds.Store, state: ExperimentState, node: NodeSpec, seconds: float
) -> ds.Manifest:
    """Put every stored attribute of ``state``; the manifest that describes node and state."""
    blobs: dict[str, ds.Digest] = {}
    attributes: dict[str, Any] = {}
    for name, value in state.stored_attributes().items():
        entries, attributes[name] = save_attribute(store, name, value)
        blobs.update(entries)
    recipe = node.recipe
    meta = {
        "schema": MANIFEST_SCHEMA,
        "node": {
            "label": node.label,
            "kind": "state" if recipe is None else "recipe",
            "class": class_path(node.state_class if recipe is None else type(recipe)),
            "state_class": class_path(type(state)),
            "parent": node.parent.hex if node.parent is not None else None,
            "source": source_hash(node.state_class if recipe is None else type(recipe)),
        },
        "attributes": attributes,
        "provenance": {
            "seconds": round(seconds, 6),
            "finished": time.time(),
            "host": host(),
            "user": user(),
            "python": platform.python_version(),
            "pid": os.getpid(),
        },
    }
    return ds.Manifest(blobs, meta)


def load_state(
    store: ds.Store, key: ds.NodeKey, state_class: type[ExperimentState], tags: tuple[str, ...]
) -> ExperimentState:
    """A fresh state object rebuilt from the manifest under ``key``."""
    manifest = store.get_manifest(key)
    state = state_class.__new__(state_class)
    for name, spec in manifest.meta["attributes"].items():
        setattr(state, name, load_attribute(store, manifest.blobs, name, spec, node=key))
    label(state, key, tags)
    return state


def label(state: ExperimentState, key: ds.NodeKey, tags: tuple[str, ...]) -> None:
    state._dagger_key = key.hex
    state._dagger_tags = tags
