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
   the manifests and their unique blobs. The store is built by writing the objects directly
   and concurrently (what ``commit`` writes, minus its existence checks).

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script
import numpy as np

import dagger_store as ds
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


def measure_collect(
    store: ds.Store, where: str, manifests: int, repeat: int, threads: int
) -> tuple[list[list[str]], bool]:
    print(f"  populating {manifests:,} manifests {where} ...", flush=True)
    built, referenced = populate(store, manifests, threads)
    blobs = len(list(store.backend.iter_keys(BLOBS)))
    print(f"  built in {built:.1f} s; collecting ...", flush=True)
    dry: list[GcReport] = []
    t = best(repeat, {"dry": lambda: dry.append(collect(store, grace=0, keep_recent=0))})
    start = time.perf_counter()
    real = collect(store, grace=0, keep_recent=0, dry_run=False)
    real_time = time.perf_counter() - start
    expected_gone = manifests - len(referenced)
    ok = (
        all(len(r.manifests) == expected_gone and len(r.blobs) == expected_gone for r in dry)
        and len(real.manifests) == expected_gone
        and len(real.blobs) == expected_gone
        and store.missing(referenced) == []
        and len(list(store.backend.iter_keys(BLOBS))) == blobs - expected_gone
    )
    rows = [
        [f"populate {manifests:,} manifests + {blobs:,} blobs, {where}", seconds(built), "",
         f"{threads} threads", ""],
        [f"collect, dry run, {where}", seconds(t["dry"]), "",
         f"{manifests / t['dry']:,.0f} manifests/s", ""],
        [f"collect, real run, {where}", seconds(real_time), "",
         f"{len(real.manifests):,} manifests + {len(real.blobs):,} blobs deleted", ""],
    ]  # fmt: skip
    return rows, ok


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="verify: data (1 GiB)")
    parser.add_argument("--manifests", type=int, default=10_000, help="collect: (10,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds, best kept (3)")
    parser.add_argument("--s3-repeat", type=int, default=1, help="S3 dry runs, best kept (1)")
    parser.add_argument("--skip-s3", action="store_true", help="skip the moto_server figures")
    common.add_work_dir(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * GIB) // 4 * 4
    work = Path(tempfile.mkdtemp(prefix="dagger-bench-lab-", dir=args.work_dir))
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
                with ds.open_store("s3://dagger-bench-lab/store", storage_options=options) as s3:
                    s3_rows, checks["S3 collect deletes exactly the unreferenced half"] = (
                        measure_collect(s3, "S3 (moto)", args.manifests, args.s3_repeat, 32)
                    )
                rows += s3_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    common.print_table(["figure", "dagger", "baseline", "note", "ratio"], rows)
    print(
        "ratio = verify throughput / baseline throughput (both from the page cache).\n"
        f"Load average at the end: {os.getloadavg()[0]:.2f}."
    )
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'WRONG'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
