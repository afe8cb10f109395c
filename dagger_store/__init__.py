"""dagger_store: an immutable content-addressed blob store with write-once manifests.

Usable on its own::

    import dagger_store as ds

    store = ds.open_store("/data/lab-cache")          # or "s3://bucket/prefix", "memory://x"
    digest = store.put(weights)                       # any buffer; numpy arrays zero-copy
    store.get_into(digest, np.empty_like(weights))    # verified on read
    key = ds.node_key("state", {"dataset": "mnist", "seed": 0})
    store.commit(key, ds.Manifest({"weights": digest}, {"description": "init"}))
"""

from dagger_store.digest import LEAF_SIZE, Digest
from dagger_store.errors import (
    BackendError,
    FormatError,
    IncompleteManifestError,
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
    StoreError,
    StoreOpenError,
    UnencodableValueError,
    UntrustedError,
)
from dagger_store.keys import KEY_SCHEMA, NodeKey, canonical_encode, node_key
from dagger_store.manifest import Manifest
from dagger_store.open import open_store
from dagger_store.signing import LabKey
from dagger_store.store import Commit, Store, VerifyReport

__all__ = [
    "KEY_SCHEMA",
    "LEAF_SIZE",
    "BackendError",
    "Commit",
    "Digest",
    "FormatError",
    "IncompleteManifestError",
    "IntegrityError",
    "InvalidKeyError",
    "LabKey",
    "Manifest",
    "NodeKey",
    "NotFoundError",
    "Store",
    "StoreError",
    "StoreOpenError",
    "UnencodableValueError",
    "UntrustedError",
    "VerifyReport",
    "canonical_encode",
    "node_key",
    "open_store",
]
