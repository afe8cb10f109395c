"""Attribute codecs: how each state attribute becomes blobs and comes back, and their registry.

Built-in codecs, in the order they are tried (the first that accepts a value stores it):

- ``torch``: torch tensors (when torch is imported; never a dependency) as their raw bytes.
- ``ndarray``: numpy arrays as their raw buffer, zero-copy both ways: never pickled.
- ``msgpack``: plain data (None, bool, 64-bit int, float, str, bytes, lists, str-keyed dicts).

  Of these two, a value of at most ``INLINE_BYTES`` is kept in the manifest itself, not as a
  blob (a seed, a learning rate, a loss curve of a few hundred points).
- ``tree``: plain data that also holds tuples, arrays, tensors or numpy scalars (a model's dict
  of weight matrices, a ``(train, eval)`` pair of arrays, ``np.float32(0.93)``): msgpack for the
  structure, each array a blob of its own, each numpy scalar its dtype and bytes inline. No
  pickle, so it loads from any store, trusted or not.
- ``content``: ``dg.File`` and ``dg.Dir`` as their identity (path, digest, size): no pickle.
- ``pickle``: anything else, with protocol 5 and out-of-band buffers, so the arrays inside an
  object still become separate content-addressed blobs; the tensors inside an object (an
  ``nn.Module``'s parameters) are pulled out the same way. Loading it runs code.

``register_codec(codec)`` adds one. Precedence: registered codecs are tried before the built-ins,
the most recently registered first, so a codec can take over values a built-in would store.
Reading goes by the name recorded in the manifest, whatever the precedence is now. A codec says
whether loading it runs code (``runs_code``); the dispatcher, ``load_attribute``, enforces the
trust rule once for all of them: such an attribute loads only from a ``trusted`` store
(``dagger_store.signing``), and from any other raises UntrustedError before the codec is called.

An attribute a child inherits unchanged hashes to blobs that already exist, so it costs a hash
and no write.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import msgpack
import numpy as np

import dagger_store as ds
from dagger_store import recycled
from dagger_store.content import Dir, File, described, from_description
from dagger_store.plain import is_plain

Parts = dict[str, ds.Digest]

# A value this small (encoded) is kept in the manifest itself, not as a blob: no request and no
# file of its own, where a blob would cost a round trip (S3) or two fsyncs (a folder).
INLINE_BYTES = 4096


@runtime_checkable
class Codec(Protocol):
    """How one kind of attribute value is stored.

    ``save`` puts the value's blobs and returns them as *parts* with a *spec*: the part named
    ``""`` is the attribute's main blob, other part names start with ``#`` or ``@``; the spec is
    plain data (str-keyed dict; ``"codec"`` is added by the dispatcher) that ``load`` gets back
    together with the same parts.
    """

    name: str  # recorded in the manifest: how a reader finds this codec again
    runs_code: bool  # loading may execute code (pickle): only from a trusted store

    def accepts(self, value: Any) -> bool: ...

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]: ...

    def load(
        self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]
    ) -> Any: ...


def register_codec(codec: Codec) -> None:
    """Store the values ``codec.accepts`` with it, ahead of the codecs registered before it.

    Raises ValueError when another codec has the same name: names are what manifests record.
    """
    if not isinstance(codec, Codec) or not isinstance(codec.runs_code, bool):
        raise TypeError(
            "a codec has a name (str), runs_code (bool), and accepts, save and load methods "
            f"(see dagger_orchestrate.codecs.Codec), got {codec!r}"
        )
    if not isinstance(codec.name, str) or not codec.name:
        raise TypeError(f"a codec's name is a non-empty str, got {codec.name!r}")
    known = _BY_NAME.get(codec.name)
    if known is codec:
        return
    if known is not None:
        raise ValueError(
            f"a codec named {codec.name!r} is registered already ({known!r}); manifests record "
            "codecs by name, so give yours another name"
        )
    _BY_NAME[codec.name] = codec
    _REGISTERED.insert(0, codec)


def codec_for(value: Any) -> Codec:
    """The codec that stores ``value``: registered ones first (newest first), then built-ins."""
    for codec in (*_REGISTERED, *_BUILT_IN):
        if codec.accepts(value):
            return codec
    raise AssertionError("unreachable: the pickle codec accepts everything")


def save_attribute(store: ds.Store, name: str, value: Any) -> tuple[Parts, dict[str, Any]]:
    """Put ``value``'s blobs; return the manifest entries and how to read them back."""
    codec = codec_for(value)
    try:
        parts, spec = codec.save(store, value)
    except TypeError as exc:
        raise TypeError(f"state attribute {name!r}: {exc}") from exc
    for part in parts:
        if part and part[0] not in "#@":
            raise ValueError(
                f"codec {codec.name!r} returned the part {part!r} for attribute {name!r}: "
                "part names are '' or start with '#' or '@'"
            )
    return {name + part: digest for part, digest in parts.items()}, {"codec": codec.name, **spec}


