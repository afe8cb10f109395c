"""Experiment folders move: mv, cp -r and another mount point keep an experiment whole, and
reading one never creates anything (issue 9)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from toy_experiment import Prune, State, Train

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate.cli import main


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DAGGER_STORE", raising=False)


def define(exp: dg.Experiment) -> dict[str, dg.StatePromise]:
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("lr:0.1"):
        trained = Train(nb_epochs=1, lr=0.1)(root)
        with exp.tag("pruned"):
            pruned = Prune(fraction=0.5)(trained)
    return {"root": root, "trained": trained, "pruned": pruned}


def ran(path: Path) -> dict[str, dg.StatePromise]:
    exp = dg.Experiment(path, state_class=State)
    nodes = define(exp)
    assert len(exp.run().executed) == 3
    return nodes


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime in ns)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def symlinked(source: Path, target: Path) -> None:
    """Another mount point of the same folder, as far as paths go."""
    os.symlink(source, target)


def set_old_marker(folder: Path) -> None:
    """Rewrite the marker as the previous version wrote it: the store's absolute path."""
    marker = folder / "dagger-experiment"
    document = json.loads(marker.read_text())
    document.update(version=1, store=str(folder / "store"))
    marker.chmod(0o644)
    marker.write_text(json.dumps(document, indent=1))


def test_the_embedded_store_is_named_relative_to_its_folder(tmp_path: Path) -> None:
    dg.Experiment(tmp_path / "exp", state_class=State)
    marker = json.loads((tmp_path / "exp" / "dagger-experiment").read_text())
    assert marker["store"] == "store" and marker["version"] == 2
    dg.Experiment(tmp_path / "shared-exp", state_class=State, store=str(tmp_path / "lab"))
    marker = json.loads((tmp_path / "shared-exp" / "dagger-experiment").read_text())
    assert marker["store"] == str(tmp_path / "lab") and marker["version"] == 1
    # The embedded store passed explicitly is still the embedded store.
    dg.Experiment(tmp_path / "explicit", state_class=State, store=str(tmp_path / "explicit/store"))
    assert json.loads((tmp_path / "explicit" / "dagger-experiment").read_text())["store"] == "store"


@pytest.mark.parametrize(
    "relocate", [shutil.move, shutil.copytree, symlinked], ids=["mv", "cp -r", "mount point"]
)
def test_a_relocated_folder_keeps_its_experiment(
    tmp_path: Path, relocate: Callable[[Path, Path], Any]
) -> None:
    nodes = ran(tmp_path / "exp_processes")
    before = (
        dg.Experiment.restore(tmp_path / "exp_processes") if relocate is not shutil.move else None
    )
    relocate(tmp_path / "exp_processes", tmp_path / "exp_moved")
    restored = dg.Experiment.restore(tmp_path / "exp_moved")
    assert restored.store.url == f"file://{tmp_path}/exp_moved/store"
    assert [n.key for n in restored.graph.nodes] == [p.key for p in nodes.values()]
    assert restored.graph.nodes.filter("pruned")[0].tags == frozenset({"lr:0.1", "pruned"})
    assert restored.graph.node(nodes["pruned"].key).restore().history == [
        "train lr=0.1",
        "prune 0.5",
    ]
    if before is not None:  # the original is still there, untouched, with the same graph
        assert [n.key for n in before.graph.nodes] == [n.key for n in restored.graph.nodes]
    exp = dg.Experiment(tmp_path / "exp_moved", state_class=State)
    define(exp)
    report = exp.run()
    assert report.executed == () and len(report.cached) == 3
    if relocate is shutil.move:
        assert not (tmp_path / "exp_processes").exists()  # nothing made at the old path


def test_a_previous_version_marker_still_works_after_a_move(tmp_path: Path) -> None:
    nodes = ran(tmp_path / "exp_processes")
    set_old_marker(tmp_path / "exp_processes")
    shutil.move(tmp_path / "exp_processes", tmp_path / "exp_moved")
    restored = dg.Experiment.restore(tmp_path / "exp_moved")
    assert restored.store.url == f"file://{tmp_path}/exp_moved/store"
    assert len(restored.graph) == 3
    assert restored.graph.node(nodes["root"].key).restore().seed == 0
    exp = dg.Experiment(tmp_path / "exp_moved", state_class=State)
    define(exp)
    assert exp.run().executed == ()
    assert not (tmp_path / "exp_processes").exists()


