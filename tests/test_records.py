"""Experiment records: append-only objects in the store, listed per experiment, never lost."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from toy_experiment import State, Train

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store.records import (
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