def load_attribute(
    store: ds.Store,
    blobs: Mapping[str, ds.Digest],
    name: str,
    spec: Any,
    *,
    node: ds.NodeKey | None = None,
) -> Any:
    """Rebuild an attribute from its manifest entries (``blobs``) and codec ``spec``.

    ``node`` (the manifest's key) names the node in errors. UntrustedError for an attribute
    whose codec runs code, from a store that is not ``trusted``; FormatError for a codec this
    process does not know.
    """
    codec = _BY_NAME.get(spec["codec"])
    if codec is None:
        where = f" of node {node}" if node is not None else ""
        raise ds.FormatError(
            f"attribute {name!r}{where} was stored with codec {spec['codec']!r}, which this "
            "process does not know: import the module that registers it "
            "(dagger_orchestrate.register_codec), or it was written by a newer dagger",
            key=name,
        )
    parts = _AttributeParts(blobs, name)
    if codec.runs_code and not store.trusted:
        raise _untrusted(store, name, node, parts[""], codec.name)
    return codec.load(store, parts, spec)


class _AttributeParts(Mapping[str, ds.Digest]):
    """One attribute's parts, by part name, out of a manifest's entries."""

    def __init__(self, blobs: Mapping[str, ds.Digest], name: str) -> None:
        self._blobs = blobs
        self._name = name

    def __getitem__(self, part: str) -> ds.Digest:
        return self._blobs[self._name + part]

    def __iter__(self) -> Iterator[str]:
        n = len(self._name)
        return (
            k[n:] for k in self._blobs if k == self._name or (k[:n] == self._name and k[n] in "#@")
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _untrusted(
    store: ds.Store, name: str, node: ds.NodeKey | None, digest: ds.Digest, codec: str
) -> ds.UntrustedError:
    which = f"of node {node}" if node is not None else f"(in blob {digest})"
    return ds.UntrustedError(
        f"refusing to load attribute {name!r} {which}: its codec {codec!r} runs code, {store.url} "
        "is not a trusted store, and anyone who can write there could have planted that code "
        "(its arrays, tensors and plain data load regardless). For a shared store, configure "
        "the lab key (DAGGER_LAB_KEY or DAGGER_LAB_KEY_FILE) and require signed manifests "
        "(open_store(..., require_signatures=True), the default for a remote store with a lab "
        "key); if you trust everyone who can write there, open_store(..., trust=True)",
        key=node.hex if node is not None else "",
        attribute=name,
    )


def _torch() -> Any:
    return sys.modules.get("torch")  # a tensor implies torch is imported; never import it


# -- built-in codecs ------------------------------------------------------------------------------


class _TorchCodec:
    name, runs_code = "torch", False

    def accepts(self, value: Any) -> bool:
        torch = _torch()
        return torch is not None and type(value) is torch.Tensor

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        digest, spec = _save_tensor(store, value, _torch())
        return {"": digest}, spec

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        return _load_tensor(store, parts[""], spec)


class _NdarrayCodec:
    name, runs_code = "ndarray", False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, np.ndarray) and not value.dtype.hasobject

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        spec = {"dtype": value.dtype.str, "shape": list(value.shape)}
        if value.nbytes <= INLINE_BYTES:
            return {}, spec | {"inline": np.ascontiguousarray(value).tobytes()}
        return {"": store.put(value)}, spec

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        if "inline" not in spec:
            return _fresh_array(store, parts[""], spec["shape"], spec["dtype"])
        array = np.empty(spec["shape"], dtype=np.dtype(spec["dtype"]))
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(spec["inline"], np.uint8)
        return array


