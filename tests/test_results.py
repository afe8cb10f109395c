"""Results are data: stored Function results, cache=True, the results table and its CLI."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
import toy_experiment as toy
from blob_reads import BlobReads
from toy_experiment import (
    Prune,
    State,
    Train,
    Verdict,
    cached_sparsity,
    sparsity,
    verdict,
    weight_stats,
)

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate.cli import main
from dagger_store.gc import collect, delete_experiment
from dagger_store.records import add_record, read_records

DAY = 24 * 3600.0


@pytest.fixture(autouse=True)
def _clear_runs() -> Iterator[None]:
    toy.RUNS.clear()
    yield


def chain(exp: dg.Experiment) -> dict[str, dg.StatePromise]:
    """root -> train -> prune -> prune, the paper's repeated pruning; Functions on the last two."""
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("lr:0.1"):
        trained = Train(nb_epochs=1, lr=0.1)(root)
        sparsity(trained)
        with exp.tag("pruned"):
            once = Prune(fraction=0.5)(trained)
            twice = Prune(fraction=0.8)(once)
            weight_stats(twice)
    return {"root": root, "trained": trained, "once": once, "twice": twice}


def node_blobs(store: ds.Store, keys: list[ds.NodeKey]) -> set[str]:
    return {d.hex for m in store.manifests(keys).values() for d in m.blobs.values()}


# -- stored results -------------------------------------------------------------------------------


def test_results_are_stored_with_their_node_and_seen_by_another_experiment_object(
    tmp_path: Path,
) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = chain(exp)
    report = exp.run()
    by_function = {r.function: r for r in report.results}
    stored = by_function["weight_stats"]
    assert stored.result_key is not None and not stored.cached
    manifest = exp.store.get_manifest(stored.result_key)
    assert manifest.meta["result"] == {
        **weight_stats.identity,
        "name": "weight_stats",
        "node": tree["twice"].key.hex,
    }
    assert manifest.meta["value"]["codec"] == "tree"  # numpy values inside: still no pickle
    provenance = manifest.meta["provenance"]
    assert provenance["host"] == socket.gethostname() and provenance["seconds"] > 0
    assert time.time() - 60 < provenance["finished"] <= time.time()

    # A second Experiment object on the folder: the values, from the store, not from memory.
    again = dg.Experiment.restore(tmp_path / "exp")
    value = again.load_result(weight_stats, tree["twice"])
    assert value.keys() == {"zeros", "mean", "first", "epochs"}
    assert type(value["zeros"]) is np.int64 and type(value["mean"]) is np.float32
    assert value["mean"] == stored.value["mean"] and value["epochs"] == 3
    np.testing.assert_array_equal(value["first"], stored.value["first"])
    assert again.load_result("sparsity", tree["trained"].key.hex[:10]) == 0.0
    with pytest.raises(KeyError, match="no stored result of sparsity on node"):
        again.load_result(sparsity, tree["root"])

    # The run record: per result its key and tabular value, per computed node its timing; the
    # result keys are the record's keys, so garbage collection keeps them.
    (record,) = read_records(exp.store, exp.name, "run")
    entries = {e["function"]: e for e in record["results"]}
    entry = entries["weight_stats"]
    tabular = entry.pop("value")
    assert entry == {
        "function": "weight_stats",
        "node": tree["twice"].key.hex,
        "result": stored.result_key.hex,
        "seconds": stored.seconds,
        "cached": False,
    }
    first = tabular.pop("first")  # an array: its short repr
    assert tabular == {"zeros": int(stored.value["zeros"]), "mean": float(stored.value["mean"]),
                       "epochs": 3}  # fmt: skip
    assert isinstance(first, str) and first.startswith("array([")
    assert sorted(record["keys"]) == sorted(r.result_key.hex for r in report.results)
    assert {e["node"] for e in record["computed"]} == {p.key.hex for p in tree.values()}
    assert all(e["seconds"] > 0 and e["finished"] <= time.time() for e in record["computed"])
    later = time.time() + 30 * DAY
    assert collect(exp.store, now=later, dry_run=False).manifests == ()
    assert again.load_result(weight_stats, tree["twice"])["epochs"] == 3
    delete_experiment(exp.store, exp.name)
    gone = collect(exp.store, now=later, dry_run=False).manifests
    assert {r.result_key for r in report.results} <= set(gone)


