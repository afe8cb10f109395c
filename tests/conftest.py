"""A real S3 server on loopback (moto_server in a subprocess) for the S3 backend tests.

Nothing here patches s3fs or botocore: requests go over HTTP to 127.0.0.1. Each test gets its own
uniquely named bucket, so tests never see each other's objects. moto is not reset between tests:
reset is cheap (~3 ms) but wipes every bucket, including any a module- or session-scoped fixture
set up, and unique buckets already isolate the tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_STARTUP_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def aws_environment() -> Iterator[None]:
    """Fake credentials in os.environ (inherited by moto_server); real ones can never be used."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in FAKE_CREDENTIALS.items():
            mp.setenv(name, value)
        yield


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_moto_server(log_dir: Path, extra_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto_server = Path(sys.executable).with_name("moto_server")
    # The server logs every request: a file, not a pipe, so it can never block on a full buffer.
    log_path = log_dir / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **extra_env},
        )
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {process.returncode}"
                    if process.poll() is not None
                    else (f"did not answer within {_STARTUP_TIMEOUT:.0f} s")
                )
                pytest.fail(
                    f"moto_server on {endpoint} {state}; its output:\n"
                    + log_path.read_text(errors="replace"),
                    pytrace=False,
                )
            time.sleep(0.05)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_endpoint(aws_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 that accepts any credentials."""
    yield from _run_moto_server(tmp_path_factory.mktemp("moto"), {})


@pytest.fixture(scope="session")
def s3_strict_endpoint(
    aws_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a second moto server that checks credentials: every request here is refused (403)."""
    yield from _run_moto_server(
        tmp_path_factory.mktemp("moto-strict"), {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    )


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
