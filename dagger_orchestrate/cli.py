"""``dagger-lab``: look after a (shared) store from the shell.

Named ``dagger-lab`` so as not to clash with the Dagger.io ``dagger`` CLI. The store comes from
``--store`` or ``$DAGGER_STORE``; S3 credentials from the usual AWS environment (never from a
flag, so they stay out of shell history and process lists).

Exit codes: 0 success; 1 the command ran and found problems (``verify``: corrupt or missing
objects); 2 bad usage; 3 the store could not be opened or an object was not found.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dagger_store as ds
from dagger_orchestrate.folder import MARKER as FOLDER_MARKER
from dagger_orchestrate.folder import Folder, absolute, is_url, open_folder
from dagger_orchestrate.graph import Graph
from dagger_orchestrate.state import ExperimentState
from dagger_store.layout import OBJECTS
from dagger_store.records import experiments, read_records
from dagger_store.units import format_bytes

OK, PROBLEMS, USAGE, STORE_ERROR = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dagger-lab`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE
    try:
        store = _open(args)
        result: int = args.run(store, args)
        return result
    except ds.NotFoundError as exc:
        print(f"dagger-lab: {exc}", file=sys.stderr)
        return STORE_ERROR
    except ds.StoreError as exc:
        print(f"dagger-lab: {exc}", file=sys.stderr)
        return STORE_ERROR
    except (ValueError, KeyError) as exc:
        print(f"dagger-lab: {exc}", file=sys.stderr)
        return USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dagger-lab",
        description="Inspect and maintain a dagger store (local folder, NFS or s3://).",
        epilog="exit codes: 0 ok, 1 problems found (verify), 2 bad usage, 3 store error",
    )
    parser.add_argument(
        "--store",
        help="store URL or path, or an experiment folder (default: $DAGGER_STORE, else the "
        "folder given as EXP)",
    )
    parser.add_argument("--endpoint-url", help="S3 endpoint (for S3-compatible servers)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[ds.Store, Any], int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    command("ls", _ls, "list the experiments that have records in the store")
    sub = command("tree", _tree, "an experiment's tree, with tags and cached/missing status")
    sub.add_argument("experiment", help="experiment name (see `ls`) or folder")
    sub = command("show", _show, "a node: recipe, properties, attributes, provenance")
    sub.add_argument("key", help="node key or a unique prefix of one")
    command("du", _du, "logical bytes (what manifests name) vs bytes stored: the dedup ratio")
    command("verify", _verify, "re-hash every object; exit 1 if any is corrupt or missing")
    sub = command("gc", _gc, "delete what no experiment, pin, lease or recent run refers to")
    sub.add_argument("--delete", action="store_true", help="really delete (default: dry run)")
    sub.add_argument("--grace", type=float, default=24 * 3600, help="blob age, s (24 h)")
    sub.add_argument(
        "--keep-recent", type=float, default=7 * 24 * 3600, help="manifest age, s (7 days)"
    )
    sub = command("pin", _pin, "keep nodes (and their blobs) through gc")
    sub.add_argument("name", help="a name for the pin")
    sub.add_argument("keys", nargs="+", help="node keys or unique prefixes")
    sub = command("unpin", _unpin, "remove a pin")
    sub.add_argument("name")
    sub = command("draw", _draw, "render an experiment's tree with Graphviz")
    sub.add_argument("experiment")
    sub.add_argument("-o", "--output", required=True, help="file to write, e.g. tree.svg")
    sub = command(
        "results", _results, "an experiment's results table: one row per node, with its "
        "properties, Function results and timings",
    )  # fmt: skip
    sub.add_argument("experiment", help="experiment name (see `ls`) or folder")
    sub.add_argument(
        "--format", choices=("table", "csv", "json"), default="table",
        help="an aligned text table (default), CSV, or JSON records",
    )  # fmt: skip
    sub.add_argument(
        "--filter", action="extend", nargs="+", default=[], metavar="TAG",
        help="only nodes with a tag matching every glob; '!pat': with no tag matching it",
    )  # fmt: skip
    sub = command(
        "report", _report, "write a self-contained HTML report: summary, the tree coloured by "
        "a result, the sortable results table, a plot",
    )  # fmt: skip
    sub.add_argument("experiment", help="experiment name (see `ls`) or folder")
    sub.add_argument("-o", "--output", required=True, help="file to write, e.g. report.html")
    sub.add_argument(
        "--color-by", metavar="COLUMN",
        help="colour the tree by this results column, or by tags: 'tag:GLOB' (default: the "
        "first numeric Function result)",
    )  # fmt: skip
    sub.add_argument("--x", metavar="COLUMN", help="the plot's x column (with --y)")
    sub.add_argument("--y", metavar="COLUMN", help="the plot's y column (with --x)")
    sub.add_argument("--hue", metavar="COLUMN", help="the plot's series column")
    sub = command(
        "repair", _repair, "list incomplete manifests (blobs lost outside gc) and corrupt "
        "objects, and which nodes a re-run of each experiment would recompute; exit 1 if any",
    )  # fmt: skip
    sub.add_argument(
        "experiment", nargs="?", help="only this experiment's nodes (name or folder; default: "
        "every experiment in the store)",
    )  # fmt: skip
    sub.add_argument(
        "--dry-run", action="store_true",
        help="only list; without it, also say how to recompute (dagger-lab never runs recipes)",
    )  # fmt: skip
    return parser


def _open(args: Any) -> ds.Store:
    url = args.store or os.environ.get("DAGGER_STORE")
    experiment = getattr(args, "experiment", None)
    if not url and experiment and (folder := _experiment_folder(experiment)) is not None:
        url = folder.store  # `dagger-lab tree runs/pruning`: the folder knows its store
    if not url:
        raise ValueError(
            "no store: pass --store (a store URL or path, or an experiment folder) or set "
            "DAGGER_STORE"
        )
    if (folder := _experiment_folder(url)) is not None:
        url = folder.store  # --store named an experiment folder: its store
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    return ds.open_store(url, storage_options=options, create=False)


def _ls(store: ds.Store, args: Any) -> int:
    names = experiments(store)
    if not names:
        print(f"no experiments in {store.url}")
    for name in names:
        runs = read_records(store, name, "run")
        nodes = {n["key"] for r in read_records(store, name, "def") for n in r["nodes"]}
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(runs[-1]["written"])) if runs else "-"
        print(f"{name:<40} {len(nodes):>6} nodes {len(runs):>5} runs   last run {last}")
    return OK


def _experiment_folder(location: str) -> Folder | None:
    """The experiment folder at a local path, or None if ``location`` is not one."""
    if is_url(location) or not os.path.isfile(os.path.join(location, FOLDER_MARKER)):
        return None
    return open_folder(absolute(location), {}, store=None, name=None, create=False)


def _graph(store: ds.Store, name: str) -> Graph:
    """The experiment's graph, from its records. No command loads a state, so none imports the
    state class either (importing would run the experiment's code)."""

    if name not in experiments(store) and (folder := _experiment_folder(name)) is not None:
        name = folder.name  # EXP may be the experiment's folder as well as its name
    if name not in experiments(store):
        raise ds.NotFoundError(
            f"no experiment {name!r} in {store.url}: give a name `ls` lists, or an experiment "
            "folder",
            key=name,
        )
    return Graph.from_records(store, name, ExperimentState)


def _tree(store: ds.Store, args: Any) -> int:
    graph = _graph(store, args.experiment)
    missing = set(store.missing([n.key for n in graph.nodes]))
    status = {n.key: "missing" if n.key in missing else "cached" for n in graph.nodes}
    print(graph.render(lambda node: status[node.key]))
    return OK


def _resolve(store: ds.Store, prefix: str) -> ds.NodeKey:
    found = [k for k in store.manifest_keys() if k.hex.startswith(prefix.lower())]
    if len(found) != 1:
        problem = f"{len(found)} nodes match" if found else "no node matches"
        raise ds.NotFoundError(f"{problem} {prefix!r} in {store.url}", key=prefix)
    return found[0]


def _show(store: ds.Store, args: Any) -> int:
    key = _resolve(store, args.key)
    manifest = store.get_manifest(key)
    node = manifest.meta.get("node", {})
    print(f"node        {key.hex}")
    print(f"label       {node.get('label', '?')}")
    print(f"class       {node.get('class', '?')}")
    print(f"parent      {node.get('parent') or '-'}")
    print("attributes")
    for name, spec in manifest.meta.get("attributes", {}).items():
        size = sum(
            d.size for n, d in manifest.blobs.items() if n.split("#")[0].split("@")[0] == name
        )
        shape = f"{spec['dtype']} {tuple(spec['shape'])}" if "shape" in spec else ""
        print(f"  {name:<20} {spec['codec']:<8} {shape:<24} {format_bytes(size):>10}")
    print("provenance")
    provenance = dict(manifest.meta.get("provenance", {}))

    def when(value: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value))

    def duration(value: Any) -> str:
        minutes, seconds = divmod(float(value), 60)
        if not minutes:
            return f"{seconds:.3f} s"
        hours, minutes = divmod(int(minutes), 60)
        return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:.0f} s"

    def package(value: Any) -> str:
        return f"{value} {provenance.pop('distribution_version', '')}".strip()

    readable: list[tuple[str, str, Callable[[Any], str]]] = [
        ("started", "started", when),
        ("finished", "finished", when),
        ("duration", "seconds", duration),
        ("host", "host", str),
        ("user", "user", str),
        ("pid", "pid", str),
        ("python", "python", str),
        ("platform", "platform", str),
        ("numpy", "numpy", str),
        ("torch", "torch", str),
        ("dagger-lab", "dagger_lab", str),
        ("package", "distribution", package),  # the code's installed distribution
        ("git commit", "git_commit", str),
        ("git dirty", "git_dirty", lambda d: "yes: the code differs from it" if d else "no"),
        ("peak memory", "peak_memory", lambda n: f"{format_bytes(n)} (the process's peak so far)"),
    ]
    for label, field, show in readable:
        if field in provenance:
            value = provenance.pop(field)
            try:
                text = show(value)
            except (TypeError, ValueError, OverflowError):
                text = str(value)  # a manifest from another version: shown as it is
            print(f"  {label:<12} {text}")
    for field, value in provenance.items():  # fields this version does not know
        print(f"  {field:<12} {value}")
    return OK


