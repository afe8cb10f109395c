"""Attribute codecs registered from outside the package: precedence, trust, errors.

The codecs here accept only classes defined in this module (and structured arrays), so
registering them for the whole test process changes nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate.codecs import load_attribute, save_attribute


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y


class FractionCodec:
    """Fractions as text: no code runs to load them."""

    name, runs_code = "test-fraction", False

    def accepts(self, value: Any) -> bool:
        return type(value) is Fraction

    def save(self, store: ds.Store, value: Any) -> tuple[dict[str, ds.Digest], dict[str, Any]]:
        return {"": store.put(str(value).encode())}, {"text": True}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        assert spec == {"codec": "test-fraction", "text": True}
        return Fraction(store.get(parts[""]).decode())


class PointAsJson:
    name, runs_code = "test-point-json", False

    def accepts(self, value: Any) -> bool:
        return type(value) is Point

    def save(self, store: ds.Store, value: Any) -> tuple[dict[str, ds.Digest], dict[str, Any]]:
        return {"": store.put(json.dumps([value.x, value.y]).encode())}, {}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        return Point(*json.loads(store.get(parts[""])))


class PointWithCode(PointAsJson):
    """Registered after PointAsJson, so it takes Points over; says its loading runs code."""

    name, runs_code = "test-point-code", True
    loads = 0

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        PointWithCode.loads += 1
        return super().load(store, parts, spec)


class StructuredColumns:
    """Takes over values a built-in would store: structured arrays, one blob per field."""

    name, runs_code = "test-structured", False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, np.ndarray) and value.dtype.names is not None

    def save(self, store: ds.Store, value: Any) -> tuple[dict[str, ds.Digest], dict[str, Any]]:
        names = list(value.dtype.names)
        parts = {f"#{i}": store.put(np.ascontiguousarray(value[n])) for i, n in enumerate(names)}
        fields = [[n, value.dtype[n].str] for n in names]
        return {"": store.put(b"columns"), **parts}, {"fields": fields, "shape": list(value.shape)}

    def load(self, store: ds.Store, parts: Mapping[str, ds.Digest], spec: Mapping[str, Any]) -> Any:
        out = np.empty(spec["shape"], dtype=[(n, t) for n, t in spec["fields"]])
        for i, (n, t) in enumerate(spec["fields"]):
            column = np.empty(spec["shape"], dtype=t)
            store.get_into(parts[f"#{i}"], column)
            out[n] = column
        return out


FRACTIONS = FractionCodec()
for codec in (FRACTIONS, PointAsJson(), PointWithCode(), StructuredColumns()):
    dg.register_codec(codec)


class Ratios(dg.ExperimentState):
    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.ratio = Fraction(1, 3)
        self.where = Point(1.5, -2.0)
        self.table = np.array([(1, 2.5), (2, 3.5)], dtype=[("id", "<i8"), ("score", "<f4")])
        self.plain = np.arange(4, dtype=np.float32)


def test_registered_codecs_store_and_load_a_state(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=Ratios)
    root = exp.spawn_new_tree(seed=0)
    exp.run()
    codecs = {n: s["codec"] for n, s in exp.store.get_manifest(root.key).meta["attributes"].items()}
    assert codecs == {
        "ratio": "test-fraction",
        "where": "test-point-code",  # registered last: tried first
        "table": "test-structured",  # ahead of the built-in ndarray codec
        "plain": "ndarray",  # what no registered codec accepts goes to the built-ins
        "seed": "msgpack",
    }
    state = dg.Experiment.restore(tmp_path / "exp").graph.root.restore()
    assert state.ratio == Fraction(1, 3)
    assert (state.where.x, state.where.y) == (1.5, -2.0)
    assert state.table.tolist() == [(1, 2.5), (2, 3.5)] and state.table.dtype.names == (
        "id",
        "score",
    )
    assert state.plain.tolist() == [0, 1, 2, 3]


def test_a_codec_that_runs_code_loads_only_from_a_trusted_store(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    blobs, spec = save_attribute(store, "where", Point(3.0, 4.0))
    blobs2, spec2 = save_attribute(store, "ratio", Fraction(2, 7))
    untrusted = ds.open_store(tmp_path / "store", trust=False)
    node = ds.node_key("state", {"n": 1})
    before = PointWithCode.loads
    with pytest.raises(ds.UntrustedError, match=r"'where'.*'test-point-code' runs code") as info:
        load_attribute(untrusted, blobs, "where", spec, node=node)
    assert info.value.attribute == "where" and info.value.key == node.hex
    assert PointWithCode.loads == before  # refused before the codec was called
    assert load_attribute(untrusted, blobs2, "ratio", spec2) == Fraction(2, 7)  # runs no code
    assert load_attribute(store, blobs, "where", spec).y == 4.0
    assert PointWithCode.loads == before + 1


def test_an_unknown_codec_is_a_clear_format_error(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    blobs, spec = save_attribute(store, "ratio", Fraction(1, 2))
    with pytest.raises(ds.FormatError, match=r"codec 'test-gone'.*register_codec"):
        load_attribute(store, blobs, "ratio", {**spec, "codec": "test-gone"})


def test_registering_checks_the_codec() -> None:
    dg.register_codec(FRACTIONS)  # the same codec again: nothing changes
    with pytest.raises(ValueError, match="'test-fraction' is registered already"):
        dg.register_codec(FractionCodec())
    with pytest.raises(TypeError, match="accepts, save and load"):
        dg.register_codec(object())  # type: ignore[arg-type]


def test_a_codec_must_name_its_parts_apart_from_other_attributes(tmp_path: Path) -> None:
    class Odd:
        pass

    class Sloppy(PointAsJson):
        name = "test-sloppy"

        def accepts(self, value: Any) -> bool:
            return type(value) is Odd

        def save(self, store: ds.Store, value: Any) -> tuple[dict[str, ds.Digest], dict[str, Any]]:
            return {"real": store.put(b"1")}, {}

    dg.register_codec(Sloppy())
    with pytest.raises(ValueError, match="part 'real' for attribute 'z'"):
        save_attribute(ds.open_store(tmp_path / "store"), "z", Odd())
