"""Two collaborators on one shared store: overlapping trees run at once vs one after the other.

Run by hand (``make bench``). Each collaborator is a separate program (this script with
``--collaborator``), as two people would be: same store, overlapping trees (half the nodes
shared). Every recipe execution is logged to a file, so the table can show the total number of
executions (it must equal the number of distinct nodes: in-flight dedup at work) and the wall
time of running both at once against one after the other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script
import numpy as np

import dagger_orchestrate as dg

BRANCHES = 8  # per collaborator; half of them shared with the other
WORK_SECONDS = 0.25  # what one recipe "computes" (sleep + a little numpy)


class State(dg.ExperimentState):
    PROPERTIES = ["seed"]
    NONHASHED_ATTRIBUTES = ["weights"]

    def initialize_state(self, **kwargs: Any) -> None:
        _log(self.key)
        self.weights = np.random.default_rng(self.seed).standard_normal(2_000_000).astype("f4")
        time.sleep(WORK_SECONDS)


class Train(dg.Recipe):
    PROPERTIES = ["lr"]

    def run(self, state: State) -> State:
        _log(state.key)
        state.weights *= 1 - self.lr
        time.sleep(WORK_SECONDS)
        return state


class Prune(dg.Recipe):
    PROPERTIES = ["fraction"]

    def run(self, state: State) -> State:
        _log(state.key)
        w = state.weights
        w[np.abs(w) < np.quantile(np.abs(w[:100_000]), self.fraction)] = 0
        time.sleep(WORK_SECONDS)
        return state


def _log(node_key: str) -> None:
    with open(os.environ["COLLAB_LOG"], "a") as log:
        log.write(f"{os.environ['COLLAB_WHO']} {node_key}\n")


def collaborate(who: str, folder: Path, store: str) -> None:
    """One collaborator's program: its own experiment on the shared store."""
    first = 0 if who == "A" else BRANCHES // 2
    exp = dg.Experiment(folder / who, state_class=State, store=store)
    root = exp.spawn_new_tree(seed=0)
    for i in range(first, first + BRANCHES):
        with exp.tag(f"lr:{i}"):
            Prune(fraction=0.5)(Train(lr=round(0.01 * (i + 1), 2))(root))
    exp.run("threads", lease_seconds=10)


def launch(who: str, folder: Path, store: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COLLAB_LOG": str(log), "COLLAB_WHO": who}
    command = [sys.executable, __file__, "--collaborator", who, str(folder), store]
    return subprocess.Popen(command, env=env)


def scenario(work: Path, together: bool) -> tuple[float, Counter[str]]:
    folder = work / ("together" if together else "in-turn")
    folder.mkdir()
    store, log = str(folder / "lab-store"), folder / "executions.log"
    log.touch()
    start = time.perf_counter()
    if together:
        runs = [launch(who, folder, store, log) for who in "AB"]
        for run in runs:
            run.wait()
    else:
        for who in "AB":
            launch(who, folder, store, log).wait()
    seconds = time.perf_counter() - start
    lines = log.read_text().splitlines()
    return seconds, Counter(line.split(" ", 1)[1] for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--collaborator", nargs=3, metavar=("WHO", "FOLDER", "STORE"))
    args = parser.parse_args()
    if args.collaborator:
        who, folder, store = args.collaborator
        collaborate(who, Path(folder), store)
        return
    work = Path(tempfile.mkdtemp(prefix="dagger-bench-collab-", dir="/work"))
    try:
        distinct = 1 + 2 * (BRANCHES + BRANCHES // 2)
        print(
            f"two collaborators, {BRANCHES} branches each (half shared): {distinct} distinct "
            f"nodes, {WORK_SECONDS} s of work per node, threads scheduler"
        )
        in_turn, executions_in_turn = scenario(work, together=False)
        together, executions_together = scenario(work, together=True)
        rows = [
            (
                "recipe executions",
                str(sum(executions_together.values())),
                str(sum(executions_in_turn.values())),
                "-",
                f"== {distinct}",
                common.verdict(sum(executions_together.values()) == distinct),
            ),
            (
                "nodes executed twice",
                str(sum(1 for n in executions_together.values() if n > 1)),
                str(sum(1 for n in executions_in_turn.values() if n > 1)),
                "-",
                "== 0",
                common.verdict(all(n == 1 for n in executions_together.values())),
            ),
            (
                "wall time",
                f"{together:.2f} s",
                f"{in_turn:.2f} s",
                f"{together / in_turn:.2f}",
                "-",
                "-",
            ),
        ]
        common.print_table(("figure", "at once", "in turn", "ratio", "bar", "result"), rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