def test_a_previous_version_marker_whose_store_is_where_it_says_is_used_as_it_is(
    tmp_path: Path,
) -> None:
    # A shared store recorded by absolute path, never second-guessed: not even by a folder
    # that has a store of its own beside the marker.
    ran(tmp_path / "exp")
    shared = tmp_path / "lab" / "store"
    shutil.copytree(tmp_path / "exp" / "store", shared)
    marker = tmp_path / "exp" / "dagger-experiment"
    document = json.loads(marker.read_text())
    document.update(version=1, store=str(shared))
    marker.chmod(0o644)
    marker.write_text(json.dumps(document))
    assert dg.Experiment.restore(tmp_path / "exp").store.url == f"file://{shared}"


def _restore_error(folder: Path) -> str:
    """The message of the StoreOpenError that restoring ``folder`` must raise."""
    with pytest.raises(ds.StoreOpenError) as info:
        dg.Experiment.restore(folder)
    return str(info.value)


def test_restoring_a_folder_whose_store_is_gone_is_a_clear_error_and_creates_nothing(
    tmp_path: Path,
) -> None:
    ran(tmp_path / "exp")
    shutil.rmtree(tmp_path / "exp" / "store")
    before = files(tmp_path)
    message = _restore_error(tmp_path / "exp")
    assert f"{tmp_path}/exp/dagger-experiment names the store 'store'" in message
    assert f"({tmp_path}/exp/store)" in message and "store=" in message
    assert files(tmp_path) == before


def test_a_moved_old_marker_without_its_store_names_both_places(tmp_path: Path) -> None:
    ran(tmp_path / "old")
    set_old_marker(tmp_path / "old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "new" / "store")
    before = files(tmp_path)
    message = _restore_error(tmp_path / "new")
    assert f"names the store '{tmp_path}/old/store'" in message
    assert f"nor at {tmp_path}/new/store" in message
    assert files(tmp_path) == before
    assert main(["tree", str(tmp_path / "new")]) == 3
    assert files(tmp_path) == before


def test_an_experiment_made_to_run_recreates_a_deleted_store(tmp_path: Path) -> None:
    ran(tmp_path / "exp")
    shutil.rmtree(tmp_path / "exp" / "store")
    exp = dg.Experiment(tmp_path / "exp", state_class=State)  # not restore: makes what it needs
    define(exp)
    assert len(exp.run().executed) == 3
    assert (tmp_path / "exp" / "store" / "dagger-store").is_file()


def test_a_restored_experiment_shares_the_read_only_reference(tmp_path: Path) -> None:
    ran(tmp_path / "exp")
    restored = dg.Experiment.restore(tmp_path / "exp")
    assert restored._ref.create is False  # workers it starts never create a store either
    assert dg.Experiment(tmp_path / "exp", state_class=State)._ref.create is True


def test_cli_commands_on_a_moved_folder_work_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = ran(tmp_path / "exp_processes")
    set_old_marker(tmp_path / "exp_processes")  # the hardest case: a marker of the old format
    shutil.move(tmp_path / "exp_processes", tmp_path / "exp_moved")
    moved = str(tmp_path / "exp_moved")
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    before = files(tmp_path / "exp_moved")
    pruned = nodes["pruned"].key.hex
    for argv, expected in [
        (["tree", moved], "Prune(fraction=0.5)"),
        (["--store", moved, "ls"], "3 nodes"),
        (["--store", moved, "tree", moved], "cached"),
        (["--store", moved, "show", pruned[:12]], pruned),
        (["--store", moved, "du"], "dedup ratio"),
        (["--store", moved, "verify"], "0 problems"),
        (["results", moved, "--format", "csv"], "Train.lr"),
        (["report", moved, "-o", str(report)], "wrote"),
    ]:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        assert expected in out, (argv, out)
    assert files(tmp_path / "exp_moved") == before
    assert not (tmp_path / "exp_processes").exists()
    assert report.is_file()
