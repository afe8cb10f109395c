"""Every error the store raises, in one tree.

::

    StoreError                              anything the store refuses or cannot do
    ├── NotFoundError(LookupError)          no such blob, manifest or key
    ├── IntegrityError(ValueError)          stored bytes do not match their digest or checksum
    │   └── IncompleteManifestError         a manifest names blobs that are not in the store
    ├── InvalidKeyError(ValueError)         a malformed digest, node key or backend key
    ├── UnencodableValueError(TypeError)    a value with no deterministic encoding for a node key
    ├── FormatError(ValueError)             an object written in a format this version cannot read
    ├── StoreOpenError                      a URL that cannot be opened as a store
    ├── PinExistsError(FileExistsError)     a pin of that name exists already (pins.py)
    ├── UntrustedError(PermissionError)     data that would run code (a pickle) from a store not
    │                                       trusted, or a manifest whose signature is missing/wrong
    └── BackendError(OSError)               the storage itself failed (permissions, network, disk)

Backend exceptions are translated into this tree once, at the seam (``backends/``), so callers
never see ``FileNotFoundError`` from one backend and ``botocore.ClientError`` from another.
Each error carries its context as attributes and says what to do next.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by dagger_store."""


class NotFoundError(StoreError, LookupError):
    """The blob, manifest or key does not exist."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class IntegrityError(StoreError, ValueError):
    """Stored bytes fail verification; they are never returned to the caller."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class IncompleteManifestError(IntegrityError):
    """A manifest names blobs that are not (all) in the store."""

    def __init__(self, message: str, *, key: str, missing: tuple[str, ...]) -> None:
        super().__init__(message, key=key)
        self.missing = missing


class InvalidKeyError(StoreError, ValueError):
    """A digest, node key or backend key is malformed."""


class UnencodableValueError(StoreError, TypeError):
    """A value has no deterministic encoding, so it cannot take part in a node key."""

    def __init__(self, message: str, *, path: str, value_type: str) -> None:
        super().__init__(message)
        self.path = path
        self.value_type = value_type


class FormatError(StoreError, ValueError):
    """An object is not in a format (or format version) this version of dagger can read."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class StoreOpenError(StoreError):
    """A URL cannot be opened as a store: unknown scheme, missing bucket, unwritable path."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class PinExistsError(StoreError, FileExistsError):
    """A pin of that name exists already; pins are written once (unpin it first)."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class UntrustedError(StoreError, PermissionError):
    """Refused: loading this would trust data that anyone able to write the store could forge.

    Raised before a pickled attribute is unpickled from a store that is not trusted (``key``
    names the node, ``attribute`` the attribute), and for a manifest that is unsigned where
    signatures are required or whose signature does not match the lab key (``key`` names the
    manifest). Never carries the lab key or any credential.
    """

    # Defaults, so that the error survives pickling (outcomes cross process boundaries).
    def __init__(self, message: str = "", *, key: str = "", attribute: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.attribute = attribute


class BackendError(StoreError, OSError):
    """The underlying storage failed: permissions, network, a full disk."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key
