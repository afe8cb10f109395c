"""Soak: three collaborators, five runs each, one S3 store, faults on, and a gc every few seconds.

Run by hand (``make bench``). Real parts: a moto S3 server on loopback, and in front of it
``dagger_store.faultproxy.FaultProxy`` injecting, at ``--fault-rate`` spread evenly over its six
kinds, 503 SlowDown, 500, connection resets, hang-ups, truncated bodies and PUTs that land but
lose their answer. Every S3 request of every process below goes through it; s3fs's and
botocore's retry settings are left as a user has them.

- Three collaborators (A, B, C), each a separate program (this script with ``--role``), each
  doing five runs of a growing sweep on the shared store: run r adds, under one shared root, a
  shared branch (Train then Prune: all three need it at once, the leases decide who computes),
  two branches each shared with one other collaborator (Prune variants on the shared Train),
  and two nodes of its own. Each run is a fresh ``dg.Experiment`` on the S3 store through the
  proxy (``cache_dir=False``: every read is a real S3 read), ``threads`` scheduler. A run that
  raises is run again (up to ``MAX_ATTEMPTS``); the errors are counted by type.
- Each run also defines, in a throwaway experiment that it then deletes
  (``gc.delete_experiment``), the own Train node that the collaborator's *next* run will use:
  computed, committed, then unreferenced. The collector may take it (manifest at once, with
  ``keep_recent=0``; blobs after ``grace``) in the ``THINK_SECONDS`` before the next run needs
  it again, or not: the next run then computes it again, deduplicating against its blobs if
  they are still there (the put touches them: the race gc.py's safety argument is about).
- A fourth program runs ``gc.collect(store, grace=GRACE, keep_recent=0, dry_run=False)`` every
  ``--gc-every`` seconds, through the faults too. Before each collection it reads the keys the
  main experiments' records name (those are never deleted), so a referenced manifest that the
  collection then deletes is caught.

Counted independently of dagger's own reports: every recipe execution appends one line (time,
who, experiment, run, attempt, node key) to a local log with one O_APPEND write. Each attempt's
outcome per node (``RunReport.executed``: committed by this execution; ``failed``) is logged by
the collaborator. An execution of a node is then one of:

- the first execution of the node;
- a retry: every earlier execution of it failed (its attempt reported the node failed, or the
  attempt died without a report), so the node was never committed: the "retries included" of
  the bar, counted by cause;
- a recomputation after the collector deleted the node's manifest while no record named it
  (the throwaway experiments): legitimate, that is what deleting an experiment is for, and the
  collector's log proves the deletion happened before this execution started (the time the
  call that deleted the manifest returned: a collection goes on to the blobs after, and a
  recomputation may start before it ends);
- redundant: the node had been committed by an earlier execution and no deletion explains it
  (two collaborators computing one node at once, a committed node that lost a blob, a
  referenced manifest deleted). That is a defect, and the bar is zero.

A gc with grace 0 can take the blobs a writer put before its commit names them; gc.py says
writers must commit within ``grace`` of their puts, and then the commit refuses
(IncompleteManifestError) and the run is tried again: such a re-execution is a retry after a
failed execution, counted by cause, never hidden. The default ``GRACE`` (a few seconds) is real
(the throwaway experiments' blobs are collected while the soak runs) without being below a
writer's put-to-commit time under these fault rates.

The bar (``check: ...`` lines): nothing lost (every node of every collaborator's final
definition is complete at the end, before and after a last collection without faults, the
store verifies clean, every state is bit-exact against a reference computed here without
dagger, and no collection deleted a manifest a record named before it started); no node
executed redundantly; every run finished (with how many retries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script
import numpy as np

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store import faultproxy, gc, layout, records

COLLABORATORS = "ABC"
RUNS = 5
SIZE = 100_000  # float32 weights per state (400 kB)
WORK_SECONDS = 0.3  # what one recipe "computes" besides its numpy: keeps nodes in flight
GRACE = 5.0  # gc grace period (seconds)
MAX_ATTEMPTS = 8  # per run
THINK_SECONDS = 6.0  # between a collaborator's runs (looking at results): the gc gets its turn
PAIRS = ((0, 1), (1, 2), (2, 0))  # collaborators sharing a Prune variant
BUCKET = "dagger-bench-soak"

_ATTEMPT = ""  # "who experiment run attempt", set by the collaborator before each attempt


# -- the experiment ------------------------------------------------------------------------------


def initial(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SIZE).astype("f4")


def train(w: np.ndarray, lr: float) -> np.ndarray:
    return (w * np.float32(1 - lr)).astype("f4")


def prune(w: np.ndarray, fraction: float) -> np.ndarray:
    w = w.copy()
    w[np.abs(w) < np.quantile(np.abs(w), fraction)] = 0
    return w


class State(dg.ExperimentState):
    PROPERTIES = ["seed"]
    NONHASHED_ATTRIBUTES = ["weights"]

    def initialize_state(self, **kwargs: Any) -> None:
        _log(self.key)
        self.weights = initial(self.seed)
        time.sleep(WORK_SECONDS)


class Train(dg.Recipe):
    PROPERTIES = ["lr"]

    def run(self, state: State) -> State:
        _log(state.key)
        state.weights = train(state.weights, self.lr)
        time.sleep(WORK_SECONDS)
        return state


class Prune(dg.Recipe):
    PROPERTIES = ["fraction"]

    def run(self, state: State) -> State:
        _log(state.key)
        state.weights = prune(state.weights, self.fraction)
        time.sleep(WORK_SECONDS)
        return state


def _log(node_key: str) -> None:
    line = f"{time.time():.6f} {_ATTEMPT} {node_key}\n".encode()
    fd = os.open(os.environ["SOAK_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)  # one short O_APPEND write: lines from every process stay whole
    finally:
        os.close(fd)


def shared_lr(step: int) -> float:
    return round(0.01 * (step + 1), 3)


def own_lr(who: int, step: int) -> float:
    return round(0.1 + 0.1 * who + 0.01 * step, 3)


Chain = tuple[tuple[str, float], ...]


def define(exp: dg.Experiment, who: int, run: int) -> dict[ds.NodeKey, Chain]:
    """Collaborator ``who``'s sweep as of run ``run``; each node key with how it is computed."""
    chains: dict[ds.NodeKey, Chain] = {}
    root = exp.spawn_new_tree(seed=0)
    chains[root.key] = ()
    for step in range(run + 1):
        with exp.tag("shared"):
            trained = Train(lr=shared_lr(step))(root)
            chains[trained.key] = (("train", shared_lr(step)),)
            chains[Prune(fraction=0.5)(trained).key] = (*chains[trained.key], ("prune", 0.5))
        for p, pair in enumerate(PAIRS):
            if who in pair:
                fraction = round(0.2 + 0.1 * p, 3)
                with exp.tag(f"pair:{p}"):
                    node = Prune(fraction=fraction)(trained)
                chains[node.key] = (*chains[trained.key], ("prune", fraction))
        with exp.tag("own"):
            own = Train(lr=own_lr(who, step))(root)
            chains[own.key] = (("train", own_lr(who, step)),)
            chains[Prune(fraction=0.5)(own).key] = (*chains[own.key], ("prune", 0.5))
    return chains


