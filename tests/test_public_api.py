"""The public surface is a reviewed artefact: changing it should change this test."""

from __future__ import annotations

import dagger_orchestrate
import dagger_store
from dagger_store import pins


def test_dagger_store_public_names() -> None:
    assert sorted(dagger_store.__all__) == sorted(
        [
            "KEY_SCHEMA", "LEAF_SIZE", "BackendError", "Commit", "Digest", "Dir", "File",
            "FormatError",
            "IncompleteManifestError", "IntegrityError", "InvalidKeyError", "LabKey", "Manifest",
            "NodeKey", "NotFoundError", "PinExistsError", "Store", "StoreError", "StoreOpenError",
            "UnencodableValueError", "UntrustedError", "VerifyReport", "canonical_encode",
            "node_key", "open_backend", "open_store", "register_backend",
        ]
    )  # fmt: skip
    for name in dagger_store.__all__:
        assert hasattr(dagger_store, name), name


def test_errors_form_one_tree_with_fitting_builtins() -> None:
    ds = dagger_store
    for error in (
        ds.NotFoundError, ds.IntegrityError, ds.InvalidKeyError, ds.UnencodableValueError,
        ds.FormatError, ds.StoreOpenError, ds.BackendError, ds.IncompleteManifestError,
        ds.UntrustedError, ds.PinExistsError,
    ):  # fmt: skip
        assert issubclass(error, ds.StoreError)
    assert issubclass(ds.NotFoundError, LookupError)
    assert issubclass(ds.IntegrityError, ValueError)
    assert issubclass(ds.IncompleteManifestError, ds.IntegrityError)
    assert issubclass(ds.UnencodableValueError, TypeError)
    assert issubclass(ds.BackendError, OSError)
    assert issubclass(ds.UntrustedError, PermissionError)
    assert issubclass(ds.PinExistsError, FileExistsError)
    assert pins.PinExistsError is ds.PinExistsError  # where it is raised, named as before


def test_dagger_orchestrate_public_names() -> None:
    assert sorted(dagger_orchestrate.__all__) == sorted(
        [
            "Dir", "Experiment", "ExperimentState", "File", "Function", "FunctionCall",
            "FunctionResult",
            "Graph", "GraphNode", "MissingClassError", "NodeSet", "Recipe", "RunError",
            "RunReport", "StaleCodeWarning", "StandInWarning", "StatePromise", "register_codec",
            "register_scheduler",
        ]
    )  # fmt: skip
    for name in dagger_orchestrate.__all__:
        assert hasattr(dagger_orchestrate, name), name
