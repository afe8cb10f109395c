"""State attributes <-> blobs, each attribute in the cheapest faithful codec.

- ``ndarray``: numpy arrays as their raw buffer, zero-copy both ways: never pickled.
- ``torch``: torch tensors (when torch is imported; never a dependency) as their raw bytes.
- ``msgpack``: plain data (None, bool, 64-bit int, float, str, bytes, lists, str-keyed dicts).
- ``tree``: plain data that also holds tuples, arrays or tensors (a model's dict of weight
  matrices, a ``(train, eval)`` pair of arrays): msgpack for the structure, each array a blob of
  its own. No pickle, so it loads from any store, trusted or not.
- ``pickle``: anything else, with protocol 5 and out-of-band buffers, so the arrays inside an
  object (a model's dict of weight matrices) still become separate content-addressed blobs; the
  tensors inside an object (an ``nn.Module``'s parameters) are pulled out the same way. Unpickling
  runs code, so a pickled attribute loads only from a store that is ``trusted``
  (``dagger_store.signing``); from any other, UntrustedError before a byte of it is read.

An attribute a child inherits unchanged hashes to blobs that already exist, so it costs a hash
and no write.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

import dagger_store as ds

_MAX_INT = 2**64 - 1
_MIN_INT = -(2**63)

Entries = dict[str, ds.Digest]


def save_attribute(store: ds.Store, name: str, value: Any) -> tuple[Entries, dict[str, Any]]:
    """Put ``value``'s blobs; return the manifest entries and how to read them back."""
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it
    if torch is not None and type(value) is torch.Tensor:
        return _save_tensor(store, name, value, torch)
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        spec = {"codec": "ndarray", "dtype": value.dtype.str, "shape": list(value.shape)}
        return {name: store.put(value)}, spec
    if _is_plain(value):
        return {name: store.put(msgpack.packb(value, use_bin_type=True))}, {"codec": "msgpack"}
    if _is_tree(value, torch):
        return _save_tree(store, name, value, torch)
    return _save_pickled(store, name, value, torch)


def load_attribute(
    store: ds.Store,
    blobs: Mapping[str, ds.Digest],
    name: str,
    spec: Any,
    *,
    node: ds.NodeKey | None = None,
) -> Any:
    """Rebuild an attribute from its manifest entries (``blobs``) and codec ``spec``.

    ``node`` (the manifest's key) names the node in errors. UntrustedError for a pickled
    attribute in a store that is not ``trusted``; every other codec loads from any store.
    """
    codec = spec["codec"]
    if codec == "ndarray":
        array = np.empty(spec["shape"], dtype=np.dtype(spec["dtype"]))
        store.get_into(blobs[name], array)
        return array
    if codec == "torch":
        return _load_tensor(store, blobs[name], spec)
    if codec == "msgpack":
        return msgpack.unpackb(store.get(blobs[name]), raw=False, strict_map_key=False)
    if codec == "tree":
        return _load_tree(store, blobs, name, spec)
    if codec == "pickle":
        if not store.trusted:
            raise _untrusted(store, name, node, blobs[name])
        buffers = []
        for i in range(spec["buffers"]):
            digest = blobs[f"{name}#{i}"]
            out = bytearray(digest.size)  # writable, so unpickled arrays are writable too
            store.get_into(digest, out)
            buffers.append(out)
        tensors = [
            _load_tensor(store, blobs[f"{name}@{i}"], t) for i, t in enumerate(spec["tensors"])
        ]
        unpickler = _TensorUnpickler(io.BytesIO(store.get(blobs[name])), buffers, tensors)
        return unpickler.load()
    raise ds.FormatError(
        f"attribute {name!r} has unknown codec {codec!r}: written by a newer dagger?", key=name
    )


def _untrusted(
    store: ds.Store, name: str, node: ds.NodeKey | None, digest: ds.Digest
) -> ds.UntrustedError:
    which = f"of node {node}" if node is not None else f"(pickled in blob {digest})"
    return ds.UntrustedError(
        f"refusing to unpickle attribute {name!r} {which}: {store.url} is not a trusted "
        "store, and unpickling runs code that anyone who can write there could have planted "
        "(its arrays, tensors and plain data load regardless). For a shared store, configure "
        "the lab key (DAGGER_LAB_KEY or DAGGER_LAB_KEY_FILE) and require signed manifests "
        "(open_store(..., require_signatures=True), the default for a remote store with a lab "
        "key); if you trust everyone who can write there, open_store(..., trust=True)",
        key=node.hex if node is not None else "",
        attribute=name,
    )


def _save_tensor(
    store: ds.Store, name: str, value: Any, torch: Any
) -> tuple[Entries, dict[str, Any]]:
    tensor = value.detach().cpu().contiguous()
    # Through a byte view, so dtypes numpy lacks (bfloat16) are stored the same way.
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    spec = {
        "codec": "torch",
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "requires_grad": bool(value.requires_grad),
        "parameter": isinstance(value, torch.nn.Parameter),
    }
    return {name: store.put(raw)}, spec