class _MsgpackCodec:
    name, runs_code = "msgpack", False

    def accepts(self, value: Any) -> bool:
        return is_plain(value)

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        packed = msgpack.packb(value, use_bin_type=True)
        if len(packed) <= INLINE_BYTES:
            return {}, {"inline": packed}
        return {"": store.put(packed)}, {}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        packed = spec["inline"] if "inline" in spec else store.get(parts[""])
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)


# msgpack extension codes of the tree codec (never reuse one: stored trees name them)
_TUPLE, _ARRAY, _TENSOR, _SCALAR = 1, 2, 3, 4


class _TreeCodec:
    name, runs_code = "tree", False

    def accepts(self, value: Any) -> bool:
        return _is_tree(value, _torch())

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        packer = _TreePacker()
        structure = packer.pack(value)
        parts: Parts = {}
        spec: dict[str, Any] = {}
        if len(structure) <= INLINE_BYTES:
            spec["inline"] = structure
        else:
            parts[""] = store.put(structure)
        arrays = packer.arrays
        for i, digest in enumerate(store.put_many(arrays)):
            parts[f"#{i}"] = digest
        tensor_parts, tensor_specs = _save_tensors(store, packer.tensors)
        shapes = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
        return parts | tensor_parts, spec | {"arrays": shapes, "tensors": tensor_specs}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        arrays = [
            _fresh_array(store, parts[f"#{i}"], shape["shape"], shape["dtype"])
            for i, shape in enumerate(spec["arrays"])
        ]
        tensors = _load_tensors(store, parts, spec["tensors"])
        structure = spec["inline"] if "inline" in spec else store.get(parts[""])
        return _TreeUnpacker(arrays, tensors).unpack(structure)


# The tree codec's packing and unpacking are objects, not nested functions: two closures that
# call each other form a reference cycle, which would keep every array of a state alive until
# the cyclic garbage collector happens to run (hundreds of MB in a run of large states).