def _du(store: ds.Store, args: Any) -> int:
    logical = 0
    manifests = store.manifests(list(store.manifest_keys()))
    for manifest in manifests.values():
        logical += sum(d.size for d in manifest.blobs.values())
    entries = getattr(store.backend, "iter_entries", None)  # sizes from listings, no reads
    if entries is not None:
        stored = sum(e.size for e in entries(OBJECTS))
    else:
        stored = sum(len(store.backend.read(k)) for k in store.backend.iter_keys(OBJECTS))
    ratio = logical / stored if stored else 0.0
    holds = f"the store holds {format_bytes(stored)}"
    print(f"{len(manifests)} nodes name {format_bytes(logical)}; {holds}")
    print(f"dedup ratio {ratio:.2f}x")
    return OK


def _verify(store: ds.Store, args: Any) -> int:
    with _Status("verify") as status:
        report = store.verify(progress=status.update)
    for problem in report.problems:
        print(problem)
    print(
        f"{report.blobs} blob objects, {report.manifests} manifests: "
        f"{len(report.problems)} problems"
    )
    return OK if report.ok else PROBLEMS


def _gc(store: ds.Store, args: Any) -> int:
    from dagger_store.gc import collect

    with _Status("gc"):
        report = collect(
            store, grace=args.grace, keep_recent=args.keep_recent, dry_run=not args.delete
        )
    print(report)
    return OK