def test_functions_without_cache_run_every_time_and_the_table_shows_the_latest(
    tmp_path: Path,
) -> None:
    calls: list[int] = []

    @dg.Function
    def attempt(state: State) -> int:
        calls.append(1)
        return len(calls)

    for expected in (1, 2):
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        call = attempt(exp.spawn_new_tree(dataset_name="digits", seed=0))
        (result,) = exp.run().results
        assert call.result == result.value == expected and not result.cached
    assert len(calls) == 2
    assert exp.results()[attempt.name].tolist() == [2]  # the latest run's value
    assert exp.load_result(attempt, call.promise) == 1  # the store keeps the first, write-once


def test_cache_true_reuses_the_stored_result_without_loading_state(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    trained = Train(nb_epochs=1, lr=0.1)(root)
    pruned = Prune(fraction=0.5)(trained)
    for promise in (root, trained, pruned):
        cached_sparsity(promise)
    first = exp.run()
    assert toy.RUNS.count("cached_sparsity") == 3 and not any(r.cached for r in first.results)

    toy.RUNS.clear()
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    trained = Train(nb_epochs=1, lr=0.1)(root)
    pruned = Prune(fraction=0.5)(trained)
    calls = [cached_sparsity(p) for p in (root, trained, pruned)]
    reads = BlobReads(exp.store.backend)
    report = exp.run()
    assert toy.RUNS == []  # neither recipes nor the Function body ran
    assert [r.cached for r in report.results] == [True] * 3
    assert [c.result for c in calls] == [r.value for r in first.results]
    assert [r.seconds for r in report.results] == pytest.approx(
        [r.seconds for r in first.results], abs=1e-5
    )  # the stored evaluation's seconds
    assert reads.bytes < 1_000_000
    assert reads.hexes.isdisjoint(node_blobs(exp.store, [root.key, trained.key, pruned.key]))
    assert "3 function results (3 reused)" in str(report)

    # An ordinary Function next to it still runs, and loads the state it inspects.
    sparsity(pruned)
    report = exp.run()
    assert [r.cached for r in report.results] == [True, True, True, False]
    assert toy.RUNS == [] and reads.hexes & node_blobs(exp.store, [pruned.key])


def test_a_collaborators_results_are_reused_from_another_process(tmp_path: Path) -> None:
    lab, log = str(tmp_path / "lab"), tmp_path / "log"
    script = textwrap.dedent(
        """
        import sys
        import dagger_orchestrate as dg
        from toy_experiment import Prune, State, Train, cached_sparsity
        exp = dg.Experiment(sys.argv[1], state_class=State, store=sys.argv[2])
        trained = Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
        cached_sparsity(trained)
        cached_sparsity(Prune(fraction=0.5)(trained))
        print(*[r.value for r in exp.run().results])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "theirs"), lab],
        env={**os.environ, "DAGGER_TEST_LOG": str(log)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    theirs = [float(v) for v in done.stdout.split()]
    assert log.read_text().splitlines().count("cached_sparsity") == 2

    mine = dg.Experiment(tmp_path / "mine", state_class=State, store=lab)
    trained = Train(nb_epochs=1, lr=0.1)(mine.spawn_new_tree(dataset_name="digits", seed=0))
    pruned = Prune(fraction=0.5)(trained)
    calls = [cached_sparsity(trained), cached_sparsity(pruned)]
    reads = BlobReads(mine.store.backend)
    report = mine.run()
    assert [c.result for c in calls] == theirs and all(r.cached for r in report.results)
    assert toy.RUNS == [] and reads.bytes < 1_000_000
    assert mine.load_result(cached_sparsity, pruned) == theirs[1]
    # Their experiment, opened here: its table shows what their run computed.
    table = dg.Experiment.restore(tmp_path / "theirs").results()
    assert table["cached_sparsity"].tolist()[1:] == theirs


def test_a_source_change_or_version_bump_invalidates_a_cached_result(tmp_path: Path) -> None:
    def evals(folder: str, body: str) -> ModuleType:
        path = tmp_path / folder / "evals_under_test.py"
        path.parent.mkdir()
        path.write_text(
            "import dagger_orchestrate as dg\n"
            "CALLS = []\n\n"
            "@dg.Function(cache=True)\n"
            "def score(state):\n"
            "    CALLS.append(state.key)\n"
            f"    {body}\n"
        )
        spec = importlib.util.spec_from_file_location("evals_under_test", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def run(function: dg.Function) -> dg.FunctionResult:
        exp = dg.Experiment(tmp_path / "exp", state_class=State)
        function(exp.spawn_new_tree(dataset_name="digits", seed=0))
        (result,) = exp.run().results
        return result

    first = evals("v1", "return 1")
    assert run(first.score).value == 1 and len(first.CALLS) == 1
    same = evals("copy", "return 1")  # other objects, same name and source: the same identity
    assert run(same.score).cached and same.CALLS == []
    edited = evals("v2", "return 2  # edited")
    assert edited.score.identity["source"] != first.score.identity["source"]
    result = run(edited.score)
    assert (result.value, result.cached, len(edited.CALLS)) == (2, False, 1)
    bumped = dg.Function(cache=True, version=2)(edited.score.fn)
    result = run(bumped)
    assert (result.value, result.cached, len(edited.CALLS)) == (2, False, 2)
    assert run(bumped).cached and len(edited.CALLS) == 2


def test_plain_and_numpy_results_load_from_an_untrusted_store_objects_do_not(
    tmp_path: Path,
) -> None:
    @dg.Function
    def scores(state: State) -> np.ndarray[Any, Any]:
        return np.arange(4, dtype=np.int16)

    @dg.Function(cache=True)
    def cached_verdict(state: State) -> Verdict:
        toy.RUNS.append("cached_verdict")
        return Verdict("cached")

    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = chain(exp)
    for function in (scores, verdict, cached_verdict):
        function(tree["twice"])
    report = exp.run()
    expected = {r.function: r.value for r in report.results}
    codecs = {
        r.function.rpartition(".")[2]: exp.store.get_manifest(r.result_key).meta["value"]["codec"]
        for r in report.results
        if r.result_key is not None
    }
    assert codecs == {
        "sparsity": "msgpack",
        "weight_stats": "tree",
        "scores": "ndarray",
        "verdict": "pickle",
        "cached_verdict": "pickle",
    }

    untrusted = dg.Experiment.restore(tmp_path / "exp", trust=False)
    assert not untrusted.store.trusted
    assert untrusted.load_result(sparsity, tree["trained"]) == expected["sparsity"]
    stats = untrusted.load_result(weight_stats, tree["twice"])
    assert type(stats["mean"]) is np.float32 and stats["mean"] == expected["weight_stats"]["mean"]
    array = untrusted.load_result(scores, tree["twice"])
    assert array.dtype == np.int16 and array.tolist() == [0, 1, 2, 3]
    with pytest.raises(ds.UntrustedError, match="'value'"):
        untrusted.load_result(verdict, tree["twice"])
    assert untrusted.results()["verdict"].iloc[-1].startswith("<toy_experiment.Verdict")

    # A cached result this store cannot vouch for is not reused: the Function runs again.
    toy.RUNS.clear()
    again = dg.Experiment(tmp_path / "exp", state_class=State, trust=False)
    cached_verdict(Prune(fraction=0.5)(Train(nb_epochs=1, lr=0.1)(
        again.spawn_new_tree(dataset_name="digits", seed=0)
    )))  # fmt: skip
    (result,) = again.run().results
    assert result.value.text == "cached" and not result.cached and toy.RUNS == ["cached_verdict"]


def test_a_result_that_cannot_be_stored_is_an_error_naming_function_and_node(
    tmp_path: Path,
) -> None:
    @dg.Function
    def lazy(state: State) -> Any:
        return (step for step in state.history)  # a generator: neither plain nor picklable

    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    trained = Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    lazy(trained)
    with pytest.raises(dg.RunError) as caught:
        exp.run()
    message = str(caught.value)
    for part in ("lazy", trained.key.hex[:12], "generator", "cannot be stored", "plain data"):
        assert part in message
    assert caught.value.report.executed  # the nodes were computed and committed regardless


def test_function_options_and_their_mistakes() -> None:
    def fn(state: State) -> int:
        return 1

    options = dg.Function(cache=True, version="b")
    first, second = options(fn), options(sparsity.fn)  # the options object stays reusable
    assert (first.cache, first.version, second.name) == (True, "b", "sparsity")
    assert first.name == "test_function_options_and_their_mistakes.<locals>.fn"  # __qualname__
    assert first.identity["function"] == (
        "test_results.test_function_options_and_their_mistakes.<locals>.fn"
    )
    assert dg.Function(fn).cache is False and dg.Function(fn).version is None
    with pytest.raises(TypeError, match="int or str"):
        dg.Function(version=[1])
    with pytest.raises(TypeError, match="True or False"):
        dg.Function(fn, cache="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wraps no function yet"):
        _ = options.fn


# -- the results table ----------------------------------------------------------------------------


def test_the_table_numbers_repeated_recipes_and_spreads_dict_results(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = chain(exp)
    report = exp.run()
    table = dg.Experiment.restore(tmp_path / "exp").results()
    assert list(table.columns) == [
        "key", "label", "recipe", "depth", "tags",
        "State.dataset_name", "State.seed", "Train.lr", "Train.nb_epochs",
        "Prune.fraction", "Prune#2.fraction",
        "sparsity",
        "weight_stats.zeros", "weight_stats.mean", "weight_stats.first", "weight_stats.epochs",
        "seconds", "created",
    ]  # fmt: skip
    assert table["key"].tolist() == [
        tree[n].key.hex[:12] for n in ("root", "trained", "once", "twice")
    ]
    assert table["label"].tolist()[2:] == ["Prune(fraction=0.5)", "Prune(fraction=0.8)"]
    assert table["recipe"].tolist() == [None, "Train", "Prune", "Prune"]
    assert table["depth"].tolist() == [0, 1, 2, 3]
    assert table["tags"].tolist() == ["", "lr:0.1", "lr:0.1, pruned", "lr:0.1, pruned"]
    assert table["State.seed"].tolist() == [0, 0, 0, 0]
    assert table["Train.lr"].tolist()[1:] == [0.1, 0.1, 0.1] and math.isnan(table["Train.lr"][0])
    assert table["Prune.fraction"].tolist()[2:] == [0.5, 0.5]
    assert table["Prune#2.fraction"].isna().tolist() == [True, True, True, False]
    assert table["Prune#2.fraction"][3] == 0.8
    assert table["sparsity"].tolist()[1] == 0.0 and table["sparsity"].isna().sum() == 3
    stats = next(r.value for r in report.results if r.function == "weight_stats")
    assert table["weight_stats.zeros"][3] == stats["zeros"]
    assert table["weight_stats.mean"][3] == pytest.approx(float(stats["mean"]))
    assert table["weight_stats.first"][3].startswith("array([")
    assert (table["seconds"] > 0).all() and str(table["created"].dt.tz) == "UTC"
    assert (table["created"] <= pd.Timestamp.now(tz="UTC")).all()

    with_provenance = exp.results(provenance=True)
    assert list(with_provenance.columns[: len(table.columns)]) == list(table.columns)
    added = list(with_provenance.columns[len(table.columns) :])
    assert {"provenance.host", "provenance.seconds", "provenance.finished"} <= set(added)
    assert all(c.startswith("provenance.") for c in added)
    assert (with_provenance["provenance.host"] == socket.gethostname()).all()


def test_nodeset_results_are_the_rows_of_its_nodes(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = chain(exp)
    exp.run()
    graph = dg.Experiment.restore(tmp_path / "exp").graph
    pruned = graph.nodes.filter("pruned").results()
    assert pruned["key"].tolist() == [tree[n].key.hex[:12] for n in ("once", "twice")]
    assert pruned["Train.lr"].tolist() == [0.1, 0.1]  # ancestors outside the set still count
    assert "sparsity" not in pruned.columns  # no Function ran on these rows
    assert graph.nodes.filter("!pruned").results()["depth"].tolist() == [0, 1]
    assert list(graph.nodes[:0].results().columns) == [
        "key", "label", "recipe", "depth", "tags", "seconds", "created"
    ]  # fmt: skip


def test_the_table_of_a_wide_tree_comes_from_records_alone(tmp_path: Path) -> None:
    # Its speed is a benchmark's (benchmarks/bench_results.py), not a timed test's.
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    nodes = [Prune(fraction=i / 2000)(root) for i in range(2000)]
    exp._record_definition()  # defined, not run: records are all the table reads
    results = [
        {"function": "sparsity", "node": n.key.hex, "result": n.key.hex, "value": i, "seconds": 0.1}
        for i, n in enumerate(nodes)
    ]
    add_record(exp.store, exp.name, "run", [], {"results": results, "computed": []})
    table = dg.Experiment.restore(tmp_path / "exp").results()
    assert len(table) == 2001 and table["sparsity"].tolist()[1:] == list(range(2000))


# -- dagger-lab results ---------------------------------------------------------------------------


def test_the_cli_prints_the_table_as_text_csv_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    tree = chain(exp)
    report = exp.run()
    mean = float(next(r.value for r in report.results if r.function == "weight_stats")["mean"])
    store = exp.store.url

    def cli(*argv: str) -> str:
        code = main(["--store", store, "results", *argv])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), argv
        return out

    header, rule, *rows = cli(exp.name).splitlines()
    assert header.split() == list(exp.results().columns)
    assert set(rule.replace(" ", "")) == {"-"} and len(rows) == 4
    assert rows[0].startswith(tree["root"].key.hex[:12])
    twice = rows[3].split()
    assert "Prune(fraction=0.8)" in rows[3] and f"{mean:.4g}" in twice and "0.8" in twice
    assert repr(mean) not in rows[3]  # 4 significant digits, not all of them
    assert " - " in rows[0] and "nan" not in rows[0]  # a missing value reads as "-"

    parsed = list(csv.DictReader(io.StringIO(cli(exp.name, "--format", "csv"))))
    assert [r["key"] for r in parsed] == [p.key.hex[:12] for p in tree.values()]
    assert parsed[3]["Prune#2.fraction"] == "0.8" and parsed[0]["Train.lr"] == ""

    records = json.loads(cli(str(tmp_path / "exp"), "--format", "json", "--filter", "pruned"))
    assert [r["key"] for r in records] == [tree[n].key.hex[:12] for n in ("once", "twice")]
    assert records[1]["weight_stats.mean"] == pytest.approx(mean, rel=1e-6)
    assert records[0]["weight_stats.mean"] is None
    assert records[0]["created"].startswith(time.strftime("%Y-", time.gmtime()))

    negated = cli(exp.name, "--filter", "lr:*", "--filter", "!pruned").splitlines()
    assert len(negated) == 3 and negated[2].startswith(tree["trained"].key.hex[:12])
    assert cli(exp.name, "--filter", "nothing").strip() == f"no nodes in {exp.name} match nothing"
    code = main(["--store", store, "results", "no-such-experiment"])
    assert code == 3 and "no experiment 'no-such-experiment'" in capsys.readouterr().err