def define_scratch(exp: dg.Experiment, who: int, run: int) -> dict[ds.NodeKey, Chain]:
    """The throwaway experiment of run ``run``: the own Train node of run ``run + 1``."""
    root = exp.spawn_new_tree(seed=0)
    trained = Train(lr=own_lr(who, run + 1))(root)
    return {root.key: (), trained.key: (("train", own_lr(who, run + 1)),)}


def expected(chain: Chain) -> np.ndarray:
    w = initial(0)
    for op, value in chain:
        w = train(w, value) if op == "train" else prune(w, value)
    return w


# -- the programs --------------------------------------------------------------------------------


def error_causes(exc: BaseException) -> list[str]:
    """What an attempt died of: one cause per failed node for a RunError, else the type."""
    if isinstance(exc, dg.RunError):
        causes = []
        for failure in exc.failures:
            found = re.search(r"failed: ([A-Za-z_.]+): ?(.*)", failure, re.S)
            name, message = (found.group(1), found.group(2)) if found else ("?", failure)
            if name == "NotFoundError" and message.startswith("no blob"):
                name = "NotFoundError (no blob)"
            causes.append(name)
        return causes
    return [type(exc).__name__]


def collaborate(who: int, work: Path, store_url: str, options: dict[str, Any]) -> None:
    """One collaborator's program: five runs, each retried until it finishes."""
    global _ATTEMPT
    letter = COLLABORATORS[who]
    location: dict[str, Any] = {
        "store": store_url,
        "storage_options": options,
        "cache_dir": False,
    }
    out = open(work / f"attempts-{letter}.jsonl", "a")  # noqa: SIM115  (closed at exit)

    def note(**entry: Any) -> None:
        out.write(json.dumps(entry) + "\n")
        out.flush()

    def attempt_loop(experiment: str, run: int, body: Any) -> bool:
        global _ATTEMPT
        for attempt in range(MAX_ATTEMPTS):
            _ATTEMPT = f"{letter} {experiment} {run} {attempt}"
            started = time.time()
            try:
                report = body()
            except Exception as exc:
                report = exc.report if isinstance(exc, dg.RunError) else None
                note(
                    who=letter, experiment=experiment, run=run, attempt=attempt,
                    started=started, ended=time.time(), ok=False,
                    causes=error_causes(exc),
                    message=f"{type(exc).__name__}: {exc}"[:2000],
                    trace=traceback.format_exc()[-4000:],
                    executed=[k.hex for k in report.executed] if report else None,
                    failed=[k.hex for k in report.failed] if report else None,
                    waited=[k.hex for k in report.waited] if report else None,
                )  # fmt: skip
                time.sleep(0.5)
                continue
            note(
                who=letter, experiment=experiment, run=run, attempt=attempt,
                started=started, ended=time.time(), ok=True, causes=[],
                executed=[k.hex for k in report.executed] if report else [],
                failed=[], waited=[k.hex for k in report.waited] if report else [],
            )  # fmt: skip
            return True
        return False

    for run in range(RUNS):
        name = f"{letter}-main"

        def main_run(run: int = run, name: str = name) -> dg.RunReport:
            exp = dg.Experiment(work / name, State, name=name, **location)
            define(exp, who, run)
            return exp.run("threads")

        attempt_loop(name, run, main_run)

        scratch = f"{letter}-scratch-{run}"

        def scratch_run(run: int = run, scratch: str = scratch) -> dg.RunReport:
            exp = dg.Experiment(work / scratch, State, name=scratch, **location)
            define_scratch(exp, who, run)
            report = exp.run("threads")
            with contextlib.suppress(ds.NotFoundError):  # a retry: deleted already
                gc.delete_experiment(exp.store, scratch)
            return report

        attempt_loop(scratch, run, scratch_run)
        time.sleep(THINK_SECONDS)
    _ATTEMPT = ""
    out.close()


