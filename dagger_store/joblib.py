"""joblib.Memory on a dagger store: ``import dagger_store.joblib`` registers ``backend="dagger"``.

::

    import joblib
    import dagger_store.joblib  # noqa: F401  (registers the backend)

    memory = joblib.Memory("s3://lab-cache/dagger", backend="dagger",
                           backend_options={"storage_options": {"profile": "lab"}, "trust": True})

    @memory.cache
    def features(path, size): ...

The location is any store URL ``open_store`` takes (a local or NFS folder, ``s3://bucket/prefix``,
``memory://name``), and the store is exactly that one: ``Memory`` appends ``/joblib`` to a str
location (for its own file backend, so as not to litter the folder), and this backend removes
that last segment again. Everything it writes is named inside the store's own layout, so joblib
shares the store, and its deduplicated blobs, with experiments. (``Memory`` leaves a
``pathlib.Path`` as it is: a Path whose last folder is called ``joblib`` would therefore name its
parent; pass such a location as a str.)

What a cached call is::

    node      node_key("joblib", {"format": FORMAT, "function": joblib's func_id,
                                  "code": BLAKE3 of the function's source, "arguments": args_id})
    v1/blobs/...                            the result: its pickle (protocol 5) as one blob and
                                            each out-of-band buffer (numpy arrays) as one more, so
                                            equal arrays are stored once, across calls and people
    v1/manifests/<node>                     the manifest naming those blobs, committed last, once
    v1/joblib/<fn>/results/<args>/<node>    index of the function's results (JSON: which call)
    v1/joblib/<fn>/metadata/<node>          joblib's metadata of the result (JSON), written once
    v1/joblib/<fn>/code/<generation>        the function's source as joblib records it

``<fn>`` is joblib's function identifier made one key segment (a readable part, ``-`` and 32 hex
of its BLAKE3). Every object but blobs and manifests is under ``JOBLIB``.

Code identity. joblib keeps one mutable ``func_code.py`` per function and, when the code it finds
differs from the caller's, deletes the function's whole cache: in a shared cache, two people on
different versions would delete each other's results in turn. Here the source (without joblib's
``# first line`` header, which joblib does not compare either) is part of the node key, so
results of different code never meet and none has to go. The "file" becomes append-only
generations, the newest being what joblib reads when a process first meets a function; after
that, the process answers joblib from its memory of the code it runs (as joblib's own
in-memory function hashes do), and records that code as the newest in each store it uses. joblib
calls ``clear_path`` both when it sees changed code and for an explicit ``func.clear()``; the
first is always right after ``get_cached_func_code`` for the same function in the same thread, so
that call deletes nothing (see ``DaggerStoreBackend.clear_path``).

Trust: unpickling runs code. A result loads only from a store whose ``Store.trusted`` is True;
elsewhere ``load_item`` raises UntrustedError before a byte of the pickle is read (``Memory``
then logs the error and computes the value again; ``MemorizedResult.get`` raises it). The code
and metadata objects are plain text and JSON, never executed, and are not signed.

Clearing needs a backend that can delete (``SupportsDelete``; else TypeError). It deletes
manifests and this module's own objects, never a blob: blobs are shared by content, and another
manifest (a colleague's result, an experiment's state) may name them. ``dagger_store.gc.collect``
frees blobs that nothing names any more. Garbage collection keeps manifests only if an
experiment record, a pin or a lease names them, or if they are younger than its ``keep_recent``:
joblib results are none of those, so a result lasts while it is used within ``keep_recent``
(each hit touches its manifest) and is collected otherwise, like any cache entry. To keep results
regardless, pin their node keys (``dagger_store.pins.pin``): a result's node key is the last
segment of its ``get_items`` path.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import logging
import pickle
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blake3 import blake3
from joblib import register_store_backend
from joblib._store_backends import CacheItemInfo, CacheWarning, StoreBackendBase
from joblib.disk import memstr_to_bytes
from joblib.memory import extract_first_line

from dagger_store.backends.base import Backend, SupportsDelete, SupportsEntries, refresh
from dagger_store.errors import FormatError, NotFoundError, StoreError, UntrustedError
from dagger_store.keys import NodeKey, node_key
from dagger_store.layout import JOBLIB, MANIFESTS, manifest_key
from dagger_store.manifest import Manifest
from dagger_store.open import open_store
from dagger_store.store import Store

__all__ = ["BACKEND_NAME", "FORMAT", "JOBLIB", "STORE_OPTIONS", "DaggerStoreBackend"]

BACKEND_NAME = "dagger"
# How a result is stored (pickle protocol 5, out-of-band buffers as blobs): part of the node key,
# so a change of format is a miss, never a misread.
FORMAT = 1
# backend_options passed on to open_store, as its keyword arguments.
STORE_OPTIONS = (
    "storage_options",
    "cache_dir",
    "workers",
    "compression_level",
    "lab_key",
    "require_signatures",
    "trust",
    "create",
)
# Options Memory itself always adds to backend_options.
_MEMORY_OPTIONS = ("compress", "mmap_mode")

_PICKLE = "pickle"
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_READABLE = 80  # characters of a function identifier kept readable in its key segment
_HEX = re.compile(r"[0-9a-f]{64}")
_SEGMENTS = re.compile(r"([A-Za-z0-9_-][A-Za-z0-9._-]*/)*([A-Za-z0-9_-][A-Za-z0-9._-]*)?")
# Memory joins "joblib" to a str location: a location ending in that segment, after something
# that is not itself a bare "scheme:/" or root.
_JOINED = re.compile(r"(?P<url>.*[^/\\:])[/\\]joblib[/\\]?")
_APPEND_ATTEMPTS = 16

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Code:
    """A function's source as joblib records it, and its identity in node keys."""

    text: str  # with joblib's "# first line: N" header
    identity: str  # BLAKE3 hex of the source without that header: what joblib compares

    @classmethod
    def of(cls, text: str) -> _Code:
        body, _ = extract_first_line(text)
        return cls(text, blake3(body.encode("utf-8", "surrogatepass")).hexdigest())


