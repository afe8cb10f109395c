"""Experiment records: append-only objects in the store, listed per experiment, never lost."""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pandas as pd
import pytest
from toy_experiment import State, Train, sparsity

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store.gc import collect
from dagger_store.layout import experiment_prefix, record_key
from dagger_store.manifest import Frame
from dagger_store.records import (
    MAGIC,
    RecordWarning,
    add_record,
    check_name,
    experiments,
    read_records,
    referenced_keys,
)

KEYS = [ds.node_key("state", {"i": i}) for i in range(4)]


def test_records_append_and_read_back_oldest_first(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    add_record(store, "exp-a", "def", KEYS[:2], {"n": 1})
    add_record(store, "exp-a", "run", (), {"n": 2})
    add_record(store, "exp-b", "def", KEYS[2:], {"n": 3})
    assert [r["n"] for r in read_records(store, "exp-a")] == [1, 2]
    assert [r["n"] for r in read_records(store, "exp-a", "def")] == [1]
    assert read_records(store, "exp-a", "def")[0]["keys"] == [k.hex for k in KEYS[:2]]
    assert experiments(store) == ["exp-a", "exp-b"]
    assert referenced_keys(store) == set(KEYS)
    assert read_records(store, "nobody") == []


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../up", "sp ace", "x" * 129])
def test_bad_experiment_names_are_refused(name: str) -> None:
    with pytest.raises(ds.InvalidKeyError, match="experiment name"):
        check_name(name)


def _add_many(url: str, writer: int) -> None:
    store = ds.open_store(url)
    for i in range(20):
        add_record(store, "shared", "def", (), {"writer": writer, "i": i})


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    ds.open_store(url).close()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_add_many, args=(url, w)) for w in range(4)]
    for p in processes:
        p.start()
    with ThreadPoolExecutor(4) as pool:  # and threads in this process at the same time
        list(pool.map(lambda w: _add_many(url, w), range(4, 8)))
    for p in processes:
        p.join()
        assert p.exitcode == 0
    found = {(r["writer"], r["i"]) for r in read_records(ds.open_store(url), "shared")}
    assert found == {(w, i) for w in range(8) for i in range(20)}


def _run(location: dict[str, Any], lr: float, tag: str) -> None:
    exp = dg.Experiment(state_class=State, **location)
    with exp.tag(tag):
        Train(nb_epochs=1, lr=lr)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    exp.run()


def test_a_shared_store_lists_its_experiments_and_keeps_concurrent_additions(
    tmp_path: Path,
) -> None:
    shared = str(tmp_path / "lab")
    alice = {"path": str(tmp_path / "alice" / "pruning"), "store": shared}
    bob = {"path": str(tmp_path / "bob" / "pruning"), "store": shared}
    context = multiprocessing.get_context("spawn")
    runs = [
        context.Process(target=_run, args=(where, lr, f"{who}:{lr}"))
        for who, where in (("alice", alice), ("bob", bob))
        for lr in (0.1, 0.2)
    ]
    for p in runs:
        p.start()
    for p in runs:
        p.join()
        assert p.exitcode == 0
    names = experiments(ds.open_store(shared))
    assert len(names) == 2 and all(n.startswith("pruning-") for n in names)
    graph = dg.Experiment.restore(alice["path"]).graph
    assert len(graph) == 3  # root and both learning rates: neither concurrent run was lost
    assert {t for n in graph.nodes for t in n.tags} == {"alice:0.1", "alice:0.2"}


def test_an_experiment_keeps_its_name_and_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State, name="ablation-7")
    assert exp.name == "ablation-7"
    monkeypatch.setenv("DAGGER_STORE", str(tmp_path / "elsewhere"))
    again = dg.Experiment(tmp_path / "exp", state_class=State)
    assert again.name == "ablation-7" and again.store.url == exp.store.url
    with pytest.raises(ValueError, match="is experiment 'ablation-7'"):
        dg.Experiment(tmp_path / "exp", state_class=State, name="other")