def _repair(store: ds.Store, args: Any) -> int:
    if args.experiment:
        name = args.experiment
        if name not in experiments(store) and (folder := _experiment_folder(name)) is not None:
            name = folder.name
        graphs = {name: _graph(store, name)}
    else:
        graphs = {name: _graph(store, name) for name in experiments(store)}
    scope = sorted({n.key for g in graphs.values() for n in g.nodes}) if args.experiment else None
    by_key = {name: {n.key: n for n in g.nodes} for name, g in graphs.items()}
    with _Status("repair"):
        lost = store.incomplete(scope)
        report = store.verify()
    corrupt = [p for p in report.problems if not any(p.startswith(f"manifest {k}:") for k in lost)]
    where = f"experiment {next(iter(graphs))} in {store.url}" if args.experiment else store.url
    print(f"{where}: {len(lost)} incomplete manifests, {len(corrupt)} corrupt objects")
    if lost:
        print("\nincomplete manifests (blobs they name are gone; the node is a cache miss):")
    for key in sorted(lost):
        names = [
            f"{name} ({nodes[key].label})" for name, nodes in by_key.items() if key in nodes
        ] or ["no experiment (gc collects it)"]
        print(f"  node {key.hex[:12]}  in {', '.join(names)}")
        for digest in lost[key]:
            print(f"    missing blob {digest}")
    if corrupt:
        print("\ncorrupt objects (a re-run does NOT repair these: their nodes still look cached):")
        complete = store.manifests([k for nodes in by_key.values() for k in nodes])
        for problem in corrupt:
            print(f"  {problem}")
            hex_ = problem.split(":", 1)[0].rsplit("/", 1)[-1]
            users = sorted(
                f"{k.hex[:12]} {nodes[k].label} ({name})"
                for name, nodes in by_key.items() for k in nodes
                if k in complete and any(d.hex == hex_ for d in complete[k].blobs.values())
            )  # fmt: skip
            for user in users:
                print(f"    named by node {user}")
    plans = []
    for name, graph in graphs.items():
        redo = [n for n in graph.nodes if n.key in lost]
        if not redo:
            continue
        kept = {d.key: d for n in redo for d in _descendants(n) if d.key not in lost}
        plans.append((name, redo, list(kept.values())))
    if plans:
        print("\na re-run would recompute:")
    for name, redo, after in plans:
        print(f"  experiment {name}: {len(redo)} node(s)")
        for node in redo:
            print(f"    {node.key.hex[:12]}  {node.label}")
        if after:
            hexes = [n.key.hex for n in redo]
            print(
                f"    their {len(after)} descendant(s) are complete and stay cached (they were "
                "computed from the lost state); to recompute them as well, in the script "
                "(descendants are included):\n"
                f"      exp.run(recompute=[dagger_store.NodeKey(h) for h in {hexes!r}])"
            )
    if not args.dry_run and (lost or corrupt):
        print("\nto repair (dagger-lab does not run your recipes):")
        for name, redo, _ in plans:
            keys = ", ".join(n.key.hex[:12] for n in redo)
            print(f"  run experiment {name} again (its script, exp.run()): nodes {keys} will be "
                  "recomputed, and their new manifests supersede the incomplete ones")  # fmt: skip
        orphans = [k for k in lost if not any(k in nodes for nodes in by_key.values())]
        if orphans:
            print(f"  {len(orphans)} incomplete node(s) belong to no experiment: nothing will "
                  "recompute them; `dagger-lab gc` collects them")  # fmt: skip
        if corrupt:
            print("  corrupt blobs: delete each object listed (it is read-only: make it writable "
                  "first), then re-run the experiments naming it; the nodes become incomplete "
                  "and are recomputed")  # fmt: skip
    return PROBLEMS if lost or corrupt else OK


