"""No dead ends: lost blobs are repaired by recomputing, and nodes are recomputed on demand.

A node's manifest has generations (``dagger_store/store.py``): a commit that finds the newest
one incomplete, or that was told to supersede it, writes the next one, create-if-absent.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import toy_experiment as toy
from toy_experiment import State, Train

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate.cli import main
from dagger_store.backends.base import check_key
from dagger_store.gc import DAY, collect
from dagger_store.layout import (
    blob_key,
    manifest_generation,
    manifest_generation_key,
    manifest_key,
    manifest_node,
)


class Noisy(dg.Recipe):
    """A nondeterministic recipe (as GPU training is): every run stores other bytes."""

    PROPERTIES = ["scale"]

    def run(self, state: State) -> State:
        noise = np.frombuffer(os.urandom(4096), dtype=np.uint8)
        state.noise = noise.astype(np.float32) * self.scale  # type: ignore[attr-defined]
        toy.RUNS.append(f"noisy {self.scale}")
        return state


@pytest.fixture(autouse=True)
def _clear_runs() -> Iterator[None]:
    toy.RUNS.clear()
    yield


def noisy_tree(exp: dg.Experiment) -> dict[str, Any]:
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("noisy"):
        noisy = Noisy(scale=1.0)(root)
        with exp.tag("lr:0.1"):
            trained = Train(nb_epochs=1, lr=0.1)(noisy)
    with exp.tag("lr:0.01"):
        other = Train(nb_epochs=1, lr=0.01)(root)
    return {"root": root, "noisy": noisy, "trained": trained, "other": other}


def ran_noisy_tree(tmp_path: Path) -> tuple[Path, dg.Experiment, dict[str, Any]]:
    """The noisy tree run in an experiment whose store is the folder returned first, so that
    tests can lose or flip its blobs by hand."""
    store_dir = tmp_path / "lab"
    exp = dg.Experiment(tmp_path / "exp", state_class=State, store=str(store_dir))
    nodes = noisy_tree(exp)
    exp.run()
    return store_dir, exp, nodes


def own_blob(store: ds.Store, key: ds.NodeKey, parent: ds.NodeKey) -> ds.Digest:
    """A blob the node's manifest names and its parent's does not (the noise)."""
    inherited = set(store.get_manifest(parent).blobs.values())
    (digest,) = [d for d in store.get_manifest(key).blobs.values() if d not in inherited]
    return digest


def lose(root: Path, digest: ds.Digest) -> None:
    """A colleague's rm: objects are read-only files, so make it writable first."""
    path = root / blob_key(digest)
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    path.unlink()


def test_generation_names_are_parsed_back_to_their_node() -> None:
    key = ds.node_key("state", {"x": 1})
    assert manifest_generation_key(key, 0) == manifest_key(key)  # generation 0: unchanged
    assert manifest_generation_key(key, 3) == f"v1/manifests/{key.hex[:2]}/{key.hex}.3"
    for generation in (0, 1, 12):
        path = manifest_generation_key(key, generation)
        assert check_key(path) == path
        assert manifest_node(path) == key and manifest_generation(path) == generation
    for bad in (f"{key.hex}.0", f"{key.hex}.01", f"{key.hex}.x", f"{key.hex}."):
        assert manifest_node(f"v1/manifests/ab/{bad}") is None


def test_lost_blob_of_a_nondeterministic_node_is_recomputed_as_generation_1(
    tmp_path: Path,
) -> None:
    store_dir, exp, nodes = ran_noisy_tree(tmp_path)
    noisy, root, trained = nodes["noisy"].key, nodes["root"].key, nodes["trained"].key
    first = exp.store.get_manifest(noisy)
    gone = own_blob(exp.store, noisy, root)
    lose(store_dir, gone)
    # The child inherited the noise: its manifest names the lost blob too.
    assert exp.store.missing([n.key for n in nodes.values()]) == [noisy, trained]
    assert exp.store.incomplete() == {noisy: (str(gone),), trained: (str(gone),)}

    toy.RUNS.clear()
    report = exp.run()
    assert report.executed == (noisy, trained)
    assert toy.RUNS == ["noisy 1.0", "train 0.1"]
    assert exp.store.generations([noisy, trained, root]) == {noisy: 1, trained: 1, root: 0}
    assert (store_dir / manifest_generation_key(noisy, 1)).is_file()
    assert exp.store.get_manifest(noisy) != first  # other random bytes: a new manifest
    assert exp.store.incomplete() == {}

    toy.RUNS.clear()
    again = exp.run()
    assert again.executed == () and toy.RUNS == []
    assert noisy in again.cached