def timing_deletions(backend: Any) -> dict[str, float]:
    """Wrap ``backend``'s deletions (this program's own instance): node hex -> when the call
    that deleted its manifest returned. A collection deletes manifests first, blobs after:
    its end is later than the deletion a recomputation may rightly follow."""
    deleted_at: dict[str, float] = {}

    def note(keys: list[str], done: list[bool]) -> None:
        now = time.time()
        for key, ok in zip(keys, done, strict=True):
            node = layout.manifest_node(key) if ok and key.startswith(layout.MANIFESTS) else None
            if node is not None:
                deleted_at.setdefault(node.hex, now)

    real_delete, real_delete_many = backend.delete, backend.delete_many

    def delete(key: str, **options: Any) -> bool:
        done: bool = real_delete(key, **options)
        note([key], [done])
        return done

    def delete_many(keys: list[str], **options: Any) -> list[bool]:
        done: list[bool] = real_delete_many(keys, **options)
        note(list(keys), done)
        return done

    backend.delete, backend.delete_many = delete, delete_many
    return deleted_at


def collector(work: Path, store_url: str, options: dict[str, Any], every: float) -> None:
    """The collector's program: a collection every ``every`` seconds until told to stop."""
    store = ds.open_store(store_url, storage_options=options)
    deleted_at = timing_deletions(store.backend)
    stop = work / "stop"
    with open(work / "collections.jsonl", "a") as out:
        while not stop.exists():
            started = time.time()
            try:  # the collaborators' main experiments are never deleted: what they name stays
                roots = sorted(
                    key
                    for name in records.experiments(store)
                    if name.endswith("-main")
                    for record in records.read_records(store, name)
                    for key in record["keys"]
                )
            except Exception:
                roots = None  # the faults: this collection goes unchecked, not unrun
            entry: dict[str, Any] = {"started": time.time(), "roots": roots}
            try:
                report = gc.collect(store, grace=GRACE, keep_recent=0, dry_run=False)
                entry.update(
                    manifests=[k.hex for k in report.manifests],
                    deleted_at={k.hex: deleted_at[k.hex] for k in report.manifests},
                    blobs=len(report.blobs),
                    bytes=report.deleted_bytes,
                    problems=list(report.problems),
                    kept_manifests=dict(report.kept_manifests),
                )
            except Exception as exc:
                entry.update(error=type(exc).__name__, message=str(exc)[:500])
            entry["ended"] = time.time()
            out.write(json.dumps(entry) + "\n")
            out.flush()
            time.sleep(max(0.0, every - (time.time() - started)))


