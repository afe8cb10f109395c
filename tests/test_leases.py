"""Leases and in-flight dedup: each node computed once; a dead holder is replaced."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from toy_experiment import State, Step

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store import leases

KEY = ds.node_key("state", {"lease": "test"})


def test_a_live_lease_excludes_others_until_released_or_expired(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store")
    mine = leases.acquire(store, KEY, "me", 30)
    assert mine is not None and mine.live() and leases.current(store, KEY) == mine
    assert leases.acquire(store, KEY, "you", 30) is None
    assert leases.live_keys(store) == {KEY}
    renewed = leases.renew(store, mine, 30)
    assert renewed is not None and renewed.generation == mine.generation + 1
    assert leases.renew(store, mine, 30) is None  # a stale handle cannot renew twice
    leases.release(store, renewed)
    assert leases.live_keys(store) == set()
    yours = leases.acquire(store, KEY, "you", 0.2)
    assert yours is not None
    time.sleep(0.3)
    taken = leases.acquire(store, KEY, "me", 30)  # expired: taken over
    assert taken is not None and taken.owner == "me" and taken.generation > yours.generation
    assert leases.renew(store, yours, 30) is None  # the dead holder's renewal loses


def _overlapping_run(location: dict[str, Any], log: str, branch: int, start: Any) -> None:
    os.environ["DAGGER_TEST_LOG"] = log
    exp = dg.Experiment(state_class=State, **location)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    shared = Step(i=2, seconds=0.3)(Step(i=1, seconds=0.3)(root))
    Step(i=10 + branch, seconds=0.2)(shared)
    Step(i=20 + branch, seconds=0.1)(root)
    start.wait()
    exp.run("threads", lease_seconds=5)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_runs_compute_each_node_exactly_once(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    log = str(tmp_path / "log")
    if where == "local":
        location: dict[str, Any] = {"path": str(tmp_path / "exp"), "store": str(tmp_path / "lab")}
    else:
        url = request.getfixturevalue("s3_url")
        options = request.getfixturevalue("s3_storage_options")
        location = {"path": str(tmp_path / "exp"), "store": url, "storage_options": options}
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    runs = [
        context.Process(target=_overlapping_run, args=(location, log, b, start)) for b in (1, 2)
    ]
    for p in runs:
        p.start()
    start.set()
    for p in runs:
        p.join(120)
        assert p.exitcode == 0
    executions = Counter(Path(log).read_text().splitlines())
    assert executions == Counter(
        ["init", "step 1", "step 2", "step 11", "step 12", "step 21", "step 22"]
    )


def _long_run(location: dict[str, Any], log: str) -> None:
    os.environ["DAGGER_TEST_LOG"] = log
    exp = dg.Experiment(state_class=State, **location)
    Step(i=1, seconds=60)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    exp.run(lease_seconds=1.5)


def test_a_killed_holder_is_taken_over_once_its_lease_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = str(tmp_path / "log")
    location = {"path": str(tmp_path / "exp")}
    doomed = multiprocessing.get_context("spawn").Process(target=_long_run, args=(location, log))
    doomed.start()
    exp = dg.Experiment(state_class=State, **location)
    node = Step(i=1, seconds=60)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    deadline = time.monotonic() + 60
    while (holder := leases.current(exp.store, node.key)) is None or not holder.live():
        assert time.monotonic() < deadline, "the first run never took the lease"
        time.sleep(0.05)
    os.kill(doomed.pid, signal.SIGKILL)  # mid-recipe, lease held and being renewed
    doomed.join()
    monkeypatch.setenv("DAGGER_TEST_LOG", log)
    monkeypatch.setenv("DAGGER_TEST_NO_SLEEP", "1")  # the same node, computed quickly here
    started = time.monotonic()
    report = exp.run(lease_seconds=1.5)
    assert report.executed == (node.key,) and report.cached == (node.node.parent,)
    assert time.monotonic() - started < 30  # took over after expiry, did not wait forever
    assert Counter(Path(log).read_text().splitlines()) == Counter(["init", "step 1", "step 1"])
    assert exp.store.missing([node.key]) == []
