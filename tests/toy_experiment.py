"""A small experiment for the orchestrator tests: a state with arrays, recipes, functions.

A module (not the test file) so that worker processes can import it by name, as they would a
lab's own recipes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import dagger_orchestrate as dg

RUNS: list[str] = []  # recipes append here, so in-process tests can see what executed


class State(dg.ExperimentState):
    PROPERTIES = ["dataset_name", "seed"]
    NONHASHED_ATTRIBUTES = ["data", "model", "history"]

    def initialize_state(self, **kwargs: Any) -> None:
        rng = np.random.default_rng(self.seed)
        self.data = rng.standard_normal((256, 64)).astype(np.float32)
        self.model = {
            "w1": rng.standard_normal((64, 32)).astype(np.float32),
            "w2": rng.standard_normal((32, 10)).astype(np.float32),
        }
        self.history: list[str] = []
        RUNS.append("init")
        _log("init")


class Train(dg.Recipe):
    PROPERTIES = ["lr", "nb_epochs"]

    def run(self, state: State) -> State:
        for _ in range(self.nb_epochs):
            for w in state.model.values():
                w -= self.lr * np.sign(w)  # in place: isolation must keep siblings apart
        state.history.append(f"train lr={self.lr}")
        RUNS.append(f"train {self.lr}")
        return state


class Finetune(dg.Recipe):  # the same PROPERTIES as Train: must still be another node
    PROPERTIES = ["lr", "nb_epochs"]

    def run(self, state: State) -> State:
        state.history.append(f"finetune lr={self.lr}")
        RUNS.append(f"finetune {self.lr}")
        return state


class Prune(dg.Recipe):
    PROPERTIES = ["fraction"]

    def run(self, state: State) -> State:
        for w in state.model.values():
            w[np.abs(w) < np.quantile(np.abs(w), self.fraction)] = 0.0
        state.history.append(f"prune {self.fraction}")
        RUNS.append(f"prune {self.fraction}")
        return state


class Boom(dg.Recipe):
    PROPERTIES = ["message"]

    def run(self, state: State) -> State:
        raise ValueError(self.message)


class Slow(dg.Recipe):
    PROPERTIES = ["seconds"]

    def run(self, state: State) -> State:
        time.sleep(self.seconds)
        return state


class Step(dg.Recipe):
    """Logs to $DAGGER_TEST_LOG (so tests across processes can count executions), then sleeps
    (unless $DAGGER_TEST_NO_SLEEP: the same node, computed quickly)."""

    PROPERTIES = ["i", "seconds"]

    def run(self, state: State) -> State:
        _log(f"step {self.i}")
        if not os.environ.get("DAGGER_TEST_NO_SLEEP"):
            time.sleep(self.seconds)
        state.history.append(f"step {self.i}")
        return state


def _log(line: str) -> None:
    path = os.environ.get("DAGGER_TEST_LOG")
    if path:
        with open(path, "a") as log:  # one short O_APPEND write per line: atomic
            log.write(f"{line}\n")


class ReturnsNothing(dg.Recipe):
    PROPERTIES: list[str] = []

    def run(self, state: State) -> State:
        return None  # type: ignore[return-value]


@dg.Function
def sparsity(state: State) -> float:
    weights = np.concatenate([w.ravel() for w in state.model.values()])
    return float((weights == 0).mean())


@dg.Function
def history(state: State) -> tuple[tuple[str, ...], list[str]]:
    return state.tags, list(state.history)


@dg.Function(cache=True)
def cached_sparsity(state: State) -> float:
    """Like ``sparsity``, but a stored result is reused; logs (RUNS, $DAGGER_TEST_LOG) each run."""
    RUNS.append("cached_sparsity")
    _log("cached_sparsity")
    return float(sparsity.fn(state))


@dg.Function
def weight_stats(state: State) -> dict[str, Any]:
    """A dict of numpy values: spread into columns by the results table, stored without pickle."""
    weights = np.concatenate([w.ravel() for w in state.model.values()])
    return {
        "zeros": np.int64((weights == 0).sum()),
        "mean": np.float32(np.abs(weights).mean()),
        "first": weights[:3].copy(),
        "epochs": len(state.history),
    }


class Verdict:
    """An object result: stored with pickle, so it loads only from a trusted store."""

    def __init__(self, text: str) -> None:
        self.text = text


@dg.Function
def verdict(state: State) -> Verdict:
    return Verdict(f"{len(state.history)} steps")