# -- the soak ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def classify(
    executions: list[tuple[float, str, str, int, int, str]],
    attempts: list[dict[str, Any]],
    collections: list[dict[str, Any]],
) -> tuple[Counter[str], list[str]]:
    """Each execution's kind (see the module docstring), and a line per redundant one."""
    outcome: dict[tuple[str, int, int, str], str] = {}
    for a in attempts:
        where = (a["experiment"], a["run"], a["attempt"])
        for key in a["executed"] or []:
            outcome[(*where, key)] = "committed"
        for key in a["failed"] or []:
            outcome[(*where, key)] = "failed:" + ",".join(sorted(set(a["causes"])))
    deleted: dict[str, list[float]] = defaultdict(list)  # node hex -> its manifest deleted
    for c in collections:
        for key in c.get("manifests", []):
            deleted[key].append(c["deleted_at"][key])
    by_key: dict[str, list[tuple[float, str, int, int]]] = defaultdict(list)
    for when, _, experiment, run, attempt, key in executions:
        by_key[key].append((when, experiment, run, attempt))
    kinds: Counter[str] = Counter()
    redundant: list[str] = []
    for key, runs in by_key.items():
        runs.sort()
        committed_at: float | None = None
        for n, (when, experiment, run, attempt) in enumerate(runs):
            result = outcome.get((experiment, run, attempt, key), "failed:no report")
            if n == 0:
                kinds["first execution"] += 1
            elif committed_at is None:
                kinds["retry, after a failed execution"] += 1
            elif any(committed_at < t < when for t in deleted.get(key, [])):
                kinds["recomputed after gc took it unreferenced"] += 1
            else:
                kinds["REDUNDANT (committed before)"] += 1
                redundant.append(
                    f"node {key[:12]}: executed by {experiment} run {run} attempt {attempt} "
                    f"at {when:.3f} although committed at {committed_at:.3f} ({result})"
                )
            if result == "committed":
                committed_at = when
    return kinds, redundant