def test_a_rerun_of_the_same_tree_records_its_definition_once(tmp_path: Path) -> None:
    def define(lrs: tuple[float, ...]) -> dg.Experiment:
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        root = exp.spawn_new_tree(dataset_name="digits", seed=0)
        for lr in lrs:
            with exp.tag(f"lr:{lr}"):
                Train(lr=lr, nb_epochs=1)(root)
        return exp

    define((0.1,)).run()
    define((0.1,)).run()  # the same tree: its definition is recorded already
    exp = define((0.1,))
    assert len(record_paths(exp.store, exp.name, ".def")) == 1
    assert len(record_paths(exp.store, exp.name, ".run")) == 2  # what ran is still recorded
    define((0.1, 0.2)).run()  # a new node: a new definition
    exp = define((0.1, 0.2))
    with exp.tag("again"):  # another tag is another definition too
        Train(lr=0.1, nb_epochs=1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    exp.run()
    assert len(record_paths(exp.store, exp.name, ".def")) == 3
    graph = dg.Experiment.restore(tmp_path / "exp").graph
    assert len(graph) == 3 and len(graph.nodes.filter("again")) == 2  # the root and lr 0.1


# -- records are verified ------------------------------------------------------------------------

LAB_KEY = "a-lab-key-of-at-least-16-bytes"
LATER = 30 * 24 * 3600.0


def record_paths(store: ds.Store, name: str, kind: str) -> list[str]:
    return sorted(k for k in store.backend.iter_keys(experiment_prefix(name)) if k.endswith(kind))


def rewrite(store: ds.Store, key: str, data: bytes) -> None:
    """Replace a stored object's bytes in place, as a failing disk or a vandal would."""
    path = Path(store.backend.root) / key  # type: ignore[attr-defined]
    path.chmod(0o644)
    path.write_bytes(data)


def snapshot(store: ds.Store) -> dict[str, bytes]:
    return {key: store.backend.read(key) for key in store.backend.iter_keys()}


@pytest.fixture
def two_sessions(tmp_path: Path) -> tuple[Path, ds.Store, str]:
    """An experiment run twice: each session wrote a definition and a run record."""
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    sparsity(Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0)))
    exp.run()
    again = dg.Experiment(tmp_path / "exp", state_class=State)
    with again.tag("second"):
        sparsity(Train(nb_epochs=1, lr=0.2)(again.spawn_new_tree(dataset_name="digits", seed=0)))
    again.run()
    return tmp_path / "exp", again.store, again.name


