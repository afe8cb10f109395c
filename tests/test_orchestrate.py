"""dagger_orchestrate: the paper's API over the store (definition, identity, runs, analysis)."""

from __future__ import annotations

import fnmatch
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import toy_experiment as toy
from blob_reads import BlobReads
from toy_experiment import Boom, Finetune, Prune, ReturnsNothing, State, Train, history, sparsity

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store.backends.cached import CachedBackend
from dagger_store.backends.memory import MemoryBackend


@pytest.fixture(autouse=True)
def _clear_runs() -> Iterator[None]:
    toy.RUNS.clear()
    yield


def pruning_tree(exp: dg.Experiment, lrs: tuple[float, ...] = (0.01, 0.1)) -> dict[str, Any]:
    """The paper's listing: train, evaluate, prune, evaluate, per learning rate."""
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    promises: dict[str, Any] = {"root": root}
    for lr in lrs:
        with exp.tag(f"lr:{lr}"):
            s = Train(nb_epochs=2, lr=lr)(root)
            sparsity(s)
            promises[f"train {lr}"] = s
            with exp.tag("pruned"):
                p = Prune(fraction=0.5)(s)
                sparsity(p)
                promises[f"prune {lr}"] = p
    return promises


# -- definition and identity ---------------------------------------------------------------------


