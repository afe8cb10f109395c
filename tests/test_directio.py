"""Large objects written around the page cache (dagger_store/backends/directio.py).

What a person relies on: an object written directly reads back byte for byte, at its exact
size, whatever its length and however its parts split; a file system that refuses direct
writes still gets every object (buffered), and one that is not a local disk is never asked.
A full disk is covered in test_faults (on ext4, written directly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dagger_store as ds
from dagger_store.backends import directio
from dagger_store.backends.local import LocalBackend

MiB = 1 << 20


def _payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    "sizes",
    [
        [MiB],  # exactly one chunk
        [13, MiB - 13],  # a header and a payload that fill one chunk together
        [8, 3 * MiB + 777],  # several chunks and a short, unaligned last block
        [8, 5, 2 * MiB + 4096, 1],  # many parts, crossing chunk boundaries
    ],
)
def test_written_directly_reads_back_exactly(small_ext4: Path, sizes: list[int]) -> None:
    backend = LocalBackend(small_ext4 / "store")
    backend.create()
    parts = [_payload(size, seed) for seed, size in enumerate(sizes)]
    assert backend.write_once("blobs/ab/object", *(memoryview(p) for p in parts))
    assert backend._direct is True  # ext4: written around the page cache
    stored = small_ext4 / "store" / "blobs" / "ab" / "object"
    assert stored.stat().st_size == sum(sizes)  # no padding left
    assert backend.read("blobs/ab/object") == b"".join(parts)


def test_small_objects_are_written_buffered(
    small_ext4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = directio.write
    monkeypatch.setattr(
        directio, "write", lambda fd, parts, total: calls.append(fd) or real(fd, parts, total)
    )
    backend = LocalBackend(small_ext4 / "store")
    backend.create()
    backend.write_once("small", b"x" * (directio.DIRECT_FROM - 1))
    assert calls == []
    backend.write_once("large", b"x" * directio.DIRECT_FROM)
    assert len(calls) == 1


def test_a_store_on_ext4_round_trips_large_arrays(small_ext4: Path) -> None:
    store = ds.open_store(small_ext4 / "store")
    array = np.random.default_rng(3).standard_normal(MiB + 5)  # 8 MB and a little: two leaves
    digest = store.put(memoryview(array).cast("B"))
    assert bytes(store.get(digest)) == array.tobytes()
    assert store.verify().ok


def test_a_refusing_file_system_gets_a_buffered_write(ramfs: Path) -> None:
    with open(ramfs / "file", "wb") as f:
        assert directio.write(f.fileno(), [b"abc" * MiB], 3 * MiB) is False
    assert (ramfs / "file").stat().st_size == 0  # nothing written: the caller writes it
    backend = LocalBackend(ramfs / "store")
    backend.create()
    backend._direct = True  # as if the file system had been taken for a suited one
    value = _payload(2 * MiB + 3)
    assert backend.write_once("blobs/cd/object", b"head", value)
    assert backend.read("blobs/cd/object") == b"head" + value
    assert backend._direct is False  # asks no more


def test_only_local_disks_are_written_directly(
    small_ext4: Path, ramfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert directio.file_system(small_ext4 / "not" / "yet" / "made") == "ext4"
    assert directio.file_system(ramfs) == "ramfs"  # at ".../ram fs": mountinfo writes \040
    assert directio.file_system(Path("/proc/self")) == "proc"
    assert directio.suits(small_ext4) and not directio.suits(ramfs)
    monkeypatch.setenv("DAGGER_DIRECT_IO", "0")
    assert not directio.suits(small_ext4)
