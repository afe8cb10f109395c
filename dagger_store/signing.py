"""Lab keys, manifest signatures, and which stores are trusted with pickles.

Unpickling runs code, so whoever can write a store could run code on every machine that loads a
pickled attribute from it. Arrays, tensors and plain data load from any store; pickles only from
a *trusted* one:

- a ``memory://`` store (this process filled it);
- a local or NFS folder whose ``dagger-store`` marker is owned by the current user (you created
  the store; on a shared folder you created but others write to, open it with ``trust=False``);
- a store that requires signed manifests, with the lab key configured: every manifest read must
  carry a valid HMAC under the lab key, and every blob a manifest names is verified against its
  content digest, so every byte that reaches the unpickler was vouched for by a key holder;
- a store opened with ``trust=True``: you trust everyone who can write there.

The first two are the backend's own answer (``Backend.trusted_by_location``); the store combines
it with its signing policy (``Store.trusted``).

The signature is HMAC-SHA256 under the lab key of ``b"dagger-manifest-v1\\x00"``, the node key's
hex, ``b"\\x00"`` and the manifest's canonical payload (``manifest.py`` documents where it sits in
the stored frame). Binding the node key means a signed manifest copied under another node's key
does not verify. Experiment records (``records.py``) are signed the same way under their own
domain, ``b"dagger-record-v1\\x00"``, binding the record's path in the store instead of a node
key: a record copied to another experiment, kind or name does not verify, and no manifest
signature ever verifies as a record's or the reverse. The lab key is never stored, logged,
pickled or put into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dagger_store.errors import UntrustedError
from dagger_store.keys import NodeKey
from dagger_store.manifest import Frame

LAB_KEY_ENV = "DAGGER_LAB_KEY"
LAB_KEY_FILE_ENV = "DAGGER_LAB_KEY_FILE"
MIN_LAB_KEY_BYTES = 16
_DOMAIN = b"dagger-manifest-v1\x00"
_RECORD_DOMAIN = b"dagger-record-v1\x00"
_HOW_TO_MAKE_ONE = 'python -c "import secrets; print(secrets.token_hex(32))"'


class LabKey:
    """The lab's shared secret for signing manifests; its text never appears in any output.

    Parameters
    ----------
    secret
        The key text (str is UTF-8 encoded); surrounding whitespace, such as a key file's final
        newline, is ignored. At least 16 bytes: anyone who can read the store can try to guess
        the key offline, against any signed manifest.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: str | bytes) -> None:
        if not isinstance(secret, str | bytes):
            raise TypeError(f"a lab key is str or bytes, got {type(secret).__name__}")
        raw = (secret.encode() if isinstance(secret, str) else secret).strip()
        if len(raw) < MIN_LAB_KEY_BYTES:
            raise ValueError(
                f"the lab key is too short ({len(raw)} bytes; at least {MIN_LAB_KEY_BYTES}): "
                f"anyone who can read the store could guess it. Make one with {_HOW_TO_MAKE_ONE}"
            )
        self._secret = raw

    @classmethod
    def configured(
        cls, lab_key: str | bytes | LabKey | None = None, environ: Mapping[str, str] | None = None
    ) -> LabKey | None:
        """``lab_key`` if given, else ``$DAGGER_LAB_KEY`` (the key text), else the contents of
        the file ``$DAGGER_LAB_KEY_FILE``; None when none is configured.

        ValueError (naming the source, never the key) when the configured key is unusable.
        """
        if isinstance(lab_key, LabKey):
            return lab_key
        if lab_key is not None:
            return cls(lab_key)
        env = os.environ if environ is None else environ
        if env.get(LAB_KEY_ENV):
            try:
                return cls(env[LAB_KEY_ENV])
            except ValueError as exc:
                raise ValueError(f"${LAB_KEY_ENV}: {exc}") from None
        path = env.get(LAB_KEY_FILE_ENV)
        if not path:
            return None
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"cannot read the lab key file {path!r} named by ${LAB_KEY_FILE_ENV}: "
                f"{exc.strerror}; fix the path or its permissions"
            ) from None
        try:
            return cls(text)
        except ValueError as exc:
            raise ValueError(f"the lab key file {path!r} (${LAB_KEY_FILE_ENV}): {exc}") from None

    def sign(self, node: NodeKey, payload: bytes) -> bytes:
        """The signature of a manifest's canonical ``payload`` stored under ``node``."""
        return self._mac(_DOMAIN, node.hex, payload)

    def verifies(self, node: NodeKey, payload: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``payload`` under ``node``."""
        return hmac.compare_digest(self.sign(node, payload), signature)

    def sign_record(self, key: str, payload: bytes) -> bytes:
        """The signature of an experiment record's ``payload`` stored at ``key`` (its path)."""
        return self._mac(_RECORD_DOMAIN, key, payload)

    def verifies_record(self, key: str, payload: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of the record ``payload`` at ``key``."""
        return hmac.compare_digest(self.sign_record(key, payload), signature)

    def _mac(self, domain: bytes, name: str, payload: bytes) -> bytes:
        mac = hmac.new(self._secret, domain, hashlib.sha256)
        mac.update(name.encode("ascii") + b"\x00")
        mac.update(payload)
        return mac.digest()

    def __repr__(self) -> str:
        return "LabKey(<hidden>)"

    def __reduce__(self) -> NoReturn:
        # A key inside a state attribute would be pickled into the store for all to read.
        raise TypeError("a LabKey is never pickled: keep it out of stored state and messages")


@dataclass(frozen=True, slots=True)
class Signatures:
    """A store's signing policy: ``lab_key`` signs what it writes and checks what it reads.

    ``required``: a manifest without a valid signature is refused (needs a lab key). Without it,
    an unsigned manifest is accepted, but a signed one is still checked when a key is known: a
    signature that does not match is never ignored.
    """

    lab_key: LabKey | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.required and self.lab_key is None:
            raise ValueError(
                "requiring signed manifests needs a lab key to check them with: pass lab_key= "
                f"or set ${LAB_KEY_ENV} or ${LAB_KEY_FILE_ENV}"
            )

    def sign(self, node: NodeKey, payload: bytes) -> bytes | None:
        return None if self.lab_key is None else self.lab_key.sign(node, payload)

    def check(self, node: NodeKey, frame: Frame, where: str) -> None:
        """Refuse (UntrustedError) the manifest ``frame`` read for ``node`` from ``where``."""
        if frame.signature is None:
            if self.required:
                _refuse(
                    node,
                    f"the manifest of node {node} in {where} is not signed, and this store "
                    "requires signed manifests: it was not written by a holder of the lab key. "
                    "It is ignored as a cache hit; if it should be there, it was written without "
                    "the lab key configured (remove it, or use a store with no unsigned manifests)",
                )
            return
        if self.lab_key is not None and not self.lab_key.verifies(
            node, frame.payload, frame.signature
        ):
            _refuse(
                node,
                f"the manifest of node {node} in {where} has a signature that does not match "
                "the lab key: it was tampered with, or signed with another lab key. Nothing in it "
                f"was loaded; check that lab_key=, ${LAB_KEY_ENV} or ${LAB_KEY_FILE_ENV} holds the "
                "lab's key",
            )

    def sign_record(self, key: str, payload: bytes) -> bytes | None:
        return None if self.lab_key is None else self.lab_key.sign_record(key, payload)

    def check_record(self, key: str, payload: bytes, signature: bytes | None, where: str) -> None:
        """Refuse (UntrustedError) the experiment record at ``key`` in ``where``: its verified
        ``payload`` and ``signature`` (None: unsigned, as every record of the old format is)."""
        if signature is None:
            if self.required:
                raise UntrustedError(
                    f"the record {key!r} in {where} is not signed, and this store requires "
                    "signatures: it was not written by a holder of the lab key (or by a dagger "
                    "older than signed records). If it should be there, rewrite it with the lab "
                    "key configured, or remove it",
                    key=key,
                )
            return
        if self.lab_key is not None and not self.lab_key.verifies_record(key, payload, signature):
            raise UntrustedError(
                f"the record {key!r} in {where} has a signature that does not match the lab key "
                "at that path: it was tampered with, moved from another path, or signed with "
                f"another lab key; check that lab_key=, ${LAB_KEY_ENV} or ${LAB_KEY_FILE_ENV} "
                "holds the lab's key",
                key=key,
            )


def _refuse(node: NodeKey, message: str) -> NoReturn:
    raise UntrustedError(message, key=node.hex)
