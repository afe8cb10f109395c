"""Node keys and digests: golden vectors, canonical encoding, refusal of non-deterministic values.

Changing a golden vector means changing identity: bump KEY_SCHEMA (keys) or the blob tree domain
(digests) and say so in the changelog, never just update the expected value.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dagger_store as ds
from dagger_store.digest import LEAF_SIZE, blob_digest

GOLDEN_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "empty_state": ("state", {}),
    "state": (
        "state",
        {
            "class": "State",
            "properties": {"dataset_name": "digits", "model_name": "mlp", "seed": 0},
        },
    ),
    "recipe": (
        "recipe",
        {
            "class": "TrainRecipe",
            "version": None,
            "properties": {"lr": 0.1, "nb_epochs": 3},
            "parent": ds.NodeKey("0" * 64),
        },
    ),
    "tiny_float": ("recipe", {"lr": 1e-9}),
    "kinds": (
        "value",
        {
            "v": [
                None, True, False, 0, -1, 2**70, 1.5, -0.0, float("inf"), "é", b"\x00\xff",
                (1, [2]), {"b": 1, "a": 2}, frozenset({3, 1}),
            ]
        },
    ),
    "numpy": (
        "value",
        {
            "f32": np.float32(0.5),
            "i64": np.int64(-3),
            "arr": np.arange(6, dtype=">i4").reshape(2, 3),
            "empty": np.zeros((0, 2)),
        },
    ),
}  # fmt: skip

GOLDEN_KEYS = {
    "empty_state": "8cfe05ab1163751f0373c9446c96b6e3e7988071d4881918881d52ef660d1cd4",
    "state": "147155b78045a94525482fb554b1b787b287f57be725070f24b65c9d5101433d",
    "recipe": "1c3c13ba62ddbaea0f3e612dbff4d90b69f40dd7d21d76370bce78bc29cf4524",
    "tiny_float": "d401c6e12a431fc0158feab6e4d079af986031a16ae071ceeee3f9e374fa35bf",
    "kinds": "8b21f97a35390010f68524c7e51203a71eb650ccfa7020636dcdbeca33cedc25",
    "numpy": "59ec2593de19966e925f778912cb6676127577edaeb75b8299ff84b3df06098d",
}

GOLDEN_DIGESTS = [
    (b"", "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262:0"),
    (b"hello", "blake3:ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f:5"),
    (
        bytes(range(256)) * 40000 + b"x",  # > LEAF_SIZE: the hash-tree rule
        "blake3:3bd6d4d6bc0b2e70199bc4805f784b1220e40f637673d01d469fbcd00d074d91:10240001",
    ),
]


def test_schema_version_is_pinned() -> None:
    assert ds.KEY_SCHEMA == 1 and LEAF_SIZE == 8 * 2**20


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_node_keys(name: str) -> None:
    kind, fields = GOLDEN_CASES[name]
    assert ds.node_key(kind, fields).hex == GOLDEN_KEYS[name]


@pytest.mark.parametrize(("data", "expected"), GOLDEN_DIGESTS)
def test_golden_digests(data: bytes, expected: str) -> None:
    assert str(blob_digest(data)) == expected
    assert str(ds.open_store("memory://golden-digests").put(data)) == expected


def test_keys_are_equal_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    script = tmp_path / "keys.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.path.insert(0, sys.argv[1])
            from test_keys import GOLDEN_CASES
            import dagger_store as ds
            for name in sorted(GOLDEN_CASES):
                kind, fields = GOLDEN_CASES[name]
                print(name, ds.node_key(kind, fields).hex)
            """
        )
    )
    outputs = set()
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, str(script), str(Path(__file__).parent)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert dict(line.split() for line in outputs.pop().splitlines()) == GOLDEN_KEYS


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1e-9, 2e-9),  # the 2020 implementation rounded floats to 8 decimals
        (0.1 + 0.2, 0.3),
        (0.0, -0.0),
        (1, 1.0),
        (1, True),
        (0, False),
        ("1", 1),
        (b"a", "a"),
        ([1, 2], (1, 2)),
        ([1, 2], [2, 1]),
        (None, "None"),
        (np.float32(1), np.float64(1)),
        (np.float64(1), 1.0),
        (np.arange(3), np.arange(3).reshape(3, 1)),
        (np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int64)),
        ({"a": 1}, {"a": 1, "b": None}),
        ({"a": [1]}, {"a": (1,)}),
    ],
)
def test_distinct_values_have_distinct_keys(a: Any, b: Any) -> None:
    assert ds.node_key("k", {"x": a}) != ds.node_key("k", {"x": b})


def test_kind_and_field_names_are_part_of_identity() -> None:
    assert ds.node_key("state", {"x": 1}) != ds.node_key("recipe", {"x": 1})
    assert ds.node_key("k", {"x": 1}) != ds.node_key("k", {"y": 1})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),  # dict order
        ({3, 1, 2}, {2, 3, 1}),  # set order
        (np.arange(4, dtype="<f8"), np.arange(4, dtype=">f8")),  # byte order
        (np.arange(6).reshape(2, 3).T.copy(), np.asfortranarray(np.arange(6).reshape(2, 3).T)),
        (float("nan"), -float("nan")),  # every NaN is one NaN
        (b"ab", bytearray(b"ab")),
    ],
)
def test_equal_values_have_equal_keys(a: Any, b: Any) -> None:
    assert ds.node_key("k", {"x": a}) == ds.node_key("k", {"x": b})


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("value", "path", "type_name"),
    [
        (lambda: 0, "fields['x']", "function"),
        (object(), "fields['x']", "object"),
        (Color.RED, "fields['x']", "test_keys.Color"),  # an int subclass: meaning would be lost
        ([1, {"deep": print}], "fields['x'][1]['deep']", "builtin_function_or_method"),
        (np.array([object()]), "fields['x']", "numpy object"),
        (Path("/tmp"), "fields['x']", "pathlib.PosixPath"),
    ],
)
def test_unencodable_values_are_refused_by_path_and_type(
    value: Any, path: str, type_name: str
) -> None:
    with pytest.raises(ds.UnencodableValueError) as info:
        ds.node_key("k", {"x": value})
    assert info.value.path == path
    assert info.value.value_type == type_name
    assert path in str(info.value) and "deterministic" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_node_key_value_validates_itself() -> None:
    for bad in ("", "ABC", "0" * 63, "g" * 64, 123):
        with pytest.raises(ds.InvalidKeyError):
            ds.NodeKey(bad)  # type: ignore[arg-type]
    with pytest.raises(ds.InvalidKeyError):
        ds.node_key("", {})