def test_records_are_written_in_a_verified_frame(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    key = add_record(store, "exp", "def", KEYS[:1], {"nodes": [{"properties": {"z": 1, "a": 2}}]})
    data = store.backend.read(key)
    assert data[:4] == MAGIC and data[4] == 1  # format version 1
    frame = Frame.parse(data, key=key, magic=MAGIC, what="record")
    assert frame.signature is None  # no lab key
    (record,) = read_records(store, "exp")
    assert list(record["nodes"][0]["properties"]) == ["z", "a"]  # the writer's order, kept
    assert msgpack.unpackb(frame.payload) == record


# Where a byte goes wrong: the magic, the version, the flags, a reserved byte, the checksum, the
# payload (first and last byte), and a record cut short.
CORRUPTIONS: dict[str, tuple[int | None, type[ds.IntegrityError] | type[ds.FormatError]]] = {
    "magic": (0, ds.IntegrityError),
    "version": (4, ds.FormatError),
    "flags": (5, ds.IntegrityError),
    "reserved": (7, ds.IntegrityError),
    "checksum": (20, ds.IntegrityError),
    "payload-start": (40, ds.IntegrityError),
    "payload-end": (-1, ds.IntegrityError),
    "truncated": (None, ds.IntegrityError),
}


def corrupt(store: ds.Store, key: str, position: int | None) -> None:
    data = bytearray(store.backend.read(key))
    if position is None:
        data = data[:30]
    else:
        data[position] ^= 0x5A
    rewrite(store, key, bytes(data))


@pytest.mark.parametrize("where", list(CORRUPTIONS))
def test_a_corrupt_record_is_skipped_with_a_warning_naming_it(
    two_sessions: tuple[Path, ds.Store, str], where: str
) -> None:
    folder, store, name = two_sessions
    position, strict_error = CORRUPTIONS[where]
    _, second_def = record_paths(store, name, ".def")
    first_run, _ = record_paths(store, name, ".run")
    corrupt(store, second_def, position)
    corrupt(store, first_run, position)

    exp = dg.Experiment.restore(folder)
    with pytest.warns(RecordWarning, match=re.escape(second_def)) as caught:
        graph = exp.graph  # the first session's nodes, without the second's
    assert [w.message.key for w in caught] == [second_def]  # type: ignore[union-attr]
    assert "skipped" in str(caught[0].message)
    assert len(graph) == 2 and not any(n.tags for n in graph.nodes)
    assert graph.roots[0].children[0].restore().history == ["train lr=0.1"]  # type: ignore[attr-defined]
    with pytest.warns(RecordWarning, match=re.escape(first_run)):
        table = exp.results()  # the second run's results only (its node is not in the graph)
    assert len(table) == 2 and "sparsity" not in table.columns

    strict = dg.Experiment.restore(folder, strict_records=True)
    with pytest.raises(strict_error, match=re.escape(second_def)):
        strict.graph  # noqa: B018
    with pytest.raises(strict_error, match=re.escape(first_run)):
        strict.load_result("sparsity", graph.roots[0].key)
    with pytest.raises(strict_error, match=re.escape(first_run)), warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        exp.graph.strict = True  # a graph read leniently, then its results strictly
        exp.results()

    with pytest.raises(strict_error, match=re.escape(second_def)) as info:
        read_records(store, name, "def", strict=True)
    assert isinstance(info.value, ds.IntegrityError | ds.FormatError)
    assert info.value.key == second_def
    with pytest.raises(strict_error, match=re.escape(first_run)):
        read_records(store, name, "run", strict=True)
    with pytest.warns(RecordWarning) as caught:
        assert len(read_records(store, name)) == 2  # the good ones, oldest first
    assert {w.message.key for w in caught} == {second_def, first_run}  # type: ignore[union-attr]

    # Garbage collection refuses: the keys a corrupt record names are unknown roots.
    before = snapshot(store)
    for dry_run in (True, False):
        with pytest.raises(ds.StoreError, match="refused, nothing deleted") as refused:
            collect(store, now=time.time() + LATER, dry_run=dry_run)
        assert isinstance(refused.value, strict_error)
        assert refused.value.key in {second_def, first_run}
        assert refused.value.key in str(refused.value)
    assert snapshot(store) == before


def test_a_record_without_a_valid_signature_is_ignored_where_signatures_are_required(
    tmp_path: Path,
) -> None:
    url = tmp_path / "lab"
    ds.open_store(url).close()
    signed = ds.open_store(url, lab_key=LAB_KEY, require_signatures=True)
    good = add_record(signed, "exp", "def", KEYS[:1], {"n": 1})
    frame = Frame.parse(signed.backend.read(good), key=good, magic=MAGIC, what="record")
    assert frame.signature is not None
    assert [r["n"] for r in read_records(signed, "exp", strict=True)] == [1]  # it verifies

    unsigned = add_record(ds.open_store(url), "exp", "def", KEYS[1:2], {"n": 2})  # no key
    other_lab = add_record(ds.open_store(url, lab_key="another-lab-key-16+"), "exp", "def",
                           KEYS[2:3], {"n": 3})  # fmt: skip
    moved = record_key("exp", "def", time.time_ns(), "0" * 32)  # a signed record, copied
    signed.backend.write_once(moved, signed.backend.read(good))

    with pytest.warns(RecordWarning) as caught:
        assert [r["n"] for r in read_records(signed, "exp")] == [1]
    messages = {w.message.key: str(w.message) for w in caught}  # type: ignore[union-attr]
    assert set(messages) == {unsigned, other_lab, moved}
    assert "is not signed" in messages[unsigned]
    assert "does not match the lab key" in messages[other_lab]
    assert "does not match the lab key" in messages[moved]
    with pytest.raises(ds.UntrustedError, match=re.escape(unsigned)):
        read_records(signed, "exp", strict=True)

    # With the key but not requiring signatures: unsigned is fine, a wrong signature is not.
    checking = ds.open_store(url, lab_key=LAB_KEY)
    with pytest.warns(RecordWarning) as caught:
        assert [r["n"] for r in read_records(checking, "exp")] == [1, 2]
    assert {w.message.key for w in caught} == {other_lab, moved}  # type: ignore[union-attr]
    # Without a key nothing can be checked: every intact record reads, as manifests do.
    assert len(read_records(ds.open_store(url), "exp")) == 4

    # A collector keeps what every intact record names, signed or not: keeping is always safe.
    assert referenced_keys(signed) == set(KEYS[:3])

    # Read with the wrong key, an experiment none of whose records verifies is an error.
    add_record(signed, "solo", "def", KEYS[:1], {"n": 4})
    with (
        ds.open_store(url, lab_key="another-lab-key-16+", require_signatures=True) as wrong,
        pytest.raises(ds.UntrustedError, match=r"none of the 1 records.*does not match"),
    ):
        read_records(wrong, "solo")


def test_an_experiment_signed_with_the_lab_key_restores(tmp_path: Path) -> None:
    store = str(tmp_path / "lab")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGGER_LAB_KEY", LAB_KEY)
        exp = dg.Experiment(tmp_path / "exp", state_class=State, store=store)
        Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
        exp.run()
        assert exp.store.signs
        for key in record_paths(exp.store, exp.name, ""):
            data = exp.store.backend.read(key)
            assert Frame.parse(data, key=key, magic=MAGIC, what="record").signature is not None
        restored = dg.Experiment.restore(tmp_path / "exp")
        assert len(restored.graph) == 2
        assert len(restored.results()) == 2


def unframe(store: ds.Store, key: str) -> None:
    """Rewrite a record as the previous version wrote it: the bare msgpack map."""
    payload = Frame.parse(store.backend.read(key), key=key, magic=MAGIC, what="record").payload
    rewrite(store, key, payload)


def test_records_of_the_old_unframed_format_still_read(
    two_sessions: tuple[Path, ds.Store, str],
) -> None:
    folder, store, name = two_sessions
    expected_graph = str(dg.Experiment.restore(folder).graph)
    expected_table = dg.Experiment.restore(folder).results()
    for key in record_paths(store, name, ""):
        unframe(store, key)
        assert isinstance(msgpack.unpackb(store.backend.read(key)), dict)  # a bare map
    exp = dg.Experiment.restore(folder)
    assert str(exp.graph) == expected_graph
    pd.testing.assert_frame_equal(exp.results(), expected_table)
    assert len(read_records(store, name, strict=True)) == 4
    assert referenced_keys(store)  # and they are roots for the collector

    # Written by hand, with the old layout: a plain map, "keys" and "written" added.
    old = record_key("old", "def", time.time_ns(), uuid.uuid4().hex)
    body = {"nodes": [], "calls": [], "keys": [KEYS[3].hex], "written": time.time()}
    store.backend.write_once(old, msgpack.packb(body, use_bin_type=True))
    assert read_records(store, "old") == [body]
    assert KEYS[3] in referenced_keys(store)

    # An old record has no checksum: only what no longer decodes as a record is caught.
    rewrite(store, old, msgpack.packb(body, use_bin_type=True)[:-3])
    with pytest.warns(RecordWarning, match=f"{re.escape(old)}.*old format"):
        assert read_records(store, "old") == []
    with pytest.raises(ds.IntegrityError, match=re.escape(old)):
        read_records(store, "old", strict=True)
    rewrite(store, old, msgpack.packb({"keys": ["not a key"]}))
    with pytest.raises(ds.IntegrityError, match="not a record"):
        read_records(store, "old", strict=True)

    # Where signatures are required an old record is unsigned, so it is refused; and when no
    # record is left, that is an error, not an empty experiment.
    with ds.open_store(store.url, lab_key=LAB_KEY, require_signatures=True) as signed:
        with pytest.raises(ds.UntrustedError, match=r"none of the 4 records.*is not signed"):
            read_records(signed, name)
        signed_too = add_record(signed, name, "def", [], {"nodes": [], "calls": []})
        with pytest.warns(RecordWarning, match="not signed") as caught:
            assert [r["keys"] for r in read_records(signed, name)] == [[]]
        assert len(caught) == 4 and signed_too not in {w.message.key for w in caught}  # type: ignore[union-attr]


def test_records_are_read_in_parallel(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    for i in range(12):
        add_record(store, "exp", "def", KEYS[i % 4 : i % 4 + 1], {"i": i})
    threads: set[str] = set()
    read = store.backend.read

    def noting_read(key: str) -> bytes:
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return read(key)

    store.backend.read = noting_read  # type: ignore[method-assign]
    assert [r["i"] for r in read_records(store, "exp")] == list(range(12))
    assert referenced_keys(store) == set(KEYS)
    assert len(threads) > 1 and all(t.startswith("dagger-store") for t in threads)
