"""Benchmark what researchers do with a finished sweep: the results table, the report, and a
fully cached re-run with cached evaluations (issue 8's bars).

Run by hand (``make bench``), never in CI. Scratch data lives in a temporary folder on the real
disk (not /tmp), removed at the end.

Bars:

1. ``Experiment.restore(path).results()`` of a 10,000-node experiment with one evaluation per
   node: <= 1 s (best of ``--repeat``; the restore, which reads the records, is included);
2. the HTML report of a 1,000-node experiment (results table + coloured tree + plot): <= 5 s;
3. a fully cached re-run of the 13-state benchmark tree (bench_orchestrate.py: 40 MB data set,
   20 MB model) with a cached evaluation on every node reads < 1 MB in all: every byte this
   process reads (``/proc/self/io`` rchar, page cache included), and the blob payload bytes
   counted at the backend.

Informational rows: the cold runs that build the trees, and the same re-run with
``cache=False`` evaluations (which load every evaluated state), for contrast.

Exit status is 0 even when a bar fails: this is a report.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script
import numpy as np
from bench_orchestrate import (
    EPOCHS,
    PRUNE_FRACTIONS,
    ROOT_ARGS,
    BigState,
    Prune,
    Train,
    counting_blob_reads,
    read_chars,
)

import dagger_orchestrate as dg
from dagger_orchestrate.report import report_html

MB = 1e6
LRS = (0.001, 0.01, 0.05, 0.1)


class Small(dg.ExperimentState):
    PROPERTIES = ["seed"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.weights = np.zeros(16, dtype=np.float32)


class Step(dg.Recipe):
    PROPERTIES = ["i", "lr"]

    def run(self, state: dg.ExperimentState) -> dg.ExperimentState:
        state.weights = state.weights + self.lr  # type: ignore[attr-defined]
        return state


@dg.Function
def score(state: Any) -> dict[str, float]:
    return {"loss": float(np.abs(state.weights).sum()), "norm": float(state.weights[0])}


def sweep(path: Path, branches: int, leaves: int) -> float:
    """root -> ``branches`` Steps -> ``leaves`` Steps each, every node evaluated; cold seconds."""
    exp = dg.Experiment(path, state_class=Small)
    root = exp.spawn_new_tree(seed=0)
    score(root)
    for b in range(branches):
        with exp.tag(f"branch:{b}"):
            mid = Step(i=b, lr=0.1 * (b + 1))(root)
            score(mid)
            for leaf in range(leaves):
                with exp.tag(f"leaf:{leaf}"):
                    score(Step(i=leaf, lr=0.01 * (leaf + 1))(mid))
    start = time.perf_counter()
    exp.run(progress=False)
    return time.perf_counter() - start


def best(rounds: int, step: Any) -> tuple[float, Any]:
    fastest, value = math.inf, None
    for _ in range(rounds):
        start = time.perf_counter()
        value = step()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, value


def big_tree(path: Path, cache: bool) -> dg.RunReport:
    exp = dg.Experiment(path, state_class=BigState)
    evaluate = dg.Function(cache=cache)(weight_norm)
    root = exp.spawn_new_tree(**ROOT_ARGS)
    evaluate(root)
    for lr in LRS:
        with exp.tag(f"lr:{lr}"):
            node = Train(lr=lr, epochs=EPOCHS)(root)
            evaluate(node)
            with exp.tag("pruned"):
                for fraction in PRUNE_FRACTIONS:
                    node = Prune(fraction=fraction)(node)
                    evaluate(node)
    return exp.run(progress=False)


def weight_norm(state: Any) -> float:
    return float(sum(np.abs(w).sum() for w in state.model.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_work_dir(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=10_000, help="nodes of the table's sweep")
    parser.add_argument("--report-nodes", type=int, default=1_000)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dagger-bench-results-", dir=args.work_dir))
    rows: list[tuple[str, str, str, str]] = []
    try:
        # 1. the results table of a 10,000-node sweep
        branches = max(1, round(math.sqrt(args.nodes)))
        leaves = max(1, math.ceil((args.nodes - 1 - branches) / branches))
        table_exp = scratch / "table"
        print(f"building a {1 + branches + branches * leaves}-node sweep ...", flush=True)
        cold = sweep(table_exp, branches, leaves)
        rows.append(("cold run of the table's sweep", f"{cold:.1f} s", "-", "-"))
        seconds, frame = best(args.repeat, lambda: dg.Experiment.restore(table_exp).results())
        rows.append(
            (
                f"restore + results(), {len(frame):,} rows x {len(frame.columns)} columns",
                f"{seconds:.3f} s",
                "<= 1 s",
                common.verdict(seconds <= 1.0),
            )
        )

        # 2. the report of a 1,000-node experiment
        branches = max(1, round(math.sqrt(args.report_nodes)))
        leaves = max(1, math.ceil((args.report_nodes - 1 - branches) / branches))
        report_exp = scratch / "report"
        sweep(report_exp, branches, leaves)

        def report() -> int:
            exp = dg.Experiment.restore(report_exp)
            nodes = exp.graph.nodes
            page = report_html(nodes, nodes.results(), title=exp.name, store_url=exp.store.url)
            (scratch / "report.html").write_text(page)
            return len(nodes)

        seconds, count = best(args.repeat, report)
        size = (scratch / "report.html").stat().st_size
        rows.append(
            (
                f"report of {count:,} nodes ({size / MB:.1f} MB of HTML)",
                f"{seconds:.2f} s",
                "<= 5 s",
                common.verdict(seconds <= 5.0),
            )
        )

        # 3. a fully cached re-run of the 13-state tree with cached evaluations
        for cache in (True, False):
            folder = scratch / f"tree-{cache}"
            start = time.perf_counter()
            big_tree(folder, cache)
            cold_seconds = f"{time.perf_counter() - start:.2f} s"
            rows.append((f"cold 13-state tree, cache={cache}", cold_seconds, "-", "-"))
            before = read_chars()
            with counting_blob_reads() as blobs:
                start = time.perf_counter()
                report_ = big_tree(folder, cache)
                elapsed = time.perf_counter() - start
            read = read_chars() - before
            assert not report_.executed, "the re-run executed nodes"
            figure = (
                f"cached re-run, 13 states, {len(report_.results)} evaluations "
                f"cache={cache}: {elapsed * 1e3:.0f} ms, payload {blobs.payload_bytes / MB:.2f} MB"
            )
            if cache:
                rows.append(
                    (figure, f"{read / MB:.3f} MB read", "< 1 MB", common.verdict(read < MB))
                )
            else:
                rows.append((figure, f"{read / MB:.1f} MB read", "-", "-"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    common.print_table(("figure", "dagger", "bar", "result"), rows)


if __name__ == "__main__":
    sys.exit(main())