def _load_tensor(store: ds.Store, digest: ds.Digest, spec: Any) -> Any:
    import torch  # recorded as a tensor: torch was there when it was saved

    dtype = getattr(torch, spec["dtype"])
    raw = np.empty(digest.size, dtype=np.uint8)
    store.get_into(digest, raw)
    flat = torch.from_numpy(raw).view(dtype) if raw.size else torch.empty(0, dtype=dtype)
    tensor = flat.reshape(spec["shape"])
    if spec.get("parameter"):
        return torch.nn.Parameter(tensor, requires_grad=spec["requires_grad"])
    return tensor.requires_grad_(spec["requires_grad"])


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


def _save_pickled(
    store: ds.Store, name: str, value: Any, torch: Any
) -> tuple[Entries, dict[str, Any]]:
    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    pickler = _TensorPickler(file, buffers, torch)
    try:
        pickler.dump(value)
    except Exception as exc:
        raise TypeError(
            f"state attribute {name!r} ({type(value).__name__}) cannot be stored: it is not a "
            f"numpy array, plain data, or picklable ({exc}); convert it, or keep it out of "
            "the state"
        ) from exc
    entries = {name: store.put(file.getbuffer())}
    for i, digest in enumerate(store.put_many([b.raw() for b in buffers])):
        entries[f"{name}#{i}"] = digest
    specs = []
    for i, tensor in enumerate(pickler.tensors):
        tensor_entries, spec = _save_tensor(store, f"{name}@{i}", tensor, torch)
        entries.update(tensor_entries)
        specs.append(spec)
    return entries, {"codec": "pickle", "buffers": len(buffers), "tensors": specs}


# msgpack extension codes of the tree codec
_TUPLE, _ARRAY, _TENSOR = 1, 2, 3


def _is_tree(value: Any, torch: Any) -> bool:
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return True
    if kind is int:
        return bool(_MIN_INT <= value <= _MAX_INT)
    if kind is np.ndarray:
        return not value.dtype.hasobject
    if torch is not None and kind is torch.Tensor:
        return True
    if kind in (list, tuple):
        return all(_is_tree(v, torch) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_tree(v, torch) for k, v in value.items())
    return False


def _save_tree(
    store: ds.Store, name: str, value: Any, torch: Any
) -> tuple[Entries, dict[str, Any]]:
    arrays: list[np.ndarray[Any, Any]] = []
    tensors: list[Any] = []

    def refer(obj: Any) -> msgpack.ExtType:
        if type(obj) is tuple:
            return msgpack.ExtType(_TUPLE, pack(list(obj)))
        if type(obj) is np.ndarray:
            arrays.append(obj)
            return msgpack.ExtType(_ARRAY, pack(len(arrays) - 1))
        tensors.append(obj)
        return msgpack.ExtType(_TENSOR, pack(len(tensors) - 1))

    def pack(obj: Any) -> bytes:
        # strict types: tuples reach `refer` instead of silently becoming lists
        packed: bytes = msgpack.packb(obj, default=refer, strict_types=True, use_bin_type=True)
        return packed

    structure = pack(value)
    entries = {name: store.put(structure)}
    for i, digest in enumerate(store.put_many(arrays)):
        entries[f"{name}#{i}"] = digest
    tensor_specs = []
    for i, tensor in enumerate(tensors):
        tensor_entries, spec = _save_tensor(store, f"{name}@{i}", tensor, torch)
        entries.update(tensor_entries)
        tensor_specs.append(spec)
    shapes = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    return entries, {"codec": "tree", "arrays": shapes, "tensors": tensor_specs}


def _load_tree(store: ds.Store, blobs: Mapping[str, ds.Digest], name: str, spec: Any) -> Any:
    arrays = []
    for i, shape in enumerate(spec["arrays"]):
        array = np.empty(shape["shape"], dtype=np.dtype(shape["dtype"]))
        store.get_into(blobs[f"{name}#{i}"], array)
        arrays.append(array)
    tensors = [_load_tensor(store, blobs[f"{name}@{i}"], t) for i, t in enumerate(spec["tensors"])]

    def resolve(code: int, data: bytes) -> Any:
        if code == _TUPLE:
            return tuple(unpack(data))
        if code == _ARRAY:
            return arrays[unpack(data)]
        if code == _TENSOR:
            return tensors[unpack(data)]
        raise ds.FormatError(f"attribute {name!r} has unknown tree element {code}", key=name)

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=resolve, raw=False, strict_map_key=False)

    return unpack(store.get(blobs[name]))


def _is_plain(value: Any) -> bool:
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return True
    if kind is int:
        return bool(_MIN_INT <= value <= _MAX_INT)
    if kind is list:
        return all(_is_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


def plain_or_repr(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values for records and display: plain data as is, anything else as its repr."""
    return {k: v if _is_plain(v) else repr(v) for k, v in values.items()}