def _descendants(node: Any) -> list[Any]:
    found, pending = [], list(node.children)
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(child.children)
    return found


def _pin(store: ds.Store, args: Any) -> int:
    from dagger_store.pins import pin

    keys = [_resolve(store, k) for k in args.keys]
    pin(store, args.name, keys)
    print(f"pinned {len(keys)} node(s) as {args.name!r}")
    return OK


def _unpin(store: ds.Store, args: Any) -> int:
    from dagger_store.pins import unpin

    unpin(store, args.name)
    print(f"unpinned {args.name!r}")
    return OK


def _draw(store: ds.Store, args: Any) -> int:
    try:
        _graph(store, args.experiment).draw(args.output)
    except RuntimeError as exc:  # no `dot` program: the message says how to get it
        print(f"dagger-lab: {exc}", file=sys.stderr)
        return USAGE
    print(f"wrote {args.output}")
    return OK


def _results(store: ds.Store, args: Any) -> int:
    from dagger_orchestrate.results import table, text_table

    graph = _graph(store, args.experiment)
    frame = table(graph, graph.nodes.filter(*args.filter))
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif args.format == "json":
        print(frame.to_json(orient="records", date_format="iso", indent=2))
    elif len(frame):
        print(text_table(frame))
    else:
        matching = f" match {' '.join(args.filter)}" if args.filter else ""
        print(f"no nodes in {graph.experiment}{matching}")
    return OK


def _report(store: ds.Store, args: Any) -> int:
    from dagger_orchestrate.plots import require_matplotlib
    from dagger_orchestrate.report import report_html
    from dagger_orchestrate.results import table

    graph = _graph(store, args.experiment)
    page = report_html(
        graph.nodes, table(graph), title=graph.experiment or args.experiment, store_url=store.url,
        color_by=args.color_by, x=args.x, y=args.y, hue=args.hue,
    )  # fmt: skip
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(page)
    except OSError as exc:
        print(f"dagger-lab: cannot write {args.output!r}: {exc}", file=sys.stderr)
        return USAGE
    try:
        require_matplotlib("the report's plot")
    except ImportError as exc:
        print(f"dagger-lab: {exc}; the report was written without it", file=sys.stderr)
    print(f"wrote {args.output} ({len(graph)} nodes)")
    return OK


class _Status:
    """On a terminal, a line on stderr saying what runs, how far (if known), and for how long."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._shown = sys.stderr.isatty()
        self._done = self._total = 0
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._show, daemon=True)

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total

    def _show(self) -> None:
        while True:
            count = f" {self._done:,}/{self._total:,}" if self._total else ""
            elapsed = time.monotonic() - self._start
            print(f"\r{self.what}{count}  {elapsed:.0f} s ", end="", file=sys.stderr, flush=True)
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> _Status:
        if self._shown:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self._stop.set()
            self._thread.join()
            print("\r\033[K", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