def test_digest_value_validates_and_round_trips() -> None:
    digest = blob_digest(b"hello")
    assert ds.Digest.parse(str(digest)) == digest
    for bad in ("blake3:abc:5", "sha1:" + "0" * 64 + ":1", "blake3:" + "0" * 64, "x", ""):
        with pytest.raises(ds.InvalidKeyError):
            ds.Digest.parse(bad)
    with pytest.raises(ds.InvalidKeyError):
        ds.Digest("blake3", "0" * 64, -1)


def golden_content(root: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Cases with a File and a Dir over fixed content made under ``root`` (not part of a key)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.npy").write_bytes(b"dagger golden file\n" * 3)
    folder = root / "digits"
    (folder / "train").mkdir(parents=True)
    (folder / "empty").mkdir()
    (folder / "labels.csv").write_bytes(b"label\n0\n1\n")
    (folder / "train" / "0.bin").write_bytes(bytes(range(256)))
    data, digits = ds.File(root / "train.npy"), ds.Dir(folder)
    return {
        "file": ("value", {"file": data}),
        "dir": ("value", {"dir": digits}),
        "state_with_data": (
            "state",
            {"class": "State", "arguments": {"data": data, "dataset_name": "digits"}},
        ),
    }


GOLDEN_CONTENT_DIGESTS = {  # BLAKE3 of the file's bytes (b3sum agrees); the Dir's record
    "file": ("blake3", "addaf9b4bbc315723431df3ba633d7aac80e815a55a5ceedd450e339b819c4cc", 57),
    "dir": ("blake3-dir", "3c9d5ecaf91d6e650c57bad2b60d3d7f56147884635f3a79b4bff85923d45039", 266),
}

GOLDEN_CONTENT_KEYS = {
    "file": "b35dd347d3ba413e8f776ef4fd458d005aed91c11b3d983e69506c42b9176a95",
    "dir": "2cc22c13fcd53a992b1927c8dd714df7f2476c3eaef599d8ce8389ca6961e07b",
    "state_with_data": "690bc630f9910f8127ea429461f1e53b6192779eb53736853aaf66f5417fef97",
}


def test_golden_content_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(tmp_path / "cache"))
    cases = golden_content(tmp_path / "data")
    for name, (kind, fields) in cases.items():
        assert ds.node_key(kind, fields).hex == GOLDEN_CONTENT_KEYS[name], name
    for name in ("file", "dir"):
        value = cases[name][1][name]
        assert (value.algorithm, value.digest, value.size) == GOLDEN_CONTENT_DIGESTS[name]


def test_content_keys_are_equal_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    script = tmp_path / "content_keys.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from pathlib import Path
            sys.path.insert(0, sys.argv[1])
            from test_keys import golden_content
            import dagger_store as ds
            for name, (kind, fields) in sorted(golden_content(Path(sys.argv[2])).items()):
                print(name, ds.node_key(kind, fields).hex)
            """
        )
    )
    outputs = set()
    for seed in ("0", "1", "random"):
        root = tmp_path / f"seed-{seed}"  # another place each time: paths are not identity
        root.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "DAGGER_CACHE_DIR": str(tmp_path / "cache")}
        done = subprocess.run(
            [sys.executable, str(script), str(Path(__file__).parent), str(root)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert dict(line.split() for line in outputs.pop().splitlines()) == GOLDEN_CONTENT_KEYS


def _contains_itself(kind: str) -> Any:
    if kind == "list":
        items: list[Any] = [0]
        items.append(items)
        return items
    if kind == "dict":
        mapping: dict[str, Any] = {}
        mapping["me"] = [mapping]
        return mapping
    holder: list[Any] = []
    outer = (holder,)
    holder.append({"t": outer})
    return outer


@pytest.mark.parametrize(
    ("kind", "path", "back_to"),
    [
        ("list", "fields['x'][1]", "fields['x']"),
        ("dict", "fields['x']['me'][0]", "fields['x']"),
        ("tuple", "fields['x'][0][0]['t']", "fields['x']"),
    ],
)
def test_a_value_that_contains_itself_is_refused_not_recursed(
    kind: str, path: str, back_to: str
) -> None:
    with pytest.raises(ds.UnencodableValueError) as info:
        ds.node_key("k", {"x": _contains_itself(kind)})
    assert info.value.path == path and info.value.value_type == kind
    assert f"{path} is {back_to} itself" in str(info.value)


def test_the_same_object_twice_is_not_a_cycle() -> None:
    shared = {"a": [1, 2]}
    assert ds.node_key("k", {"x": [shared, shared], "y": (shared,)}) == ds.node_key(
        "k", {"x": [{"a": [1, 2]}, {"a": [1, 2]}], "y": ({"a": [1, 2]},)}
    )
