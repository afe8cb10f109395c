"""RunnerContract: every scheduler (sync, threads, processes, dask.distributed, any dask get
function, a registered one) behaves the same.

Processes and distributed workers are real processes; they run with the store on the local
folder and on the S3 test server, and whatever their working directory is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.multiprocessing
import dask.threaded
import pytest
from toy_experiment import Boom, Prune, State, Train, history, sparsity

import dagger_orchestrate as dg


def define(exp: dg.Experiment, lrs: tuple[float, ...] = (0.1, 0.2)) -> dict[str, Any]:
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    tree: dict[str, Any] = {"root": root}
    for lr in lrs:
        with exp.tag(f"lr:{lr}"):
            tree[f"train {lr}"] = trained = Train(nb_epochs=1, lr=lr)(root)
            with exp.tag("pruned"):
                tree[f"prune {lr}"] = pruned = Prune(fraction=0.5)(trained)
                tree[f"sparsity {lr}"] = sparsity(pruned)
    return tree


class RunnerContract:
    """Subclass per scheduler; supply ``scheduler`` and ``location`` (experiment kwargs)."""

    def test_runs_the_tree_then_reruns_nothing(
        self, scheduler: Any, location: dict[str, Any]
    ) -> None:
        exp = dg.Experiment(state_class=State, **location)
        tree = define(exp)
        report = exp.run(scheduler, progress=False)
        assert set(report.executed) == {tree[k].key for k in tree if "sparsity" not in k}
        assert tree["sparsity 0.1"].result == pytest.approx(0.5, abs=0.01)
        again = dg.Experiment(state_class=State, **location)
        define(again, lrs=(0.1, 0.2, 0.3))
        report = again.run(scheduler, progress=False)
        assert len(report.executed) == 2 and len(report.cached) == 5
        assert [r.value for r in report.results] == pytest.approx([0.5] * 3, abs=0.01)

    def test_a_failure_spares_other_branches(
        self, scheduler: Any, location: dict[str, Any]
    ) -> None:
        exp = dg.Experiment(state_class=State, **location)
        root = exp.spawn_new_tree(dataset_name="digits", seed=0)
        bad = Boom(message="nan loss")(root)
        good = Train(nb_epochs=1, lr=0.5)(root)
        with pytest.raises(dg.RunError, match="nan loss") as info:
            exp.run(scheduler, progress=False)
        assert isinstance(info.value.__cause__, ValueError)
        assert exp.store.missing([root.key, good.key, bad.key]) == [bad.key]

    def test_many_recipes_on_one_parent(self, scheduler: Any, location: dict[str, Any]) -> None:
        exp = dg.Experiment(state_class=State, **location)
        root = exp.spawn_new_tree(dataset_name="digits", seed=0)
        lrs = [round(0.05 * i, 2) for i in range(1, 9)]
        calls = [history(Train(nb_epochs=1, lr=lr)(root)) for lr in lrs]
        exp.run(scheduler, progress=False)
        assert [c.result[1] for c in calls] == [[f"train lr={lr}"] for lr in lrs]


@pytest.fixture
def local_location(tmp_path: Path) -> dict[str, Any]:
    return {"path": str(tmp_path / "exp")}


@pytest.fixture
def s3_location(s3_url: str, s3_storage_options: dict[str, Any]) -> dict[str, Any]:
    return {"path": s3_url + "/exp", "storage_options": s3_storage_options}


class TestSynchronous(RunnerContract):
    @pytest.fixture
    def scheduler(self) -> Any:
        return None

    @pytest.fixture
    def location(self, local_location: dict[str, Any]) -> dict[str, Any]:
        return local_location


class TestThreads(RunnerContract):
    @pytest.fixture
    def scheduler(self) -> Any:
        return "threads"

    @pytest.fixture
    def location(self, local_location: dict[str, Any]) -> dict[str, Any]:
        return local_location


class TestProcesses(RunnerContract):
    @pytest.fixture
    def scheduler(self) -> Any:
        return "processes"

    @pytest.fixture(params=["local", "s3"])
    def location(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        location: dict[str, Any] = request.getfixturevalue(f"{request.param}_location")
        return location


@pytest.mark.parametrize(
    "get", [dask.get, dask.threaded.get, dask.multiprocessing.get], ids=lambda g: g.__module__
)
class TestDaskGetFunctions(RunnerContract):
    """Any get function dask accepts, as is (dask.get is dask's synchronous scheduler)."""

    @pytest.fixture
    def scheduler(self, get: Any) -> Any:
        return get

    @pytest.fixture
    def location(self, local_location: dict[str, Any]) -> dict[str, Any]:
        return local_location


class CountingGet:
    """A scheduler from outside the package: dask's threaded get, counting the graphs it ran."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: Any, keys: Any, **kwargs: Any) -> Any:
        self.graphs += 1
        return dask.threaded.get(graph, keys, **kwargs)


class TestRegisteredScheduler(RunnerContract):
    @pytest.fixture
    def scheduler(self) -> Iterator[Any]:
        counting = CountingGet()
        dg.register_scheduler("counting-threads", counting)
        yield "counting-threads"
        assert counting.graphs >= 1  # the runs really went through it

    @pytest.fixture
    def location(self, local_location: dict[str, Any]) -> dict[str, Any]:
        return local_location


def test_registering_a_scheduler_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="non-empty str"):
        dg.register_scheduler("", dask.threaded.get)
    with pytest.raises(TypeError, match="get function"):
        dg.register_scheduler("nothing", 42)  # type: ignore[arg-type]


def test_functions_run_in_definition_order_on_synchronous_gets(tmp_path: Path) -> None:
    for scheduler in (None, "sync", dask.get):
        exp = dg.Experiment(tmp_path / f"exp-{id(scheduler)}", state_class=State)
        root = exp.spawn_new_tree(dataset_name="digits", seed=0)
        trained = [Train(nb_epochs=1, lr=lr)(root) for lr in (0.3, 0.1, 0.2)]
        calls = [history(t) for t in reversed(trained)] + [history(root)]
        order: list[int] = []
        for i, call in enumerate(calls):
            original = call.function

            def remember(
                state: Any, i: int = i, original: Any = original, order: list[int] = order
            ) -> Any:
                order.append(i)
                return original.fn(state)

            call.function = dg.Function(remember)
        exp.run(scheduler, progress=False)
        assert order == list(range(len(calls)))


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


class TestDistributed(RunnerContract):
    @pytest.fixture
    def scheduler(self, cluster_client: Any) -> Any:
        return cluster_client

    @pytest.fixture(params=["local", "s3"])
    def location(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        location: dict[str, Any] = request.getfixturevalue(f"{request.param}_location")
        return location


def test_workers_do_not_resolve_paths_against_their_own_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = dg.Experiment("relative/exp", state_class=State)  # resolved now, not in workers
    tree = define(exp, lrs=(0.1,))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    exp.run("processes", progress=False)
    assert exp.store.missing([tree["prune 0.1"].key]) == []
    assert not (tmp_path / "elsewhere" / "relative").exists()


def test_unknown_scheduler_is_refused(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", state_class=State)
    exp.spawn_new_tree(dataset_name="digits", seed=0)
    with pytest.raises(ValueError, match="unknown scheduler 'gpu'") as info:
        exp.run("gpu")
    assert "register_scheduler" in str(info.value) and "'threads'" in str(info.value)
    with pytest.raises(TypeError, match="a scheduler is None, a name"):
        exp.run(3.5)
