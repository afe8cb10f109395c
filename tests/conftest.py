"""A real S3 server on loopback (moto_server in a subprocess) for the S3 backend tests.

Nothing here patches s3fs or botocore: requests go over HTTP to 127.0.0.1. Each test gets its own
uniquely named bucket, so tests never see each other's objects. moto is not reset between tests:
reset is cheap (~3 ms) but wipes every bucket, including any a module- or session-scoped fixture
set up, and unique buckets already isolate the tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest

from dagger_store.testing import FAKE_CREDENTIALS, fake_aws_environ, free_port, moto_server


@pytest.fixture(scope="session")
def aws_environment() -> Iterator[None]:
    """Fake credentials in os.environ (inherited by moto_server); real ones can never be used."""
    with fake_aws_environ():
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 that accepts any credentials."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def s3_strict_endpoint(
    aws_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a second moto server that checks credentials: every request here is refused (403)."""
    with moto_server(
        tmp_path_factory.mktemp("moto-strict"), {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    ) as server:
        yield server.endpoint


@pytest.fixture
def closed_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    """s3fs options for the moto server (no client_kwargs region_name: it breaks create_bucket)."""
    return {
        "endpoint_url": s3_endpoint,
        "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client on the moto server, for setting up and planting outside a backend."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket with a unique name."""
    name = f"dagger-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_url(s3_bucket: str) -> str:
    """``s3://<fresh bucket>/store``."""
    return f"s3://{s3_bucket}/store"


# Worker processes (the "processes" scheduler, dask.distributed workers) import the recipes of
# tests/toy_experiment.py by name, as they would a lab's own module: put tests/ on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[Any]:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server (faultproxy.py);
    it injects nothing until told to (``fault_proxy.inject(...)``) and stops at teardown."""
    from dagger_store.faultproxy import FaultProxy

    with FaultProxy(s3_endpoint, seed=20261130) as proxy:
        yield proxy


@pytest.fixture
def proxy_storage_options(fault_proxy: Any, s3_storage_options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options reaching the moto server through ``fault_proxy``; s3fs's and botocore's
    retry settings left at their defaults, as a user would have them."""
    return {**s3_storage_options, "endpoint_url": fault_proxy.url}


@contextmanager
def _mounted(folder: Path, *commands: list[str]) -> Iterator[Path]:
    """``folder`` made, then ``commands`` run (the last mounts it); unmounted at the end. The
    test is skipped where that cannot be done (it needs root)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip(f"{' '.join(commands[-1][:3])} needs root")
    folder.mkdir()
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            what = " ".join(command[:3])
            pytest.skip(f"cannot {what} here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test (root only), unmounted at teardown."""
    folder = tmp_path / "small"
    with _mounted(folder, ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)]):
        yield folder


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 file system in a file, loop-mounted for this test (root only): a local
    disk on which the store writes large objects around the page cache (directio.py)."""
    image, folder = tmp_path / "disk.ext4", tmp_path / "ext4"
    with open(image, "wb") as f:
        f.truncate(24 << 20)
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)]  # -m 0: root may not write more
    with _mounted(folder, mkfs, ["mount", "-o", "loop", str(image), str(folder)]):
        yield folder


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mounted at a folder whose name has a space (root only): a real file system that
    refuses O_DIRECT (it has no direct I/O)."""
    folder = tmp_path / "ram fs"
    with _mounted(folder, ["mount", "-t", "ramfs", "ramfs", str(folder)]):
        yield folder


@pytest.fixture
def hashed_leaves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every leaf the store hashes during the test, in order (the real hashing,
    counted)."""
    from dagger_store import store as store_module

    sizes: list[int] = []
    real = store_module.leaf_digest

    def counting(leaf: memoryview) -> Any:
        sizes.append(len(leaf))
        return real(leaf)

    monkeypatch.setattr(store_module, "leaf_digest", counting)
    return sizes


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """dagger's per-user cache (file hashes, gc marks) in a temp folder, never the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DAGGER_CACHE_DIR", str(tmp_path_factory.mktemp("dagger-cache")))
    yield
    patch.undo()
