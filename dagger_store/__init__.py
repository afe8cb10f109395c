"""dagger_store: an immutable content-addressed blob store with write-once manifests.

Usable on its own::

    import dagger_store as ds

    store = ds.open_store("/data/lab-cache")          # or "s3://bucket/prefix", "memory://x"
    digest = store.put(weights)                       # any buffer; numpy arrays zero-copy
    store.get_into(digest, np.empty_like(weights))    # verified on read
    key = ds.node_key("state", {"dataset": "mnist", "seed": 0})
    store.commit(key, ds.Manifest({"weights": digest}, {"description": "init"}))

Other storage plugs in by URL scheme: ``ds.register_backend("labfs", opener)``, or a package's
entry point in the group ``dagger_store.backends`` (see ``dagger_store.registry``).
"""

from dagger_store.content import Dir, File
from dagger_store.digest import LEAF_SIZE, Digest
from dagger_store.errors import (
    BackendError,
    FormatError,
    IncompleteManifestError,
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
    PinExistsError,
    StoreError,
    StoreOpenError,
    UnencodableValueError,
    UntrustedError,
)
from dagger_store.keys import KEY_SCHEMA, NodeKey, canonical_encode, node_key
from dagger_store.manifest import Manifest
from dagger_store.open import open_store
from dagger_store.registry import open_backend, register_backend
from dagger_store.signing import LabKey
from dagger_store.store import Commit, Store, VerifyReport

__all__ = [
    "KEY_SCHEMA",
    "LEAF_SIZE",
    "BackendError",
    "Commit",
    "Digest",
    "Dir",
    "File",
    "FormatError",
    "IncompleteManifestError",
    "IntegrityError",
    "InvalidKeyError",
    "LabKey",
    "Manifest",
    "NodeKey",
    "NotFoundError",
    "PinExistsError",
    "Store",
    "StoreError",
    "StoreOpenError",
    "UnencodableValueError",
    "UntrustedError",
    "VerifyReport",
    "canonical_encode",
    "node_key",
    "open_backend",
    "open_store",
    "register_backend",
]