def test_definition_is_lazy_and_keys_are_known_up_front(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = pruning_tree(exp)
    assert toy.RUNS == []
    assert list(exp.store.manifest_keys()) == []
    assert len({p.key for p in tree.values()}) == 5
    assert all(isinstance(p.key, ds.NodeKey) for p in tree.values())
    report = exp.run()
    assert set(report.executed) == {p.key for p in tree.values()}
    # The nodes, and (issue 8) each Function call's stored result: nothing else.
    nodes = {p.key for p in tree.values()}
    assert set(exp.store.manifest_keys()) == nodes | {r.result_key for r in report.results}
    assert len(report.results) == 4 and {r.key for r in report.results} <= nodes


def test_tags_are_not_identity(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("a"):
        a = Train(nb_epochs=1, lr=0.1)(root)
    with exp.tag("b"):
        b = Train(nb_epochs=1, lr=0.1)(root)
    assert a.key == b.key and a.tags == b.tags == ("a", "b")
    assert len(exp.run().executed) == 2  # root and the one train node


def test_identity_separates_what_differs(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    keys = {
        Train(nb_epochs=3, lr=0.1)(root).key,
        Finetune(nb_epochs=3, lr=0.1)(root).key,  # same properties, other recipe class
        Train(nb_epochs=3, lr=1e-9)(root).key,
        Train(nb_epochs=3, lr=2e-9)(root).key,  # the 2020 implementation rounded these together
        Train(nb_epochs=3, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=1)).key,
    }
    assert len(keys) == 5
    exp.run()
    assert sorted(toy.RUNS) == sorted(
        ["init", "init", "train 0.1", "finetune 0.1", "train 1e-09", "train 2e-09", "train 0.1"]
    )


def test_version_bump_changes_identity(tmp_path: Path) -> None:
    class TrainV2(Train):
        VERSION = 2

    class TrainV3(Train):
        VERSION = 3

    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    TrainV2.__qualname__ = TrainV3.__qualname__ = "Train"  # same class path, other VERSION
    assert TrainV2(nb_epochs=1, lr=0.1)(root).key != TrainV3(nb_epochs=1, lr=0.1)(root).key


def test_recipe_constructor_takes_exactly_its_properties() -> None:
    with pytest.raises(TypeError, match=r"missing \['nb_epochs'\]"):
        Train(lr=0.1)
    with pytest.raises(TypeError, match=r"unknown \['momentum'\]"):
        Train(lr=0.1, nb_epochs=1, momentum=0.9)
    with pytest.raises(TypeError, match=r"Train\.lr is a function"):
        Train(lr=lambda step: 0.1, nb_epochs=1)


def test_spawn_needs_every_property(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    with pytest.raises(TypeError, match=r"missing PROPERTIES \['seed'\]"):
        exp.spawn_new_tree(dataset_name="digits")
    with pytest.raises(TypeError, match="state promise"):
        Train(lr=0.1, nb_epochs=1)(State())  # type: ignore[arg-type]


def test_keys_are_equal_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import dagger_orchestrate as dg
        from toy_experiment import State, Train, Prune
        exp = dg.Experiment(__import__("sys").argv[1], state_class=State)
        root = exp.spawn_new_tree(dataset_name="digits", seed=0)
        pruned = Prune(fraction=0.5)(Train(nb_epochs=2, lr=0.1)(root))
        print(root.key.hex, pruned.key.hex)
        """
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"exp{seed}")],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("0", "1", "4242")
    }  # fmt: skip
    assert len(outputs) == 1
    exp = dg.Experiment(tmp_path / "here", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    pruned = Prune(fraction=0.5)(Train(nb_epochs=2, lr=0.1)(root))
    assert outputs.pop().split() == [root.key.hex, pruned.key.hex]
    assert root.key.hex == "fa3f5a50df2fdff9e647ab6691fb37878f2195b150eaf17fe45002234c130e8a"


# -- running only what is missing ----------------------------------------------------------------


def test_rerun_executes_nothing_and_loads_no_payload(tmp_path: Path) -> None:
    pruning_tree(first := dg.Experiment(tmp_path / "exp", state_class=State))
    assert len(first.run().executed) == 5
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = pruning_tree(exp)
    exp._calls.clear()  # no Functions: nothing at all should be read
    reads = BlobReads(exp.store.backend)
    toy.RUNS.clear()
    report = exp.run()
    assert report.executed == () and len(report.cached) == 5 and toy.RUNS == []
    assert reads.bytes == 0
    assert set(report.cached) == {p.key for p in tree.values()}


def test_adding_a_branch_runs_exactly_its_new_nodes(tmp_path: Path) -> None:
    pruning_tree(first := dg.Experiment(tmp_path / "exp", state_class=State))
    first.run()
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = pruning_tree(exp, lrs=(0.01, 0.1, 0.5))
    toy.RUNS.clear()
    report = exp.run()
    assert set(report.executed) == {tree["train 0.5"].key, tree["prune 0.5"].key}
    assert toy.RUNS == ["train 0.5", "prune 0.5"]


def test_a_cached_parent_is_loaded_only_for_its_missing_child(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    Train(nb_epochs=1, lr=0.1)(root)
    exp.run()
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    trained = Train(nb_epochs=1, lr=0.1)(root)
    Prune(fraction=0.5)(trained)
    reads = BlobReads(exp.store.backend)
    exp.run()
    # The trained parent's blobs, and nothing of the root's that the parent does not share.
    assert reads.hexes == {d.hex for d in exp.store.get_manifest(trained.key).blobs.values()}


def test_functions_run_every_time_and_report_their_values(tmp_path: Path) -> None:
    for attempt in range(2):
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        tree = pruning_tree(exp)
        call = history(tree["prune 0.1"])
        report = exp.run()
        assert len(report.executed) == (5 if attempt == 0 else 0)
        assert len(report.results) == 5
        by_key = {(r.function, r.key): r.value for r in report.results}
        assert by_key[("sparsity", tree["train 0.1"].key)] == 0.0
        assert by_key[("sparsity", tree["prune 0.1"].key)] == pytest.approx(0.5, abs=0.01)
        assert call.result == (("lr:0.1", "pruned"), ["train lr=0.1", "prune 0.5"])


def test_siblings_never_see_each_others_mutations(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    children = [Train(nb_epochs=1, lr=lr)(root) for lr in (0.1, 0.2, 0.3)]
    calls = [history(c) for c in children]
    exp.run("threads")
    assert [c.result[1] for c in calls] == [[f"train lr={lr}"] for lr in (0.1, 0.2, 0.3)]
    restored = exp.graph.node(root.key).restore()
    assert restored.history == []
    fresh = State.__new__(State)
    fresh.seed = 0
    fresh.initialize_state()
    np.testing.assert_array_equal(restored.model["w1"], fresh.model["w1"])


# -- serialization -------------------------------------------------------------------------------


def test_attributes_use_the_cheapest_faithful_codec(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    exp.run()
    manifest = exp.store.get_manifest(root.key)
    codecs = {name: spec["codec"] for name, spec in manifest.meta["attributes"].items()}
    assert codecs == {
        "data": "ndarray", "model": "tree", "history": "msgpack",
        "dataset_name": "msgpack", "seed": "msgpack",
    }  # fmt: skip
    # The model's two matrices are blobs of their own; the structure around them is msgpack,
    # small enough to be kept in the manifest itself.
    assert len(manifest.meta["attributes"]["model"]["arrays"]) == 2
    assert manifest.blobs["model#0"].size == 64 * 32 * 4
    assert "model" not in manifest.blobs
    assert len(manifest.meta["attributes"]["model"]["inline"]) < 100


def test_objects_are_pickled_with_their_arrays_out_of_band(tmp_path: Path) -> None:
    from collections import OrderedDict

    from dagger_orchestrate.codecs import load_attribute, save_attribute

    store = ds.open_store(tmp_path / "store")
    value = OrderedDict(w=np.arange(100_000, dtype=np.float32), tag="x")  # not plain: pickled
    entries, spec = save_attribute(store, "opt", value)
    assert spec["codec"] == "pickle" and spec["buffers"] == 1
    assert entries["opt#0"].size == 400_000 and entries["opt"].size < 1000
    back = load_attribute(store, entries, "opt", spec)
    assert type(back) is OrderedDict and np.array_equal(back["w"], value["w"])


def test_inherited_attributes_are_not_written_again(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    exp.run()
    before = set(exp.store.backend.iter_keys("v1/blobs/"))
    child = Finetune(nb_epochs=1, lr=0.1)(root)  # changes only the history list
    exp.run()
    added = set(exp.store.backend.iter_keys("v1/blobs/")) - before
    assert added == set()  # data and model blobs are shared with the parent
    attributes = exp.store.get_manifest(child.key).meta["attributes"]
    assert "inline" in attributes["history"]  # the new history is small: in the manifest


# -- failures ------------------------------------------------------------------------------------


def test_a_failing_recipe_spares_the_other_branches(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("doomed"):
        bad = Boom(message="diverged")(root)
        below = Prune(fraction=0.5)(bad)
        sparsity(below)
    with exp.tag("fine"):
        good = Train(nb_epochs=1, lr=0.1)(root)
    with pytest.raises(dg.RunError) as info:
        exp.run()
    error = info.value
    assert "Boom(message='diverged')" in str(error) and "doomed" in str(error)
    assert bad.key.hex[:12] in str(error)
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "diverged"
    assert error.report.failed == (bad.key,) and error.report.skipped == (below.key,)
    assert good.key in error.report.executed
    assert exp.store.missing([root.key, good.key, bad.key, below.key]) == [bad.key, below.key]


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_on_long_runs_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], progress: bool
) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    toy.Slow(seconds=1.2)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    exp.run(progress=progress)
    assert ("Completed" in capsys.readouterr().err) is progress


def test_a_recipe_must_return_the_state(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    ReturnsNothing()(exp.spawn_new_tree(dataset_name="digits", seed=0))
    with pytest.raises(dg.RunError, match="must return the state"):
        exp.run()


def test_stale_code_warns_once_naming_the_recipe(tmp_path: Path) -> None:
    module = tmp_path / "lab_recipes.py"
    source = "import dagger_orchestrate as dg\nclass Step(dg.Recipe):\n    PROPERTIES = ['k']\n"
    module.write_text(source + "    def run(self, state):\n        return state\n")
    sys.path.insert(0, str(tmp_path))
    try:
        lab = importlib.import_module("lab_recipes")
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        lab.Step(k=1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
        exp.run()
        module.write_text(source + "    def run(self, state):\n        return state  # v2\n")
        lab = importlib.reload(lab)
        for _ in range(2):
            exp = dg.Experiment(tmp_path / "exp", state_class=State)
            lab.Step(k=1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exp.run()
            stale = [w for w in caught if issubclass(w.category, dg.StaleCodeWarning)]
            assert len(stale) == (1 if _ == 0 else 0)
            if stale:
                assert "lab_recipes.Step" in str(stale[0].message)
                assert "VERSION" in str(stale[0].message)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lab_recipes", None)


# -- tags ----------------------------------------------------------------------------------------


def test_tags_nest_and_are_restored_even_on_errors(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("outer"):
        with exp.tag("inner", "x"):
            deep = Train(nb_epochs=1, lr=0.1)(root)
        shallow = Train(nb_epochs=1, lr=0.2)(root)
        with pytest.raises(RuntimeError), exp.tag("lost"):
            raise RuntimeError("user code failed inside a tag block")
        after = Train(nb_epochs=1, lr=0.3)(root)
    untagged = Train(nb_epochs=1, lr=0.4)(root)
    assert deep.tags == ("inner", "outer", "x")
    assert shallow.tags == after.tags == ("outer",)
    assert untagged.tags == () and root.tags == ()


def test_two_experiments_keep_their_own_tags_on_a_shared_node(tmp_path: Path) -> None:
    shared = str(tmp_path / "lab-store")
    for name, tag in (("alice", "baseline"), ("bob", "ablation")):
        exp = dg.Experiment(tmp_path / name, state_class=State, store=shared)
        with exp.tag(tag):
            Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
        report = exp.run()
        assert len(report.executed) == (2 if name == "alice" else 0)
    alice = dg.Experiment.restore(tmp_path / "alice", store=shared)
    bob = dg.Experiment.restore(tmp_path / "bob", store=shared)
    assert [n.tags for n in alice.graph.nodes] == [frozenset({"baseline"})] * 2
    assert [n.tags for n in bob.graph.nodes] == [frozenset({"ablation"})] * 2


# -- where experiments live ----------------------------------------------------------------------


def test_store_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGGER_STORE", str(tmp_path / "env-store"))
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    exp.spawn_new_tree(dataset_name="digits", seed=0)
    exp.run()
    assert exp.store.url == f"file://{tmp_path}/env-store"
    assert not (tmp_path / "exp" / "store").exists()


def test_restore_finds_the_store_the_experiment_ran_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGGER_STORE", str(tmp_path / "lab-store"))
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    exp.run()
    monkeypatch.delenv("DAGGER_STORE")
    restored = dg.Experiment.restore(tmp_path / "exp")
    assert restored.store.url == f"file://{tmp_path}/lab-store"
    assert restored.graph.root.restore().seed == 0 and restored.graph.root.key == root.key


def test_restore_does_not_create_an_experiment(tmp_path: Path) -> None:
    with pytest.raises(ds.NotFoundError, match="no dagger experiment"):
        dg.Experiment.restore(tmp_path / "typo")
    assert not (tmp_path / "typo" / "dagger-experiment").exists()


def test_experiment_and_store_on_s3(s3_url: str, s3_storage_options: dict[str, Any]) -> None:
    for attempt in range(2):
        exp = dg.Experiment(s3_url + "/exp", state_class=State, storage_options=s3_storage_options)
        pruning_tree(exp, lrs=(0.1,))
        assert len(exp.run().executed) == (3 if attempt == 0 else 0)
    restored = dg.Experiment.restore(s3_url + "/exp", storage_options=s3_storage_options)
    assert len(restored.graph) == 3
    state = restored.graph.nodes.filter("pruned")[0].restore()
    assert state.history == ["train lr=0.1", "prune 0.5"]
    assert set(state.model) == {"w1", "w2"}  # a dict of arrays: no pickle, loads untrusted
    # The records name toy_experiment.State, but records are unsigned and this S3 store is not
    # trusted: nothing is imported on their say-so; a stand-in of that name holds the state.
    assert type(state).__name__ == "State" and type(state) is not State


def test_starting_over_after_deleting_the_folder(tmp_path: Path) -> None:
    for _ in range(2):  # a notebook: run, delete everything, run again in the same process
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
        assert len(exp.run().executed) == 2
        shutil.rmtree(tmp_path / "exp")


def test_a_remote_store_is_read_through_a_local_cache(
    tmp_path: Path,
    s3_url: str,
    s3_storage_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(tmp_path / "cache"))
    location = {"store": s3_url, "storage_options": s3_storage_options}
    # Computed elsewhere (a colleague, a cluster): nothing of it in this machine's cache.
    exp = dg.Experiment(tmp_path / "exp", state_class=State, cache_dir=False, **location)
    pruning_tree(exp, lrs=(0.1,))
    exp.run()
    restored = []
    for _ in range(2):  # the same state restored twice on this machine
        again = dg.Experiment.restore(tmp_path / "exp", **location)
        remote_reads = BlobReads(again.store.backend.origin)  # behind the local cache
        restored.append((again.graph.nodes.filter("pruned")[0].restore(), remote_reads.bytes))
    (first, downloaded), (second, downloaded_again) = restored
    np.testing.assert_array_equal(first.model["w1"], second.model["w1"])
    assert downloaded > 0 and downloaded_again == 0
    assert any((tmp_path / "cache").rglob("*"))


def test_a_folder_that_is_not_an_experiment_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ds.StoreOpenError, match="not a dagger experiment"):
        dg.Experiment(tmp_path, state_class=State)


# -- analysis ------------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = pruning_tree(exp)
    exp.run()
    return tmp_path / "exp", tree


def test_slim_restore_filters_and_sets(finished: tuple[Path, dict[str, Any]]) -> None:
    path, tree = finished
    exp = dg.Experiment.restore(path, slim=True)
    nodes = exp.graph.nodes
    assert len(nodes) == 5 and all(n.state is None for n in nodes)
    pruned, lr01 = nodes.filter("pruned"), nodes.filter("lr:0.1")
    both = pruned & lr01
    assert len(both) == 1 and both[0].key == tree["prune 0.1"].key
    assert [n.key for n in nodes.filter("lr:*", "!pruned")] == [
        tree["train 0.01"].key,
        tree["train 0.1"].key,
    ]
    assert len(pruned | lr01) == 3 and len(lr01 - pruned) == 1
    assert len(nodes.filter("nothing*")) == 0
    assert [n.key for n in nodes] == [n.key for n in dg.Experiment.restore(path).graph.nodes]
    node = both[0]
    assert node.recipe == "Prune" and node.properties == {"fraction": 0.5}
    assert node.parent is not None and node.parent.key == tree["train 0.1"].key
    assert node.parent.children == [node]
    restored = node.restore()
    assert isinstance(restored, State)
    assert restored.history == ["train lr=0.1", "prune 0.5"]
    assert restored.tags == ("lr:0.1", "pruned")


def test_filters_through_the_tag_index_match_each_node_by_glob(tmp_path: Path) -> None:
    """Filters look tags up in an index (globs matched against the distinct tags): the same
    nodes, in graph order, as matching every node's tags one by one."""
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    pruning_tree(exp, lrs=(0.01, 0.1, 0.3))
    exp.run()
    graph = dg.Experiment.restore(tmp_path / "exp").graph

    def scanned(*patterns: str) -> list[ds.NodeKey]:
        def keep(tags: frozenset[str], pattern: str) -> bool:
            hit = any(fnmatch.fnmatchcase(t, pattern.lstrip("!")) for t in tags)
            return hit != pattern.startswith("!")

        return [n.key for n in graph.nodes if all(keep(n.tags, p) for p in patterns)]

    cases = [
        ("pruned",), ("lr:0.1",), ("lr:*",), ("lr:0.[03]*",), ("?runed",), ("lr:0.1", "pruned"),
        ("!pruned",), ("lr:*", "!pruned"), ("!lr:*",), ("[",), ("lr:0.1*", "!lr:0.1"), (),
    ]  # fmt: skip
    for patterns in cases:
        assert [n.key for n in graph.nodes.filter(*patterns)] == scanned(*patterns), patterns
    assert len(graph.nodes.filter("lr:*")) == 6 and len(graph.nodes.filter("lr:0.3")) == 2
    # A filter of a filter, and set operations, stay within their operands, in graph order.
    lr = graph.nodes.filter("lr:*")
    assert [n.key for n in lr.filter("!pruned")] == scanned("lr:*", "!pruned")
    assert [n.key for n in lr - lr.filter("pruned")] == scanned("lr:*", "!pruned")
    assert list(lr.filter("pruned") | graph.nodes.filter("!lr:*")) == [
        n for n in graph.nodes if "pruned" in n.tags or not n.tags
    ]
    # A NodeSet of nodes from another Graph of the experiment holds this graph's nodes (by key).
    other = dg.Experiment.restore(tmp_path / "exp").graph.nodes.filter("pruned")
    mine = dg.NodeSet(graph, reversed(list(other)))
    assert list(mine) == list(graph.nodes.filter("pruned")) and other[0] not in mine
    assert mine[0:2].filter("lr:0.01")[0].graph is graph


def test_graph_navigation(finished: tuple[Path, dict[str, Any]]) -> None:
    path, tree = finished
    graph = dg.Experiment.restore(path).graph
    assert graph.root.key == tree["root"].key
    assert graph.node(tree["prune 0.01"].key.hex[:10]).key == tree["prune 0.01"].key
    with pytest.raises(KeyError, match="no node"):
        graph.node("zzzz")
    assert len(graph.nodes_at_distance(0)) == 1
    assert len(graph.nodes_at_distance(1)) == 2 and len(graph.nodes_at_distance(2)) == 2
    text = str(graph)
    assert text.splitlines()[0].startswith("State(dataset_name='digits', seed=0)")
    assert "└── Prune(fraction=0.5)  [lr:0.1, pruned]" in text


def test_full_restore_loads_every_state(finished: tuple[Path, dict[str, Any]]) -> None:
    path, _ = finished
    exp = dg.Experiment.restore(path, slim=False)
    assert all(isinstance(n.state, State) for n in exp.graph.nodes)


def test_draw_returns_a_digraph_and_explains_a_missing_dot(
    finished: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, tree = finished
    dot = dg.Experiment.restore(path).graph.draw()
    assert dot.source.count("->") == 4 and tree["root"].key.hex[:12] in dot.source
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot program on this PATH
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        dg.Experiment.restore(path).graph.draw(str(tmp_path / "graph.svg"))


# -- torch (zero-copy tensors; torch is never a dependency) --------------------------------------


def test_torch_tensors_and_modules_are_stored_without_pickling_their_weights(
    tmp_path: Path,
) -> None:
    torch = pytest.importorskip("torch")
    store = ds.open_store(tmp_path / "store")
    from dagger_orchestrate.codecs import load_attribute, save_attribute

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    model[2].weight = model[0].weight  # tied weights must stay one tensor
    values = {
        "tensor": torch.randn(256, 64, requires_grad=True),
        "bf16": torch.randn(100, dtype=torch.bfloat16),
        "model": model,
    }
    for name, value in values.items():
        entries, spec = save_attribute(store, name, value)
        back = load_attribute(store, entries, name, spec)
        if name == "model":
            assert spec["codec"] == "pickle" and len(spec["tensors"]) == 3  # tied: 3, not 4
            assert entries[name].size < 2000  # the pickle holds structure, not weights
            assert back[0].weight is back[2].weight
            assert isinstance(back[0].weight, torch.nn.Parameter)
            for a, b in zip(back.parameters(), model.parameters(), strict=True):
                assert torch.equal(a, b)
            x = torch.randn(3, 64)
            assert torch.equal(back(x), model(x))
        else:
            assert spec["codec"] == "torch"
            assert torch.equal(back.detach(), value.detach())
            assert back.requires_grad == value.requires_grad and back.dtype == value.dtype


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed here")
def test_draw_renders_where_dot_exists(
    finished: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = finished
    target = tmp_path / "a.dir" / "graph.svg"  # a dot in a folder name must not confuse it
    dg.Experiment.restore(path).graph.draw(str(target))
    assert target.read_text().lstrip().startswith(("<?xml", "<svg"))


class LabRemote(MemoryBackend):
    """A storage plugged in from outside the package: remote, so the experiment caches it."""

    remote = True
    opened_with: ClassVar[list[dict[str, Any]]] = []
    instances: ClassVar[dict[str, LabRemote]] = {}

    def trusted_by_location(self) -> bool:
        return False


def _open_labremote(url: str, storage_options: Mapping[str, Any]) -> LabRemote:
    LabRemote.opened_with.append(dict(storage_options))
    return LabRemote.instances.setdefault(url, LabRemote(url))


def test_an_experiment_on_a_registered_scheme(tmp_path: Path) -> None:
    ds.register_backend("labremote", _open_labremote)
    location = {"store": "labremote://lab/cache", "storage_options": {"token": "t0"}}
    cache = str(tmp_path / "c")
    exp = dg.Experiment(tmp_path / "exp", state_class=State, cache_dir=cache, **location)
    tree = pruning_tree(exp, lrs=(0.1,))
    assert len(exp.run().executed) == 3
    assert LabRemote.opened_with and all(o == {"token": "t0"} for o in LabRemote.opened_with)
    # Remote, so a local cache tier stands in front of it; the cache fills as states are read.
    assert isinstance(exp.store.backend, CachedBackend)
    assert isinstance(exp.store.backend.origin, LabRemote)
    restored = dg.Experiment.restore(tmp_path / "exp", cache_dir=cache, **location)
    state = restored.graph.node(tree["prune 0.1"].key.hex).restore()
    assert state.history == ["train lr=0.1", "prune 0.5"]
    assert any((tmp_path / "c" / "v1" / "blobs").rglob("*"))