@contextlib.contextmanager
def programs(commands: list[list[str]], env: dict[str, str]) -> Iterator[list[subprocess.Popen]]:
    started = [subprocess.Popen(c, env=env) for c in commands]
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def soak(args: argparse.Namespace, work: Path) -> bool:
    import s3fs  # slow to import; only needed here

    log = work / "executions.log"
    log.touch()
    checks: dict[str, bool] = {}
    with common.moto_server(work) as server:
        direct = server.storage_options
        fs = s3fs.S3FileSystem(**direct, skip_instance_cache=True)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        store_url = f"s3://{BUCKET}/store"
        with faultproxy.FaultProxy(server.endpoint, seed=args.seed) as proxy:
            options = {**direct, "endpoint_url": proxy.url}
            rate = args.fault_rate / len(faultproxy.KINDS)
            proxy.inject(dict.fromkeys(faultproxy.KINDS, rate))
            env = {**os.environ, "SOAK_LOG": str(log)}
            base = [sys.executable, __file__, "--work", str(work), "--store", store_url]
            base += ["--options", json.dumps(options)]
            sweeper = [*base, "--role", "gc", "--gc-every", str(args.gc_every)]
            people = [[*base, "--role", f"collaborator:{i}"] for i in range(3)]
            start = time.perf_counter()
            with programs([sweeper, *people], env) as running:
                deadline = time.monotonic() + args.timeout
                for p in running[1:]:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                soak_seconds = time.perf_counter() - start
                (work / "stop").touch()
                running[0].wait(timeout=300)
            exit_codes = [p.returncode for p in running]
            proxy.inject()
            requests, faults = Counter(proxy.requests), Counter(proxy.faults)

        # -- after the soak: faults off, a direct view of the store ----------------------------
        store = ds.open_store(store_url, storage_options=direct)
        attempts = [a for who in COLLABORATORS for a in read_jsonl(work / f"attempts-{who}.jsonl")]
        collections = read_jsonl(work / "collections.jsonl")
        executions = []
        for line in log.read_text().splitlines():
            when, who, experiment, run, attempt, key = line.split()
            executions.append((float(when), who, experiment, int(run), int(attempt), key))
        kinds, redundant = classify(executions, attempts, collections)

        # Nothing lost: every node of each collaborator's final definition, and its state.
        reference: dict[ds.NodeKey, Chain] = {}
        scratch_only: set[ds.NodeKey] = set()
        final_keys: list[ds.NodeKey] = []
        with tempfile.TemporaryDirectory(dir=work) as scratch_dir:
            for who in range(3):
                exp = dg.Experiment(Path(scratch_dir) / f"d{who}", State)
                chains = define(exp, who, RUNS - 1)
                reference.update(chains)
                final_keys += chains
                for run in range(RUNS):
                    exp = dg.Experiment(Path(scratch_dir) / f"s{who}{run}", State)
                    scratch_only |= set(define_scratch(exp, who, run))
        scratch_only -= set(final_keys)
        distinct_final = sorted(set(final_keys), key=lambda k: k.hex)
        missing_before = store.missing(distinct_final)
        report = gc.collect(store, grace=0, keep_recent=0, dry_run=False)
        missing_after = store.missing(distinct_final)
        verified = store.verify()
        exact, compared = 0, 0
        for who in COLLABORATORS:
            name = f"{who}-main"
            again = dg.Experiment.restore(
                work / name, store=store_url, storage_options=direct, cache_dir=False,
                state_class=State,
            )  # fmt: skip
            for node in again.graph.nodes:
                compared += 1
                state = node.restore()
                want = expected(reference[node.key])
                exact += state.weights.dtype == want.dtype and (
                    state.weights.tobytes() == want.tobytes()
                )
        referenced_deleted = [
            key
            for c in collections
            if c.get("roots") is not None
            for key in set(c.get("manifests", [])) & set(c["roots"])
        ]
        runs_finished = {(a["experiment"], a["run"]) for a in attempts if a["ok"]}
        main_wanted = {(f"{w}-main", r) for w in COLLABORATORS for r in range(RUNS)}
        failed_attempts = [a for a in attempts if not a["ok"]]
        causes = Counter(c for a in failed_attempts for c in a["causes"])
        gc_done = [c for c in collections if "error" not in c]
        gc_errors = Counter(c["error"] for c in collections if "error" in c)
        per_key = Counter(key for *_, key in executions)

    # -- the table -------------------------------------------------------------------------------
    print(
        f"3 collaborators x {RUNS} runs (+ a throwaway experiment each run), "
        f"{len(reference)} distinct nodes in the final definitions, {WORK_SECONDS} s of work "
        f"per node; faults {args.fault_rate:.1%} of requests (seed {args.seed}); "
        f"gc every {args.gc_every} s, grace {GRACE} s, keep_recent 0"
    )
    total_faults = sum(faults.values())
    rows = [
        ("soak wall time", f"{soak_seconds:.1f} s"),
        ("S3 requests through the proxy", str(sum(requests.values()))),
        ("  by method", ", ".join(f"{m} {n}" for m, n in sorted(requests.items()))),
        ("faults injected", str(total_faults)),
        ("  by kind", ", ".join(f"{k} {n}" for k, n in sorted(faults.items())) or "-"),
        ("runs finished (main)", f"{len(runs_finished & main_wanted)} / {len(main_wanted)}"),
        ("runs finished (throwaway)", f"{len(runs_finished - main_wanted)} / {3 * RUNS}"),
        ("attempts", str(len(attempts))),
        ("attempts failed and retried", str(len(failed_attempts))),
        ("  errors by type", ", ".join(f"{c} {n}" for c, n in sorted(causes.items())) or "-"),
        ("recipe executions", str(len(executions))),
        ("distinct nodes executed", str(len(per_key))),
        *((f"  {kind}", str(n)) for kind, n in sorted(kinds.items())),
        ("nodes executed more than once", str(sum(1 for n in per_key.values() if n > 1))),
        ("collections done", f"{len(gc_done)} ({len(collections)} started)"),
        ("  gc errors by type", ", ".join(f"{e} {n}" for e, n in sorted(gc_errors.items())) or "-"),
        ("  manifests deleted", str(sum(len(c["manifests"]) for c in gc_done))),
        ("  blobs deleted", str(sum(c["blobs"] for c in gc_done))),
        ("  bytes deleted", f"{sum(c['bytes'] for c in gc_done) / 1e6:.1f} MB"),
        ("  collections with problems", str(sum(1 for c in gc_done if c["problems"]))),
        ("  unchecked (roots unread)", str(sum(1 for c in collections if c["roots"] is None))),
        (
            "final collection (no faults)",
            f"{len(report.manifests)} manifests, {len(report.blobs)} blobs deleted",
        ),
        ("final nodes missing (before/after it)", f"{len(missing_before)} / {len(missing_after)}"),
        ("states bit-exact", f"{exact} / {compared}"),
        ("store verify", "clean" if verified.ok else f"{len(verified.problems)} problems"),
    ]
    common.print_table(("figure", "value"), rows)

    checks["every program exited 0"] = exit_codes == [0, 0, 0, 0]
    checks["nothing lost: final definitions complete, before and after a last gc"] = (
        not missing_before and not missing_after
    )
    checks["nothing lost: no collection deleted a manifest a record named"] = not referenced_deleted
    checks["nothing lost: store verifies clean"] = verified.ok
    checks["nothing lost: every state bit-exact"] = exact == compared and compared == 3 * 31
    checks["no node executed redundantly (twice once committed)"] = not redundant
    checks["every run finished (retries included)"] = main_wanted <= runs_finished
    checks["the collector collected (throwaway nodes, at least once)"] = any(
        ds.NodeKey(k) in scratch_only for c in gc_done for k in c["manifests"]
    )
    checks["faults were injected"] = total_faults > 0
    for line in redundant:
        print(f"  redundant: {line}")
    for a in failed_attempts:
        if args.verbose:
            print(f"  failed attempt {a['experiment']} run {a['run']}: {a['message'][:300]}")
    for referenced in referenced_deleted:
        print(f"  referenced manifest deleted: {referenced[:12]}")
    if not verified.ok:
        for problem in verified.problems[:10]:
            print(f"  verify: {problem}")
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'WRONG'}")
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fault-rate", type=float, default=0.03, help="share of requests faulted")
    parser.add_argument("--seed", type=int, default=20261201, help="the proxy's fault seed")
    parser.add_argument("--gc-every", type=float, default=3.0, help="seconds between collections")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (seconds)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--verbose", action="store_true", help="print every failed attempt")
    common.add_work_dir(parser)
    # The programs the soak starts (internal).
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        options = json.loads(args.options)
        if args.role == "gc":
            collector(args.work, args.store, options, args.gc_every)
        else:
            collaborate(int(args.role.split(":")[1]), args.work, args.store, options)
        return
    work = Path(tempfile.mkdtemp(prefix="dagger-bench-soak-", dir=args.work_dir))
    try:
        ok = soak(args, work)
    finally:
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