class _TreePacker:
    """msgpack with the tree's extension types; collects the arrays and tensors it meets."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray[Any, Any]] = []
        self.tensors: list[Any] = []

    def pack(self, obj: Any) -> bytes:
        # strict types: tuples reach `_refer` instead of silently becoming lists
        packed: bytes = msgpack.packb(
            obj, default=self._refer, strict_types=True, use_bin_type=True
        )
        return packed

    def _refer(self, obj: Any) -> msgpack.ExtType:
        if type(obj) is tuple:
            return msgpack.ExtType(_TUPLE, self.pack(list(obj)))
        if type(obj) is np.ndarray:
            self.arrays.append(obj)
            return msgpack.ExtType(_ARRAY, self.pack(len(self.arrays) - 1))
        if isinstance(obj, np.generic):  # its dtype (byte order included) and its bytes
            return msgpack.ExtType(_SCALAR, self.pack([obj.dtype.str, obj.tobytes()]))
        self.tensors.append(obj)
        return msgpack.ExtType(_TENSOR, self.pack(len(self.tensors) - 1))


class _TreeUnpacker:
    """The inverse of ``_TreePacker``, given the arrays and tensors it collected."""

    def __init__(self, arrays: list[Any], tensors: list[Any]) -> None:
        self.arrays = arrays
        self.tensors = tensors

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self._resolve, raw=False, strict_map_key=False)

    def _resolve(self, code: int, data: bytes) -> Any:
        if code == _TUPLE:
            return tuple(self.unpack(data))
        if code == _ARRAY:
            return self.arrays[self.unpack(data)]
        if code == _TENSOR:
            return self.tensors[self.unpack(data)]
        if code == _SCALAR:
            dtype, raw = self.unpack(data)
            return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
        raise ds.FormatError(f"a tree attribute has unknown element {code}", key=str(code))


class _ContentCodec:
    """Data by content (``dg.File``, ``dg.Dir``): their identity as plain data, no pickle."""

    name, runs_code = "content", False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, File | Dir)

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        return {}, described(value)

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        return from_description(spec)


class _PickleCodec:
    name, runs_code = "pickle", True

    def accepts(self, value: Any) -> bool:
        return True  # the fallback: tried last

    def save(self, store: ds.Store, value: Any) -> tuple[Parts, dict[str, Any]]:
        buffers: list[pickle.PickleBuffer] = []
        file = io.BytesIO()
        pickler = _TensorPickler(file, buffers, _torch())
        try:
            pickler.dump(value)
        except Exception as exc:
            raise TypeError(
                f"a {type(value).__name__} cannot be stored: it is not a numpy array, plain "
                f"data, or picklable ({exc}); convert it, keep it out of the state, or register "
                "a codec for it (dagger_orchestrate.register_codec)"
            ) from exc
        parts = {"": store.put(file.getbuffer())}
        for i, digest in enumerate(store.put_many([b.raw() for b in buffers])):
            parts[f"#{i}"] = digest
        tensor_parts, tensor_specs = _save_tensors(store, pickler.tensors)
        return parts | tensor_parts, {"buffers": len(buffers), "tensors": tensor_specs}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        buffers = []
        for i in range(spec["buffers"]):
            digest = parts[f"#{i}"]
            out = bytearray(digest.size)  # writable, so unpickled arrays are writable too
            store.get_into(digest, out)
            buffers.append(out)
        tensors = _load_tensors(store, parts, spec["tensors"])
        return _TensorUnpickler(io.BytesIO(store.get(parts[""])), buffers, tensors).load()


_BUILT_IN: tuple[Codec, ...] = (
    _TorchCodec(),
    _NdarrayCodec(),
    _MsgpackCodec(),
    _TreeCodec(),
    _ContentCodec(),
    _PickleCodec(),
)
_REGISTERED: list[Codec] = []
_BY_NAME: dict[str, Codec] = {codec.name: codec for codec in _BUILT_IN}


def _fresh_array(
    store: ds.Store, digest: ds.Digest, shape: list[int], dtype: str
) -> np.ndarray[Any, Any]:
    """A writable array of the blob's bytes, the caller's own: lent copy-on-write where the
    store holds them in a region of the run's (``Store.get_private``), else read into new
    memory."""
    mapped = store.get_private(digest)
    if mapped is not None:
        return np.frombuffer(mapped, dtype=np.dtype(dtype)).reshape(shape)
    array = empty(shape, np.dtype(dtype))
    store.get_into(digest, array)
    return array


def empty(shape: tuple[int, ...] | list[int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """A new writable array, uninitialised, as ``np.empty(shape, dtype)`` gives; a large one
    on recycled memory (``dagger_store.recycled``)."""
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < recycled.RECYCLE_FROM or not recycled.AVAILABLE:
        return np.empty(shape, dtype=dtype)
    return np.ndarray(shape, dtype=dtype, buffer=recycled.buffer(size))


def _is_tree(value: Any, torch: Any) -> bool:
    kind = type(value)
    if kind is np.ndarray:
        return not value.dtype.hasobject
    if isinstance(value, np.generic):
        return _plain_scalar(value)
    if torch is not None and kind is torch.Tensor:
        return True
    if kind in (list, tuple):
        return all(_is_tree(v, torch) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_tree(v, torch) for k, v in value.items())
    return is_plain(value)


def _plain_scalar(value: np.generic) -> bool:
    # Not objects (pickle's business) nor structured voids (the dtype string drops the fields).
    return value.dtype.kind not in "OV"


# -- tensors, on their own and inside trees and pickles -------------------------------------------


def _save_tensor(store: ds.Store, value: Any, torch: Any) -> tuple[ds.Digest, dict[str, Any]]:
    tensor = value.detach().cpu().contiguous()
    # Through a byte view, so dtypes numpy lacks (bfloat16) are stored the same way.
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    spec = {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "requires_grad": bool(value.requires_grad),
        "parameter": isinstance(value, torch.nn.Parameter),
    }
    return store.put(raw), spec


def _save_tensors(store: ds.Store, tensors: list[Any]) -> tuple[Parts, list[dict[str, Any]]]:
    """Tensors found inside a value: parts ``@0``, ``@1``, ... and their specs."""
    parts: Parts = {}
    specs = []
    for i, tensor in enumerate(tensors):
        parts[f"@{i}"], spec = _save_tensor(store, tensor, _torch())
        specs.append({"codec": "torch", **spec})
    return parts, specs


def _load_tensor(store: ds.Store, digest: ds.Digest, spec: Mapping[str, Any]) -> Any:
    import torch  # recorded as a tensor: torch was there when it was saved

    dtype = getattr(torch, spec["dtype"])
    raw = _fresh_array(store, digest, [digest.size], "|u1")
    flat = torch.from_numpy(raw).view(dtype) if raw.size else torch.empty(0, dtype=dtype)
    tensor = flat.reshape(spec["shape"])
    if spec.get("parameter"):
        return torch.nn.Parameter(tensor, requires_grad=spec["requires_grad"])
    return tensor.requires_grad_(spec["requires_grad"])


def _load_tensors(
    store: ds.Store, parts: Mapping[str, ds.Digest], specs: list[Mapping[str, Any]]
) -> list[Any]:
    return [_load_tensor(store, parts[f"@{i}"], spec) for i, spec in enumerate(specs)]


class _TensorPickler(pickle.Pickler):
    """Protocol 5 with out-of-band buffers; plain tensors and Parameters pulled out by reference."""

    def __init__(self, file: io.BytesIO, buffers: list[pickle.PickleBuffer], torch: Any) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.tensors: list[Any] = []
        self._index: dict[int, int] = {}  # by id: a tensor shared twice (tied weights) stays one
        self._kinds = () if torch is None else (torch.Tensor, torch.nn.Parameter)

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) not in self._kinds:
            return None
        if id(obj) not in self._index:
            self._index[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return ("dagger.tensor", self._index[id(obj)])


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buffers: list[bytearray], tensors: list[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "dagger.tensor":
            return self._tensors[pid[1]]
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as exc:
            # Typically a class defined in the training script (__main__), read elsewhere.
            raise MissingClassError(f"{module}.{name}", f"{type(exc).__name__}: {exc}") from exc


class MissingClassError(ImportError):
    """A stored object needs a class that cannot be imported in this process.

    ``class_path`` names the class; ``node`` and ``attribute`` (when known) say whose
    attribute needed it; ``state`` (from ``restore``) is the state with every other
    attribute loaded.
    """

    def __init__(
        self,
        class_path: str,
        reason: str,
        *,
        node: ds.NodeKey | None = None,
        attribute: str = "",
        state: Any = None,
    ) -> None:
        where = f"attribute {attribute!r} of node {node.hex[:12]}" if node else "a stored object"
        super().__init__(
            f"{where} needs the class {class_path}, which cannot be imported here ({reason}). "
            f"Make {class_path.rpartition('.')[0]!r} importable in this process (a class defined "
            "in a training script lives in __main__: define it in a module both import), or "
            "restore the other attributes with node.restore(attributes=[...])"
        )
        self.class_path = class_path
        self.reason = reason
        self.node = node
        self.attribute = attribute
        self.state = state


def plain_or_repr(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values for records and display: plain data as is, anything else as its repr."""
    return {k: v if is_plain(v) else repr(v) for k, v in values.items()}