# The code this process runs, by func_id: what joblib last confirmed or recorded. Process-wide,
# as joblib's own memory of function hashes is: a Memory on another location (or a second one on
# the same) skips joblib's code check for a function it has seen, and must still key its results
# by that code.
_CODES: dict[str, _Code] = {}
# (store URL, func_id) whose newest recorded code is, as far as this process knows, its own.
_RECORDED: set[tuple[str, str]] = set()
_CODES_LOCK = threading.Lock()


class DaggerStoreBackend(StoreBackendBase):  # type: ignore[misc]  # joblib is untyped
    """A joblib store backend over a dagger store; made by ``joblib.Memory(backend="dagger")``.

    Configure it through ``Memory``'s ``backend_options``: the keyword arguments of
    ``dagger_store.open_store`` (``STORE_OPTIONS``).

    Parameters
    ----------
    storage_options
        For ``s3://`` only: passed to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``,
        ``secret``, ``profile``, ...).
    cache_dir
        Remote stores: a local folder keeping a read-through copy of what is read.
    workers, compression_level
        See ``dagger_store.Store``. dagger compresses blobs with zstd where it pays, so joblib's
        own ``compress`` must stay off (ValueError otherwise); ``compression_level=0`` stores
        everything raw.
    lab_key, require_signatures
        Sign every result's manifest with the lab key, and (default on a remote store with a
        key) refuse results not signed with it; such a store is trusted with pickles.
    trust
        Whether pickled results may load from this store (default: ``memory://`` and a local
        folder whose store you created; a remote store only with signatures). ``trust=True``
        means trusting everyone who can write there.
    create
        Create the store if there is none (default True); False: StoreOpenError instead.

    Notes
    -----
    ``mmap_mode`` must be None: every byte is verified before it is returned, so results are
    read into memory, never memory-mapped. Pickled (``joblib.Parallel`` workers), the backend
    reopens its store in the other process from its URL and options (``storage_options``
    included, as s3fs's own pickles do); a lab key is never pickled, so workers take it from
    ``$DAGGER_LAB_KEY`` or ``$DAGGER_LAB_KEY_FILE``.
    """

    location: str = ""  # the store's URL, once configured

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.verbose = 0
        self._options: dict[str, Any] = {}
        self._store: Store | None = None
        # Per thread: joblib's sequence of calls for one cached call runs in one thread.
        self._local = threading.local()

    # -- configuration ---------------------------------------------------------------------------

    def configure(
        self,
        location: str,
        verbose: int = 0,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Open the store at ``location``; called by ``joblib.Memory`` with its arguments.

        Raises
        ------
        TypeError
            An unknown option, or a location that is not a str.
        ValueError
            joblib's ``compress`` or ``mmap_mode``, which this backend cannot honour.
        StoreOpenError
            The store cannot be opened (see ``dagger_store.open_store``).
        """
        if not isinstance(location, str):
            raise TypeError(
                f"backend='dagger' takes a store URL or path as location, got "
                f"{type(location).__name__}: {location!r}"
            )
        options = dict(backend_options or {})
        unknown = sorted(set(options) - set(STORE_OPTIONS) - set(_MEMORY_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown backend_options {unknown} for backend='dagger'; it takes "
                f"{', '.join(STORE_OPTIONS)} (the keyword arguments of dagger_store.open_store)"
            )
        if options.pop("compress", False):
            raise ValueError(
                "backend='dagger' compresses every blob with zstd where it pays: leave joblib's "
                "compress off (tune it with backend_options={'compression_level': N}, 0 = raw)"
            )
        if options.pop("mmap_mode", None) is not None:
            raise ValueError(
                "backend='dagger' verifies every byte before returning it, so results are read "
                "into memory and cannot be memory-mapped: use mmap_mode=None"
            )
        self._open(store_url(location), options)
        self.verbose = verbose

    def _open(self, url: str, options: dict[str, Any]) -> None:
        self._store = open_store(url, **options)
        self._options = options
        self.location = self._store.url

    @property
    def store(self) -> Store:
        """The dagger store this backend caches in."""
        if self._store is None:
            raise RuntimeError("DaggerStoreBackend is not configured: use joblib.Memory(...)")
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        # The store (threads, connections) is opened again where this is unpickled; the lab key
        # is never pickled (it would travel, and may be stored, in the clear).
        options = {k: v for k, v in self._options.items() if k != "lab_key"}
        if "lab_key" in self._options:
            options["require_signatures"] = self.store.require_signatures
        with _CODES_LOCK:
            codes = {func_id: code.text for func_id, code in _CODES.items()}
        return {
            "location": self.location,
            "verbose": self.verbose,
            "options": options,
            "codes": codes,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset()
        self._open(state["location"], state["options"])
        self.verbose = state["verbose"]
        with _CODES_LOCK:
            for func_id, text in state["codes"].items():
                # What this process confirmed itself comes first: it is the code it runs.
                _CODES.setdefault(func_id, _Code.of(text))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(location={self.location!r})"

    # -- results ---------------------------------------------------------------------------------

    def contains_item(self, call_id: Sequence[str]) -> bool:
        """Whether a complete result of this call, by the caller's code, is in the store."""
        self._end_check()
        node = self._node(call_id)
        if node is None:
            return False  # no code confirmed for this function: nothing is a hit for it
        found = self.store.manifests([node]).get(node)
        self._local.found = (node, found)  # load_item follows at once on a hit
        return found is not None

    def load_item(
        self,
        call_id: Sequence[str],
        verbose: int = 1,
        timestamp: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Any:
        """The cached result of a call, every byte verified.

        Raises
        ------
        KeyError
            No such result (never computed, cleared, or collected by gc), as joblib expects.
        UntrustedError
            The store is not trusted with pickles; raised before the pickle is read.
        IntegrityError
            A stored byte does not match its digest; nothing of it is returned.
        """
        self._end_check()
        func_id, args_id = _call(call_id)
        node = self._node(call_id)
        if node is None:
            raise KeyError(
                f"no code of {func_id} is known in this process, so no result of it can be "
                "found: call the function through Memory.cache first"
            )
        manifest = self._manifest(node, func_id, args_id)
        if not self.store.trusted:
            raise UntrustedError(
                f"refusing to load the cached result of {func_id} (arguments {args_id}) from "
                f"{self.location}: it is a pickle, unpickling runs code, and this store is not "
                "trusted. If you trust everyone who can write there, pass "
                "backend_options={'trust': True}; or configure the lab key "
                "(backend_options={'lab_key': ...}, $DAGGER_LAB_KEY or $DAGGER_LAB_KEY_FILE) "
                "with require_signatures, so that only results signed by a key holder load",
                key=node.hex,
            )
        if verbose > 1:
            print(f"[Memory] Loading {func_id} ({args_id}) from {self.location}")
        value = self._unpickle(manifest, node)
        try:
            # A hit restarts the manifest's keep_recent: gc collects unused results, not used ones.
            refresh(self.store.backend, manifest_key(node))
        except StoreError as exc:  # a read-only store still serves hits
            logger.debug("could not refresh %s: %s", node, exc)
        return value

    def _manifest(self, node: NodeKey, func_id: str, args_id: str) -> Manifest:
        found = getattr(self._local, "found", None)
        self._local.found = None
        if found is not None and found[0] == node and found[1] is not None:
            manifest: Manifest = found[1]
            return manifest
        try:
            return self.store.get_manifest(node)
        except NotFoundError:
            raise KeyError(
                f"no cached result of {func_id} for arguments {args_id} in {self.location} "
                "(never stored, cleared, or collected by dagger's gc)"
            ) from None

    def _unpickle(self, manifest: Manifest, node: NodeKey) -> Any:
        meta = manifest.meta
        count = meta.get("buffers")
        names = [_PICKLE] + [_buffer_name(i) for i in range(count if type(count) is int else 0)]
        if (
            meta.get("format") != FORMAT
            or type(count) is not int
            or set(manifest.blobs) != set(names)
        ):
            raise FormatError(
                f"manifest {node} in {self.location} is not a joblib result of format {FORMAT} "
                f"(format {meta.get('format')!r}): upgrade dagger",
                key=node.hex,
            )
        buffers = []
        for name in names[1:]:
            digest = manifest.blobs[name]
            buffer = bytearray(digest.size)  # writable: arrays come back writable, as from joblib
            self.store.get_into(digest, buffer)
            buffers.append(buffer)
        return pickle.loads(self.store.get(manifest.blobs[_PICKLE]), buffers=buffers)

    def dump_item(self, call_id: Sequence[str], item: Any, verbose: int = 1) -> None:
        """Store a call's result: its buffers and pickle as blobs, then its manifest, once.

        A result that cannot be stored (unpicklable, store unreachable) only warns
        (``joblib.memory.CacheWarning``), as joblib's own backends do: the caller keeps the
        value it computed.
        """
        self._end_check()
        func_id, args_id = _call(call_id)
        code = self._known(func_id)
        if code is None:
            # Keyed by another code, it could be a colleague's hit for code that never made it.
            warnings.warn(
                f"not caching {func_id} in {self.location}: its code is not known in this process "
                "(joblib has not checked it yet); call the function through Memory.cache once",
                CacheWarning,
                stacklevel=2,
            )
            return
        if verbose > 10:
            print(f"Persisting {func_id} ({args_id}) in {self.location}")
        try:
            self._record(func_id, code)
            self._dump(func_id, args_id, code, item)
        except Exception as exc:  # any failure, pickling included: the value is still returned
            warnings.warn(
                f"Unable to cache the result of {func_id} in {self.location}: "
                f"{type(exc).__name__}: {exc}",
                CacheWarning,
                stacklevel=2,
            )

    def _dump(self, func_id: str, args_id: str, code: _Code, item: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        stream = io.BytesIO()
        pickle.Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(item)
        store = self.store
        digests = store.put_many([b.raw() for b in buffers])
        with stream.getbuffer() as pickled:
            blobs = {
                _PICKLE: store.put(pickled),
                **{_buffer_name(i): d for i, d in enumerate(digests)},
            }
        node = _node(func_id, args_id, code)
        meta = {
            "format": FORMAT,
            "function": func_id,
            "arguments": args_id,
            "code": code.identity,
            "buffers": len(digests),
        }
        fn = _function_prefix(func_id)
        # The index goes first, so that every committed result is listed and a clear finds it.
        index = {
            "function": func_id,
            "arguments": args_id,
            "code": code.identity,
            "node": node.hex,
            "written": time.time(),
        }
        store.backend.write_once(_index_key(fn, args_id, node), json.dumps(index).encode())
        commit = store.commit(node, Manifest(blobs, meta))
        backend = store.backend
        if commit.won and isinstance(backend, SupportsDelete):
            # A result that wins begins anew: metadata of an earlier result of this node (its
            # manifest since collected by gc) would describe another computation.
            backend.delete(f"{fn}metadata/{node.hex}")

    def get_metadata(self, call_id: Sequence[str]) -> dict[str, Any]:
        """joblib's metadata of a cached result ({} if there is none, as joblib expects)."""
        self._end_check()
        node = self._node(call_id)
        if node is None:
            return {}
        func_id, _ = _call(call_id)
        try:
            data = self.store.backend.read(f"{_function_prefix(func_id)}metadata/{node.hex}")
        except NotFoundError:
            return {}
        try:
            value = json.loads(data)
        except ValueError as exc:
            logger.warning(
                "ignoring unreadable joblib metadata of %s in %s: %s", func_id, self.location, exc
            )
            return {}
        return value if isinstance(value, dict) else {}

    def store_metadata(self, call_id: Sequence[str], metadata: Mapping[str, Any]) -> None:
        """Record joblib's metadata of a result, once: the first, like the result, stays."""
        self._end_check()
        node = self._node(call_id)
        if node is None:
            return  # the result was not cached either (dump_item warned)
        func_id, _ = _call(call_id)
        try:
            data = json.dumps(dict(metadata)).encode()
            self.store.backend.write_once(f"{_function_prefix(func_id)}metadata/{node.hex}", data)
        except (TypeError, ValueError, StoreError) as exc:
            warnings.warn(
                f"Unable to store joblib's metadata of {func_id} in {self.location}: {exc}",
                CacheWarning,
                stacklevel=2,
            )

    def get_item_info(self, call_id: Sequence[str]) -> dict[str, str]:
        """Where a call's results are indexed (for joblib's messages)."""
        func_id, args_id = _call(call_id)
        return {
            "location": f"{self.location}/{_function_prefix(func_id)}results/{_segment(args_id)}/"
        }

    def clear_item(self, call_id: Sequence[str]) -> None:
        """Delete the result of this call by the caller's code (if no code is known in this
        process: by every code); its blobs stay for gc."""
        self._end_check()
        func_id, args_id = _call(call_id)
        fn = _function_prefix(func_id)
        node = self._node(call_id)
        backend = self._deleting("clear a cached result")
        if node is not None:
            self._delete_results(backend, [_index_key(fn, args_id, node)])
        else:
            listed = self.store.backend.iter_keys(f"{fn}results/{_segment(args_id)}/")
            self._delete_results(backend, list(listed))

    # -- functions -------------------------------------------------------------------------------

    def store_cached_func_code(self, call_id: Sequence[str], func_code: str | None = None) -> None:
        """Record the caller's code of a function (None: joblib's "make the function's folder",
        which an object store has no need of)."""
        self._end_check()
        func_id = _func_id(call_id)
        if func_code is None:
            return
        if not isinstance(func_code, str):
            raise TypeError(f"function code is a str, got {type(func_code).__name__}")
        code = _Code.of(func_code)
        with _CODES_LOCK:
            _CODES[func_id] = code
            # Stores that had our earlier code as their newest no longer do.
            _RECORDED.difference_update([k for k in _RECORDED if k[1] == func_id])
        self._record(func_id, code)

    def get_cached_func_code(self, call_id: Sequence[str]) -> str:
        """The code joblib compares the caller's with: the code this process runs (confirmed or
        recorded before), else the newest recorded in this store; FileNotFoundError if none."""
        func_id = _func_id(call_id)
        code = self._known(func_id)
        if code is not None:
            # What this process runs: joblib compares it only to notice a function redefined
            # here. Recorded in this store too, for the next process's first check.
            self._record(func_id, code)
        else:
            newest = self._newest_code(func_id)
            if newest is None:
                raise FileNotFoundError(
                    errno.ENOENT, f"no code of {func_id} recorded in {self.location}"
                )
            # Taken as ours now: if joblib finds it equal, results are keyed by it; if not,
            # joblib records the caller's code at once (store_cached_func_code), replacing it.
            code = _Code.of(newest[1])
            with _CODES_LOCK:
                _CODES[func_id] = code
                _RECORDED.add((self._url, func_id))
        self._local.checked = func_id
        return code.text

    def get_cached_func_info(self, call_id: Sequence[str]) -> dict[str, str]:
        """Where a function's objects are (for joblib's messages)."""
        return {"location": f"{self.location}/{_function_prefix(_func_id(call_id))}"}

    def contains_path(self, call_id: Sequence[str]) -> bool:
        """Whether the store holds anything of this function."""
        self._end_check()
        prefix = _function_prefix(_func_id(call_id))
        return next(iter(self.store.backend.iter_keys(prefix)), None) is not None

    def clear_path(self, call_id: Sequence[str]) -> None:
        """Empty a function's cache: every result of it, by any code, with its recorded code.

        joblib calls this also when it finds that the caller's code differs from the recorded
        one; that call comes right after ``get_cached_func_code`` for the same function in the
        same thread, and deletes nothing: results are keyed by their code, so the other
        version's stay valid for whoever runs it. Blobs are left to gc.
        """
        func_id = _func_id(call_id)
        if getattr(self._local, "checked", None) == func_id:
            self._local.checked = None
            logger.info(
                "the code of %s differs from the code recorded in %s: nothing is deleted, "
                "results of each version are kept under their own code",
                func_id,
                self.location,
            )
            return
        self._end_check()
        self._clear(_function_prefix(func_id))

    # -- the whole cache -------------------------------------------------------------------------

    def clear(self) -> None:
        """Delete every joblib result, index and code in the store (blobs are left to gc)."""
        self.clear_location(self.location)

    def clear_location(self, location: str) -> None:
        """Delete what is at ``location``: the store's URL (everything of joblib), or the URL
        followed by ``/`` and a key prefix under ``JOBLIB`` (as ``get_items`` names items)."""
        self._end_check()
        self._clear(self._prefix_at(location))

    def create_location(self, location: str) -> None:
        """Check that ``location`` is in this store; there is nothing to make (the store was
        created when opened, and keys need no folders)."""
        self._prefix_at(location)

    def get_items(self) -> list[CacheItemInfo]:
        """Every complete result: ``path`` (for ``clear_location``), ``size`` (bytes of its
        blobs, shared ones counted in each) and ``last_access`` (when it was stored or last
        loaded: the manifest's modification time; the store keeps no access times)."""
        self._end_check()
        backend = self.store.backend
        if not isinstance(backend, SupportsEntries):
            raise TypeError(f"{self.location} cannot list objects with their ages")
        indexed = {n: k for k in backend.iter_keys(JOBLIB) if (n := _indexed_node(k)) is not None}
        manifests = self.store.manifests(list(indexed))
        modified: dict[str, float] = {}
        for shard in sorted({node.hex[:2] for node in manifests}):
            for entry in backend.iter_entries(f"{MANIFESTS}{shard}/"):
                modified[entry.key] = entry.modified
        return [
            CacheItemInfo(
                f"{self.location}/{indexed[node]}",
                sum(d.size for d in manifest.blobs.values()),
                datetime.datetime.fromtimestamp(modified.get(manifest_key(node), time.time())),
            )
            for node, manifest in sorted(manifests.items())
        ]

    def enforce_store_limits(
        self,
        bytes_limit: int | str | None,
        items_limit: int | None = None,
        age_limit: datetime.timedelta | None = None,
    ) -> None:
        """Delete the least recently used results until the cache is within the limits
        (``Memory.reduce_size``). Sizes count blobs shared between results in each, and bytes
        are freed only when gc collects blobs nothing names any more."""
        if isinstance(bytes_limit, str):
            bytes_limit = int(memstr_to_bytes(bytes_limit))
        if age_limit is not None and age_limit.total_seconds() < 0:
            raise ValueError("age_limit has to be a positive timedelta")
        items = sorted(self.get_items(), key=lambda item: item.last_access)
        excess_bytes = 0 if bytes_limit is None else sum(i.size for i in items) - bytes_limit
        excess_items = 0 if items_limit is None else len(items) - items_limit
        deadline = None if age_limit is None else datetime.datetime.now() - age_limit
        for item in items:
            if (
                excess_bytes <= 0
                and excess_items <= 0
                and (deadline is None or item.last_access > deadline)
            ):
                break
            if self.verbose > 10:
                print(f"Deleting item {item.path}")
            self.clear_location(item.path)
            excess_bytes -= item.size
            excess_items -= 1

    # -- joblib's file primitives, which nothing here uses ---------------------------------------

    def _open_item(self, f: Any, mode: str) -> Any:
        raise NotImplementedError("a dagger store has no files to open: use load_item/dump_item")

    def _item_exists(self, location: str) -> bool:
        raise NotImplementedError("a dagger store has no files: use contains_item")

    def _move_item(self, src: str, dst: str) -> None:
        raise NotImplementedError("a dagger store is write-once: nothing is ever moved")

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def _url(self) -> str:
        return self.store.url

    def _known(self, func_id: str) -> _Code | None:
        with _CODES_LOCK:
            return _CODES.get(func_id)

    def _record(self, func_id: str, code: _Code) -> None:
        """Make ``code`` the newest recorded code of ``func_id`` in this store, unless it is.

        Only other processes' first code check reads it, so failing (a store we may only read)
        is logged, not raised: results are keyed by the code this process runs regardless.
        """
        with _CODES_LOCK:
            if (self._url, func_id) in _RECORDED:
                return
        prefix = f"{_function_prefix(func_id)}code/"
        data = code.text.encode("utf-8", "surrogatepass")
        try:
            for _ in range(_APPEND_ATTEMPTS):
                newest = self._newest_code(func_id)
                if newest is not None and newest[1] == code.text:
                    break
                generation = 0 if newest is None else newest[0] + 1
                # Append-only: a concurrent writer taking this generation makes us look again.
                if self.store.backend.write_once(f"{prefix}{generation:012d}", data):
                    break
            else:
                logger.warning(
                    "the code of %s is not recorded in %s: %d writers appended at once",
                    func_id,
                    self.location,
                    _APPEND_ATTEMPTS,
                )
                return
        except StoreError as exc:
            logger.warning("the code of %s is not recorded in %s: %s", func_id, self.location, exc)
            return
        with _CODES_LOCK:
            _RECORDED.add((self._url, func_id))

    def _node(self, call_id: Sequence[str]) -> NodeKey | None:
        func_id, args_id = _call(call_id)
        code = self._known(func_id)
        return None if code is None else _node(func_id, args_id, code)

    def _end_check(self) -> None:
        # Any other call after get_cached_func_code means joblib found the code unchanged.
        self._local.checked = None

    def _newest_code(self, func_id: str) -> tuple[int, str] | None:
        prefix = f"{_function_prefix(func_id)}code/"
        generations = sorted(
            (int(name), key)
            for key in self.store.backend.iter_keys(prefix)
            if (name := key[len(prefix) :]).isdigit()
        )
        for generation, key in reversed(generations):
            try:
                return generation, self.store.backend.read(key).decode("utf-8", "surrogatepass")
            except NotFoundError:
                continue  # cleared since it was listed
        return None

    def _prefix_at(self, location: str) -> str:
        if location == self.location:
            return JOBLIB
        if isinstance(location, str) and location.startswith(f"{self.location}/"):
            prefix = location[len(self.location) + 1 :]
            if prefix.startswith(JOBLIB) and _SEGMENTS.fullmatch(prefix):
                return prefix
        raise ValueError(
            f"{location!r} is not a location of this joblib cache: use {self.location!r}, or "
            f"{self.location!r} + '/' + a key under {JOBLIB!r} (as get_items names items)"
        )

    def _deleting(self, what: str) -> SupportsDelete:
        backend: Backend = self.store.backend
        if not isinstance(backend, SupportsDelete):
            raise TypeError(
                f"cannot {what}: {self.location} cannot delete objects (its backend lacks "
                "delete); use a store that can, or a new location"
            )
        return backend

    def _clear(self, prefix: str) -> None:
        backend = self._deleting("clear the joblib cache")
        keys = list(self.store.backend.iter_keys(prefix))
        self._delete_results(backend, [k for k in keys if _indexed_node(k) is not None])
        for key in keys:
            if _indexed_node(key) is None:
                backend.delete(key)
        with _CODES_LOCK:
            # The code objects under prefix are gone: record the code again when next used.
            for url, func_id in [k for k in _RECORDED if k[0] == self._url]:
                if _function_prefix(func_id).startswith(prefix):
                    _RECORDED.discard((url, func_id))

    def _delete_results(self, backend: SupportsDelete, index_keys: Iterable[str]) -> None:
        self._local.found = None
        for key in index_keys:
            node = _indexed_node(key)
            if node is None:
                continue
            fn = key[: key.index("/results/") + 1]
            backend.delete(manifest_key(node))  # first: from here on it is a miss
            backend.delete(f"{fn}metadata/{node.hex}")
            # The index last: a clear interrupted before it is found and finished by the next.
            backend.delete(key)


def store_url(location: str) -> str:
    """The store a joblib location names: ``location`` without the ``/joblib`` segment that
    ``joblib.Memory`` joins to a str location (``"s3://b/p/joblib"`` -> ``"s3://b/p"``)."""
    joined = _JOINED.fullmatch(location)
    return joined["url"] if joined else location


def _call(call_id: Sequence[str]) -> tuple[str, str]:
    if (
        isinstance(call_id, str)
        or len(call_id) != 2
        or not all(isinstance(part, str) and part for part in call_id)
    ):
        raise TypeError(f"a joblib call id is (func_id, args_id), got {call_id!r}")
    return call_id[0], call_id[1]


def _func_id(call_id: Sequence[str]) -> str:
    if isinstance(call_id, str) or len(call_id) != 1 or not isinstance(call_id[0], str):
        raise TypeError(f"a joblib function id is [func_id], got {call_id!r}")
    return call_id[0]


def _node(func_id: str, args_id: str, code: _Code) -> NodeKey:
    return node_key(
        "joblib",
        {"format": FORMAT, "function": func_id, "code": code.identity, "arguments": args_id},
    )


def _segment(text: str) -> str:
    """``text`` as one key segment: itself if it is one, else a readable part and its hash."""
    if _SEGMENT.fullmatch(text):
        return text
    digest = blake3(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    readable = _UNSAFE.sub("_", text.replace("/", "."))[-_READABLE:].lstrip(".")
    return f"{readable}-{digest}" if readable else digest


def _function_prefix(func_id: str) -> str:
    return f"{JOBLIB}{_segment(func_id)}/"


def _index_key(fn: str, args_id: str, node: NodeKey) -> str:
    return f"{fn}results/{_segment(args_id)}/{node.hex}"


def _indexed_node(key: str) -> NodeKey | None:
    """The node an index key (``JOBLIB<fn>/results/<args>/<node>``) names; None for other keys."""
    parts = key[len(JOBLIB) :].split("/") if key.startswith(JOBLIB) else []
    if len(parts) == 4 and parts[1] == "results" and _HEX.fullmatch(parts[3]):
        return NodeKey(parts[3])
    return None


def _buffer_name(i: int) -> str:
    return f"buffer/{i:06d}"


register_store_backend(BACKEND_NAME, DaggerStoreBackend)
