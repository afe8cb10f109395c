"""Benchmark the shared-lab operations: verify throughput, and garbage collection at scale.

Run by hand (``python benchmarks/bench_lab.py``), never in CI. Figures, measured side by side in
this one run (the machines are shared and noisy: compare ratios, not absolute times):

1. ``Store.verify()`` of a local store holding ``--size-gib`` of data (one dense float32 array:
   raw 8 MiB leaves, as trained weights are stored) against reading the same objects' bytes raw,
   (a) each file whole into new ``bytes`` (what a read that returns bytes costs) and (b) each
   file into one reused buffer (the fastest plain read). Page cache warm for all; one untimed
   warm-up, then ``--repeat`` alternating rounds, best kept. Ratio: verify's throughput over
   the baseline's.
2. ``gc.collect`` on a store of ``--manifests`` manifests, locally and on S3 (a moto_server on
   127.0.0.1, started here): each manifest names one unique 1 KiB blob and one of 100 shared
   ones (each shared blob is named by referenced and unreferenced manifests alike), and half
   of the manifests are referenced by an experiment record. ``keep_recent=0``
   and ``grace=0`` make every unreferenced object collectable. Dry run: best of ``--repeat``
   (local) or ``--s3-repeat`` (S3); then one real run, which deletes the unreferenced half of
   the manifests and their unique blobs. The first dry run is a machine's first collection
   of the store (the cache folder starts empty): it reads every kept manifest; what it reads,
   it remembers (``dagger_store/marks.py``), so the real run after it reads only what it did not
   (manifests younger than ``marks.SETTLE`` then). The store is built by writing the objects
   directly and concurrently (what ``commit`` writes, minus its existence checks). On S3 the
   real run deletes in batches (``delete_many``: an age check by listing or HEADs, then one
   DeleteObjects per 1,000 keys); its baseline is the same real run on a second bucket built
   alike, through a backend without ``delete_many``, so that gc deletes key by key (a HEAD,
   then a DELETE, per object) as it did before (``--skip-s3-baseline`` skips it). "of which
   deleting" is the wall time gc spent in its deletions; the requests are counted through
   botocore's event hooks on the s3fs client. Ratio: dagger's time over the baseline's.

Scratch data lives in a temporary folder on the real disk (not /tmp, which may be tmpfs),
removed at the end. Exit status is 0: this is a report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script
import numpy as np

import dagger_store as ds
import dagger_store.gc as gc_module
from dagger_store.backends.base import Buffer, Entry
from dagger_store.gc import GcReport, collect
from dagger_store.layout import BLOBS, manifest_key
from dagger_store.records import add_record

GIB = 2**30
GB = 1e9
SHARED_BLOBS = 100
UNIQUE_SIZE = 1024


def best(repeat: int, steps: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall time of each step over ``repeat`` alternating rounds, after one warm-up."""
    times = dict.fromkeys(steps, float("inf"))
    for round_ in range(-1, repeat):
        for name, step in steps.items():
            os.sync()
            start = time.perf_counter()
            step()
            if round_ >= 0:
                times[name] = min(times[name], time.perf_counter() - start)
    return times


def gbps(size: int, seconds: float) -> str:
    return f"{size / seconds / GB:.2f} GB/s"


def seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1000:.0f} ms"


# -- 1. verify -----------------------------------------------------------------------------------