def test_concurrent_repairers_agree_on_one_winner(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "lab")
    key = ds.node_key("state", {"node": "repaired"})
    lost = store.put(os.urandom(1000))
    store.commit(key, ds.Manifest({"weights": lost}))
    lose(tmp_path / "lab", lost)
    with pytest.raises(ds.IncompleteManifestError, match="repair=True"):
        store.commit(key, ds.Manifest({"weights": store.put(b"x")}))  # not asked to repair

    repairers = 8
    barrier = threading.Barrier(repairers)
    commits: list[Any] = [None] * repairers

    def repair(i: int) -> None:
        manifest = ds.Manifest({"weights": store.put(os.urandom(1000))}, {"by": i})
        barrier.wait()
        commits[i] = store.commit(key, manifest, repair=True)

    threads = [threading.Thread(target=repair, args=(i,)) for i in range(repairers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in commits if c.won]
    assert len(winners) == 1
    assert {c.generation for c in commits} == {1}
    assert all(c.manifest == winners[0].manifest for c in commits)
    assert store.get_manifest(key) == winners[0].manifest
    assert store.generations([key]) == {key: 1}


def test_commit_replaces_a_complete_generation_once(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "lab")
    key = ds.node_key("state", {"node": "recomputed"})
    old = ds.Manifest({"w": store.put(b"buggy")})
    assert store.commit(key, old).generation == 0
    assert not store.commit(key, ds.Manifest({"w": store.put(b"again")})).won  # write-once
    fixed = ds.Manifest({"w": store.put(b"fixed")})
    won = store.commit(key, fixed, replaces=0)
    assert won.won and won.generation == 1
    late = store.commit(key, ds.Manifest({"w": store.put(b"late")}), replaces=0)
    assert not late.won and late.manifest == fixed and late.generation == 1
    assert store.manifests([key]) == {key: fixed} and store.get_manifest(key) == fixed


def test_recompute_by_promise_with_and_without_descendants(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    nodes = noisy_tree(exp)
    exp.run()
    noisy, trained = nodes["noisy"].key, nodes["trained"].key
    before = nodes["noisy"].key
    old = exp.store.get_manifest(noisy)

    toy.RUNS.clear()
    report = exp.run(recompute=nodes["noisy"])
    assert set(report.executed) == {noisy, trained}
    assert noisy not in report.cached and nodes["root"].key in report.cached
    assert toy.RUNS == ["noisy 1.0", "train 0.1"]
    assert exp.store.generations([noisy, trained]) == {noisy: 1, trained: 1}
    assert exp.store.get_manifest(noisy) != old and before == noisy

    toy.RUNS.clear()
    report = exp.run(recompute=[noisy], recompute_descendants=False)
    assert report.executed == (noisy,)
    assert exp.store.generations([noisy, trained]) == {noisy: 2, trained: 1}

    toy.RUNS.clear()
    assert exp.run().executed == ()  # the newest generations are hits


@dg.Function(cache=True)
def noise_sum(state: State) -> float:
    return float(state.noise.sum())  # type: ignore[attr-defined]


@dg.Function
def noise_mean(state: State) -> float:
    return float(state.noise.mean())  # type: ignore[attr-defined]


def test_recompute_supersedes_the_stored_results_of_the_node(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    nodes = noisy_tree(exp)
    noise_sum(nodes["noisy"])
    noise_mean(nodes["trained"])
    first = {r.function: r.value for r in exp.run().results}
    assert exp.run().results[0].cached  # the cache=True result is reused while nothing changes

    report = exp.run(recompute=nodes["noisy"])
    again = {r.function: r for r in report.results}
    assert not again["noise_sum"].cached and again["noise_sum"].value != first["noise_sum"]
    assert again["noise_mean"].value != first["noise_mean"]  # on a descendant, recomputed too
    stored = exp.store.generations(r.result_key for r in report.results)
    assert sorted(stored.values()) == [1, 1]
    restored = dg.Experiment.restore(tmp_path / "exp", state_class=State)
    for result in report.results:
        assert restored.load_result(result.function, result.key) == result.value
    assert exp.run().results[0].value == again["noise_sum"].value  # the new one is reused


def test_recompute_by_tag_pattern_and_graph_nodes(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    nodes = noisy_tree(exp)
    exp.run()
    toy.RUNS.clear()
    report = exp.run(recompute="lr:*")
    assert set(report.executed) == {nodes["trained"].key, nodes["other"].key}
    assert sorted(toy.RUNS) == ["train 0.01", "train 0.1"]

    toy.RUNS.clear()
    picked = exp.graph.nodes.filter("noisy", "!lr:*")  # the Noisy node only
    report = exp.run(recompute=picked, recompute_descendants=False)
    assert report.executed == (nodes["noisy"].key,)

    with pytest.raises(ValueError, match="no node of this experiment has a tag matching"):
        exp.run(recompute="nothing:*")
    with pytest.raises(TypeError, match="recompute takes"):
        exp.run(recompute=[3.5])


def test_repair_dry_run_tells_what_is_lost_and_what_a_rerun_recomputes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir, exp, nodes = ran_noisy_tree(tmp_path)
    noisy, root, trained = nodes["noisy"].key, nodes["root"].key, nodes["trained"].key
    gone = own_blob(exp.store, noisy, root)
    lose(store_dir, gone)
    other = nodes["other"].key  # and a bit flips in a blob only Train(lr=0.01) names
    inherited = set(exp.store.get_manifest(root).blobs.values())
    flipped = sorted(d.hex for d in exp.store.get_manifest(other).blobs.values()
                     if d not in inherited)[0]  # fmt: skip
    path = store_dir / f"v1/blobs/{flipped[:2]}/{flipped}"
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))

    code = main(["--store", str(store_dir), "repair", "--dry-run", exp.name])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert (
        lines[0]
        == f"experiment {exp.name} in {exp.store.url}: 2 incomplete manifests, 1 corrupt objects"
    )
    assert f"  node {noisy.hex[:12]}  in {exp.name} (Noisy(scale=1.0))" in lines
    assert f"    missing blob {gone}" in lines
    assert "a re-run would recompute:" in lines
    assert f"  experiment {exp.name}: 2 node(s)" in lines
    assert f"    {noisy.hex[:12]}  Noisy(scale=1.0)" in lines
    assert f"    {trained.hex[:12]}  Train(lr=0.1, nb_epochs=1)" in lines
    assert "descendant(s)" not in out  # every descendant of Noisy is incomplete too
    assert any(line.startswith(f"  blob v1/blobs/{flipped[:2]}/{flipped}: ") for line in lines)
    assert f"    named by node {other.hex[:12]} Train(lr=0.01, nb_epochs=1) ({exp.name})" in lines
    assert "to repair" not in out  # a dry run only lists

    code = main(["--store", str(store_dir), "repair"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"run experiment {exp.name} again" in out
    assert f"nodes {noisy.hex[:12]}, {trained.hex[:12]} will be recomputed" in out
    assert "dagger-lab does not run your recipes" in out

    exp.run()
    code = main(["--store", str(store_dir), "repair"])
    out = capsys.readouterr().out
    assert code == 1 and ": 0 incomplete manifests, 1 corrupt objects" in out
    assert "a re-run would recompute" not in out and "delete each object listed" in out


def test_repair_says_how_to_recompute_the_complete_descendants_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    trained = Train(nb_epochs=1, lr=0.1)(root)
    pruned = toy.Prune(fraction=0.5)(trained)
    exp.run()
    replaced = set(exp.store.get_manifest(root.key).blobs.values()) - set(
        exp.store.get_manifest(trained.key).blobs.values()
    )
    assert replaced  # Train rewrote the model: the root's model blobs are its own
    for digest in replaced:
        lose(tmp_path / "exp" / "store", digest)

    assert main(["repair", "--dry-run", str(tmp_path / "exp")]) == 1
    lines = capsys.readouterr().out.splitlines()
    advice = lines.index(
        "    their 2 descendant(s) are complete and stay cached (they were computed from the "
        "lost state); to recompute them as well, in the script (descendants are included):"
    )
    code = lines[advice + 1].strip()
    assert code.startswith("exp.run(recompute=[dagger_store.NodeKey(h) for h in [")
    report = eval(code, {"exp": exp, "dagger_store": ds})  # what a user pastes into the script
    assert set(report.executed) == {root.key, trained.key, pruned.key}
    assert exp.store.missing([root.key, trained.key, pruned.key]) == []


def test_gc_keeps_the_new_generation_and_collects_the_superseded_blobs(tmp_path: Path) -> None:
    _, exp, nodes = ran_noisy_tree(tmp_path)
    noisy, root = nodes["noisy"].key, nodes["root"].key
    old = own_blob(exp.store, noisy, root)
    # With its descendant: without, the child (which inherited the noise) still names it.
    assert len(exp.run(recompute=nodes["noisy"]).executed) == 2
    new = own_blob(exp.store, noisy, root)
    assert new != old

    # Within the grace period the superseded blob stays.
    assert blob_key(old) not in collect(exp.store, dry_run=False).blobs
    assert exp.store.has_blobs([old, new]) == [True, True]
    # After it, only what the newest generation names is kept.
    report = collect(exp.store, dry_run=False, now=time.time() + 2 * DAY)
    assert report.ok and blob_key(old) in report.blobs and blob_key(new) not in report.blobs
    assert exp.store.has_blobs([old, new]) == [False, True]
    keys = [n.key for n in nodes.values()]
    assert exp.store.missing(keys) == []
    assert exp.run().executed == ()


def test_gc_takes_a_nodes_generations_together(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    key = ds.node_key("state", {"unreferenced": True})
    store.commit(key, ds.Manifest({"w": store.put(b"first")}))
    old = tmp_path / "store" / manifest_key(key)
    os.utime(old, (0, time.time() - 30 * DAY))  # generation 0 is old, generation 1 is new
    fixed = ds.Manifest({"w": store.put(b"recomputed")})
    assert store.commit(key, fixed, replaces=0).generation == 1

    kept = collect(store, dry_run=False)  # a recent generation keeps the whole node
    assert kept.manifests == () and store.generations([key]) == {key: 1}
    assert store.get_manifest(key) == fixed

    report = collect(store, dry_run=False, now=time.time() + 30 * DAY)
    assert sorted(report.manifests) == [key, key] and store.generations([key]) == {}
    assert store.commit(key, ds.Manifest({"w": store.put(b"again")})).generation == 0


def test_lost_blob_is_repaired_on_s3(
    s3_url: str, s3_storage_options: dict[str, Any], s3_client: Any
) -> None:
    exp = dg.Experiment(s3_url + "/exp", state_class=State, storage_options=s3_storage_options)
    nodes = noisy_tree(exp)
    exp.run()
    noisy, root = nodes["noisy"].key, nodes["root"].key
    gone = own_blob(exp.store, noisy, root)
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    found = [
        o["Key"]
        for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]
        if o["Key"].endswith(blob_key(gone))
    ]
    assert len(found) == 1 and found[0].startswith(prefix)
    s3_client.delete_object(Bucket=bucket, Key=found[0])  # an S3 lifecycle rule
    assert exp.store.missing([noisy]) == [noisy]

    assert set(exp.run().executed) == {noisy, nodes["trained"].key}
    assert exp.store.generations([noisy]) == {noisy: 1}
    assert exp.run().executed == ()
    again = dg.Experiment(s3_url + "/exp", state_class=State, storage_options=s3_storage_options)
    noisy_tree(again)
    assert again.run().executed == ()


def test_every_generation_is_signed_and_checked(tmp_path: Path) -> None:
    lab_key = "lab-key-" + "0123456789" * 4
    store = ds.open_store(tmp_path / "lab", lab_key=lab_key, require_signatures=True)
    key = ds.node_key("state", {"node": "signed"})
    lost = store.put(os.urandom(100))
    store.commit(key, ds.Manifest({"w": lost}))
    lose(tmp_path / "lab", lost)
    repaired = ds.Manifest({"w": store.put(b"repaired")})
    assert store.commit(key, repaired, repair=True).generation == 1
    assert store.get_manifest(key) == repaired  # its signature checked against the node key
    # A generation planted without the key is refused, never a hit: neither it nor an older one.
    planted = ds.Manifest({"w": store.put(b"planted")})
    assert store.backend.write_once(manifest_generation_key(key, 2), planted.encode())
    with pytest.raises(ds.UntrustedError):
        store.get_manifest(key)
    assert store.manifests([key]) == {}
    with pytest.raises(ds.UntrustedError):
        store.commit(key, repaired)  # a plain commit does not supersede it
    # A repairing commit does: readers with the key refuse the planted one anyway.
    fixed = store.commit(key, repaired, repair=True)
    assert fixed.won and fixed.generation == 3 and store.get_manifest(key) == repaired
