"""Provenance: every manifest says when, where, by what code and on what software it was made."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from toy_experiment import State, Train

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate import provenance as prov
from dagger_orchestrate.cli import main
from dagger_store.host import host

RECIPES = """
import dagger_orchestrate as dg


class LabState(dg.ExperimentState):
    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs):
        self.value = self.seed


class AddOne(dg.Recipe):
    PROPERTIES = ["tag"]

    def run(self, state):
        state.value += 1
        return state
"""


@pytest.fixture(autouse=True)
def _fresh_git_state() -> Iterator[None]:
    prov.forget_git_state()  # each test's repositories are new: nothing cached may carry over
    yield
    prov.forget_git_state()


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Lab", "-c", "user.email=lab@example.org", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def lab_module(folder: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module of recipes written to ``folder`` (a unique name: never one imported before)."""
    name = f"lab_recipes_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(RECIPES))
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(name)


def manifests(store: str, report: dg.RunReport) -> list[dict[str, Any]]:
    opened = ds.open_store(store)
    return [opened.get_manifest(key).meta["provenance"] for key in report.executed]


def run(tmp_path: Path, module: types.ModuleType, tag: str) -> tuple[str, dg.RunReport]:
    store = str(tmp_path / "store")
    exp = dg.Experiment(tmp_path / "exp", state_class=module.LabState, store=store)
    module.AddOne(tag=tag)(exp.spawn_new_tree(seed=0))
    return store, exp.run()


def test_every_node_records_plain_provenance(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    exp = dg.Experiment(tmp_path / "exp", state_class=State, store=store)
    Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    before = time.time()
    report = exp.run()
    for record in manifests(store, report):
        assert all(type(v) in (str, int, float, bool) for v in record.values()), record
        # The fields every manifest had, with their meaning.
        assert {"seconds", "finished", "host", "user", "python", "pid"} <= set(record)
        assert record["pid"] == os.getpid() and record["host"] == host()
        assert record["started"] == pytest.approx(record["finished"] - record["seconds"])
        assert before - 1 <= record["started"] <= record["finished"] <= time.time()
        assert record["numpy"] == np.__version__
        assert record["dagger_lab"] == importlib.metadata.version("dagger-lab")
        assert record["platform"] and record["python"] == sys.version.split()[0]
        assert record["peak_memory"] > 10 * 2**20  # bytes, not KiB: Python + numpy alone
        assert "distribution" not in record  # toy_experiment is no installed distribution


def test_versions_of_modules_only_when_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert "torch" not in prov.provenance(State, 0.5)
    assert "torch" not in sys.modules  # asking never imports it
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="9.9.9"))
    assert prov.provenance(State, 0.5)["torch"] == "9.9.9"


def test_the_distribution_providing_the_code() -> None:
    assert prov.distribution_of("numpy.linalg") == ("numpy", np.__version__)
    assert prov.distribution_of("__main__") is None
    assert prov.distribution_of("toy_experiment") is None
    record = prov.provenance(np.ndarray, 0.1)
    assert (record["distribution"], record["distribution_version"]) == ("numpy", np.__version__)


def test_git_commit_and_dirty_flag_of_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "lab"
    module = lab_module(repo, monkeypatch)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "recipes")
    head = git(repo, "rev-parse", "HEAD")
    store, report = run(tmp_path, module, "clean")
    records = manifests(store, report)
    assert len(records) == 2
    assert all(r["git_commit"] == head and r["git_dirty"] is False for r in records)

    code, out, _ = main(["--store", store, "show", report.executed[-1].hex]), *capsys.readouterr()
    assert code == 0
    # "  git commit   0123abcd...": a label of up to 12 characters, then the value
    shown = {line[2:14].strip(): line[15:] for line in out.split("provenance\n", 1)[1].splitlines()}
    assert shown["git commit"] == head and shown["git dirty"] == "no"
    assert shown["peak memory"].endswith("MiB (the process's peak so far)")
    today = time.strftime("%Y-%m-%d", time.localtime(records[-1]["started"]))
    assert shown["started"].startswith(today) and shown["finished"].startswith(today)
    assert shown["duration"].endswith(" s") and shown["numpy"] == np.__version__
    assert shown["dagger-lab"] == importlib.metadata.version("dagger-lab")
    assert shown["pid"] == str(os.getpid()) and "seconds" not in shown

    source = Path(module.__file__ or "")
    source.write_text(source.read_text() + "\n# an edit, not committed\n")
    prov.forget_git_state()  # a new run, as far as this process can tell
    store, report = run(tmp_path, module, "edited")
    (record,) = manifests(store, report)  # the root is a hit
    assert record["git_commit"] == head and record["git_dirty"] is True
    main(["--store", store, "show", report.executed[0].hex])
    assert "git dirty    yes" in capsys.readouterr().out


def test_untracked_code_in_a_repository_is_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "lab"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("lab\n")
    git(repo, "add", "README")
    git(repo, "commit", "-q", "-m", "start")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "junk.txt").write_text("untracked, and not code: does not count\n")
    module = lab_module(repo, monkeypatch)  # never added: HEAD does not hold this code
    record = prov.provenance(module.AddOne, 0.1)
    assert record["git_commit"] == git(repo, "rev-parse", "HEAD") and record["git_dirty"] is True
    assert prov.git_state(str(repo / "README")) == {
        "git_commit": record["git_commit"],
        "git_dirty": False,
    }


def test_no_git_fields_outside_a_repository_or_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = lab_module(tmp_path / "scripts", monkeypatch)
    store, report = run(tmp_path, module, "plain")
    for record in manifests(store, report):
        assert "git_commit" not in record and "git_dirty" not in record
    repo = tmp_path / "lab"
    tracked = lab_module(repo, monkeypatch)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "recipes")
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert "git_commit" not in prov.provenance(tracked.AddOne, 0.1)


def test_show_prints_an_old_manifest_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ds.open_store(str(tmp_path / "store"))
    key = ds.node_key("state", {"old": True})
    old = {"seconds": 2.5, "finished": 0.0, "host": "h", "user": "u", "python": "3.11.0", "pid": 7}
    store.commit(key, ds.Manifest({}, {"node": {"label": "Old()"}, "provenance": {**old, "x": 1}}))
    assert main(["--store", str(tmp_path / "store"), "show", key.hex[:12]]) == 0
    out = capsys.readouterr().out
    assert "duration     2.500 s" in out and "x            1" in out and "started" not in out
    assert time.strftime("%Y-%m-%d", time.localtime(0)) in out