def measure_verify(work: Path, size: int, repeat: int) -> tuple[list[list[str]], bool]:
    data = np.random.default_rng(0).standard_normal(size // 4, dtype=np.float32)
    with ds.open_store(work / "verify-store") as store:
        digest = store.put(data)
        store.commit(ds.node_key("bench", {"verify": size}), ds.Manifest({"weights": digest}))
        del data
        files = sorted(p for p in (work / "verify-store" / BLOBS).rglob("*") if p.is_file())
        stored = sum(p.stat().st_size for p in files)
        buffer = bytearray(max(p.stat().st_size for p in files))
        view = memoryview(buffer)
        reports: list[ds.VerifyReport] = []

        def read_whole() -> None:
            for path in files:
                path.read_bytes()

        def read_into() -> None:
            for path in files:
                with open(path, "rb", buffering=0) as f:
                    f.readinto(view)

        t = best(
            repeat,
            {
                "bytes": read_whole,
                "readinto": read_into,
                "verify": lambda: reports.append(store.verify()),
            },
        )
    ok = all(r.ok and r.blobs == len(files) for r in reports)
    label = f"verify() of a {stored / GIB:.2f} GiB local store ({len(files)} objects)"
    rows = [
        [label, gbps(stored, t["verify"]), gbps(stored, t["bytes"]), "each file into new bytes",
         f"{t['bytes'] / t['verify']:.2f}"],
        ["", "", gbps(stored, t["readinto"]), "each file into one buffer",
         f"{t['readinto'] / t['verify']:.2f}"],
    ]  # fmt: skip
    return rows, ok


# -- 2. collect ----------------------------------------------------------------------------------


def populate(store: ds.Store, manifests: int, threads: int) -> tuple[float, list[ds.NodeKey]]:
    """Write ``manifests`` manifests and their blobs directly; (seconds, referenced keys)."""
    rng = np.random.default_rng(1)
    shared = [rng.bytes(UNIQUE_SIZE) for _ in range(SHARED_BLOBS)]
    unique = [rng.bytes(UNIQUE_SIZE) for _ in range(manifests)]
    backend = store.backend
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        shared_digests = list(pool.map(store.put, shared))

        def one(i: int) -> ds.NodeKey:
            digest = store.put(unique[i])
            key = ds.node_key("bench", {"manifest": i})
            shared_digest = shared_digests[i // 2 % SHARED_BLOBS]  # referenced and not alike
            manifest = ds.Manifest({"unique": digest, "shared": shared_digest})
            backend.write_once(manifest_key(key), manifest.encode())
            return key

        keys = list(pool.map(one, range(manifests)))
    referenced = keys[::2]
    add_record(store, "bench", "def", referenced, {"note": "half of the manifests"})
    return time.perf_counter() - start, referenced


class PerKeyDeletes:
    """A backend without ``delete_many``: gc then deletes key by key (the baseline)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.remote = inner.remote

    def trusted_by_location(self) -> bool:
        return bool(self.inner.trusted_by_location())

    def read(self, key: str) -> bytes:
        return bytes(self.inner.read(key))

    def read_into(self, key: str, offset: int, out: memoryview) -> int:
        return int(self.inner.read_into(key, offset, out))

    def write_once(self, key: str, *parts: Buffer) -> bool:
        return bool(self.inner.write_once(key, *parts))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return list(self.inner.exists_many(keys))

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return iter(self.inner.iter_keys(prefix))

    def iter_entries(self, prefix: str = "") -> Iterator[Entry]:
        return iter(self.inner.iter_entries(prefix))

    def delete(self, key: str, *, modified_before: float | None = None) -> bool:
        return bool(self.inner.delete(key, modified_before=modified_before))

    def touch(self, key: str) -> bool:
        return bool(self.inner.touch(key))


@contextmanager
def deleting_time() -> Iterator[list[float]]:
    """The wall time gc spends in its deletions meanwhile (``[seconds]``, filled on exit)."""
    spent = [0.0]
    delete = gc_module._delete

    def timed(
        store: ds.Store, entries: list[Entry], cutoff: float, listed_at: float | None = None
    ) -> list[bool]:
        start = time.perf_counter()
        try:
            return delete(store, entries, cutoff, listed_at)
        finally:
            spent[0] += time.perf_counter() - start

    gc_module._delete = timed
    try:
        yield spent
    finally:
        gc_module._delete = delete


@contextmanager
def s3_requests(store: ds.Store) -> Iterator[Counter[str]]:
    """The requests the store's S3 client makes meanwhile, by operation (botocore's event
    hooks: every request still goes to the server); empty for other backends."""
    made: Counter[str] = Counter()
    fs = getattr(getattr(store.backend, "inner", store.backend), "fs", None)
    if fs is None:
        yield made
        return

    def count(model: Any, **kwargs: Any) -> None:
        made[model.name] += 1

    events = fs.s3.meta.events
    events.register("before-parameter-build.s3", count)
    try:
        yield made
    finally:
        events.unregister("before-parameter-build.s3", count)


def requests_note(made: Counter[str]) -> str:
    if not made:
        return ""
    checks = made["ListObjectsV2"], made["HeadObject"]
    deletes = made["DeleteObjects"] + made["DeleteObject"]
    kind = "DeleteObjects" if made["DeleteObjects"] else "DeleteObject"
    return f"{deletes:,} {kind}; {checks[0]:,} LIST + {checks[1]:,} HEAD in the run"


def real_run(store: ds.Store) -> tuple[GcReport, float, float, Counter[str]]:
    """One real collection: its report, wall time, time spent deleting, requests made."""
    with deleting_time() as deleting, s3_requests(store) as made:
        start = time.perf_counter()
        report = collect(store, grace=0, keep_recent=0, dry_run=False)
        took = time.perf_counter() - start
    return report, took, deleting[0], made


def measure_collect(
    store: ds.Store,
    where: str,
    manifests: int,
    repeat: int,
    threads: int,
    baseline: ds.Store | None = None,
) -> tuple[list[list[str]], bool]:
    print(f"  populating {manifests:,} manifests {where} ...", flush=True)
    built, referenced = populate(store, manifests, threads)
    blobs = len(list(store.backend.iter_keys(BLOBS)))
    print(f"  built in {built:.1f} s", flush=True)
    if baseline is not None:
        print("  populating the baseline's store ...", flush=True)
        print(f"  built in {populate(baseline, manifests, threads)[0]:.1f} s", flush=True)
    print("  collecting ...", flush=True)
    dry: list[GcReport] = []
    t = best(repeat, {"dry": lambda: dry.append(collect(store, grace=0, keep_recent=0))})
    expected_gone = manifests - len(referenced)
    base_real: GcReport | None = None
    if baseline is not None:
        print("  real run, baseline (key by key) ...", flush=True)
        with ds.Store(PerKeyDeletes(baseline.backend), workers=16) as per_key:
            base_real, base_time, base_deleting, base_made = real_run(per_key)
    print("  real run ...", flush=True)
    real, real_time, deleting, made = real_run(store)
    ok = (
        all(len(r.manifests) == expected_gone and len(r.blobs) == expected_gone for r in dry)
        and len(real.manifests) == expected_gone
        and len(real.blobs) == expected_gone
        and store.missing(referenced) == []
        and len(list(store.backend.iter_keys(BLOBS))) == blobs - expected_gone
        and (base_real is None or len(base_real.blobs) == expected_gone)
    )
    real_row = [
        f"collect, real run, {where}",
        seconds(real_time),
        "",
        f"{len(real.manifests):,} manifests + {len(real.blobs):,} blobs deleted",
        "",
    ]
    deleting_row = [f"  of which deleting, {where}", seconds(deleting), "", requests_note(made), ""]
    rows = [
        [f"populate {manifests:,} manifests + {blobs:,} blobs, {where}", seconds(built), "",
         f"{threads} threads", ""],
        [f"collect, dry run, {where}", seconds(t["dry"]), "",
         f"{manifests / t['dry']:,.0f} manifests/s", ""],
        real_row,
        deleting_row,
    ]  # fmt: skip
    if baseline is not None:
        real_row[2], real_row[4] = seconds(base_time), f"{real_time / base_time:.2f}"
        deleting_row[2], deleting_row[4] = seconds(base_deleting), f"{deleting / base_deleting:.2f}"
        rows.append(["  baseline: key by key, deleting", "", seconds(base_deleting),
                     requests_note(base_made), ""])  # fmt: skip
    return rows, ok


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="verify: data (1 GiB)")
    parser.add_argument("--manifests", type=int, default=10_000, help="collect: (10,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds, best kept (3)")
    parser.add_argument("--s3-repeat", type=int, default=1, help="S3 dry runs, best kept (1)")
    parser.add_argument("--skip-s3", action="store_true", help="skip the moto_server figures")
    parser.add_argument(
        "--skip-s3-baseline",
        action="store_true",
        help="skip the key-by-key deletion baseline on S3 (it builds a second store)",
    )
    common.add_work_dir(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * GIB) // 4 * 4
    work = Path(tempfile.mkdtemp(prefix="dagger-bench-lab-", dir=args.work_dir))
    # gc remembers what manifests name (dagger_store/marks.py) in the user's cache: start empty.
    os.environ["DAGGER_CACHE_DIR"] = str(work / "cache")
    print(
        f"dagger lab benchmark: {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}; scratch {work}",
        flush=True,
    )
    rows: list[list[str]] = []
    checks: dict[str, bool] = {}
    try:
        print("verify ...", flush=True)
        verify_rows, checks["verify finds the store sound"] = measure_verify(
            work, size, args.repeat
        )
        rows += verify_rows
        print("collect, local ...", flush=True)
        with ds.open_store(work / "gc-store") as store:
            local_rows, checks["local collect deletes exactly the unreferenced half"] = (
                measure_collect(store, "local", args.manifests, args.repeat, 8)
            )
        rows += local_rows
        if args.skip_s3:
            print("collect, S3: skipped (--skip-s3)", flush=True)
        else:
            print("collect, S3 (moto_server) ...", flush=True)
            import s3fs  # slow to import; only needed here

            with common.moto_server(work) as server:
                options: dict[str, Any] = server.storage_options
                fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
                fs.call_s3("create_bucket", Bucket="dagger-bench-lab")
                baseline = None
                if not args.skip_s3_baseline:
                    fs.call_s3("create_bucket", Bucket="dagger-bench-lab-baseline")
                    baseline = ds.open_store(
                        "s3://dagger-bench-lab-baseline/store", storage_options=options
                    )
                with ds.open_store("s3://dagger-bench-lab/store", storage_options=options) as s3:
                    s3_rows, checks["S3 collect deletes exactly the unreferenced half"] = (
                        measure_collect(
                            s3, "S3 (moto)", args.manifests, args.s3_repeat, 32, baseline
                        )
                    )
                if baseline is not None:
                    baseline.close()
                rows += s3_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    common.print_table(["figure", "dagger", "baseline", "note", "ratio"], rows)
    print(
        "ratio = verify throughput / baseline throughput (both from the page cache); for gc,\n"
        "dagger's time / the baseline's (deleting key by key).\n"
        f"Load average at the end: {os.getloadavg()[0]:.2f}."
    )
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'WRONG'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
