"""dagger_store on its own: a lab's model weights in a content-addressed store.

Run: ``make demo`` (or ``python examples/store_demo.py [STORE_URL]``). The default store is the
embedded local one in ./demo-store; run it twice and the second run writes nothing new.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dagger_store as ds
from dagger_store.layout import blob_key

MIB = 2**20


def timed(label: str, nbytes: int, fn, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds * 1000:8.1f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    return result


def stored_bytes(store: ds.Store) -> int:
    return sum(len(store.backend.read(key)) for key in store.backend.iter_keys("v1/"))


def main(url: str) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(64 * MIB // 4 * 4).astype(np.float32)  # 256 MiB, dense
    pruned = weights.copy()
    pruned[np.abs(pruned) < np.quantile(np.abs(pruned[:1_000_000]), 0.5)] = 0.0  # 50% zeros

    with ds.open_store(url) as store:
        print(f"store: {store.url}")
        before = stored_bytes(store)

        print("blobs (hashed with BLAKE3, verified on every read):")
        size = weights.nbytes
        w = timed(f"put dense weights ({size // MIB} MiB)", size, store.put, weights)
        timed("put the same weights again (dedup)", weights.nbytes, store.put, weights)
        p = timed("put pruned weights (zstd where it pays)", pruned.nbytes, store.put, pruned)
        back = np.empty_like(weights)
        timed("get_into a numpy buffer, verified", weights.nbytes, store.get_into, w, back)
        assert np.array_equal(back, weights)
        grown = stored_bytes(store) - before
        print(f"  logical bytes put: {3 * size // MIB} MiB, new bytes stored: {grown // MIB} MiB")

        print("manifests (one per node key, written once, committed after their blobs):")
        root = ds.node_key("state", {"class": "State", "properties": {"model": "mlp", "seed": 0}})
        pruned_key = ds.node_key(
            "recipe", {"class": "Prune", "properties": {"fraction": 0.5}, "parent": root}
        )
        for key, digest, what in ((root, w, "trained"), (pruned_key, p, "pruned 50%")):
            commit = store.commit(key, ds.Manifest({"weights": digest}, {"description": what}))
            state = "committed" if commit.won else "already there (first writer won)"
            print(f"  {what:<12} {key.hex[:16]}  {state}")
        print(f"  missing among both keys: {len(store.missing([root, pruned_key]))}")
        report = store.verify()
        print(f"verify: {report.blobs} blob objects, {report.manifests} manifests, "
              f"{len(report.problems)} problems")  # fmt: skip

    print("tamper detection (on a scratch store):")
    with tempfile.TemporaryDirectory() as scratch, ds.open_store(scratch) as store:
        digest = store.put(weights[: MIB // 4])
        leaf = Path(scratch, blob_key(digest))  # where the store keeps it
        leaf.chmod(0o644)
        raw = bytearray(leaf.read_bytes())
        raw[1000] ^= 0x01
        leaf.write_bytes(raw)
        try:
            store.get(digest)
        except ds.IntegrityError as exc:
            print(f"  flipped one bit -> IntegrityError: {exc}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-store")
