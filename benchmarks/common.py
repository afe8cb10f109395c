"""What the benchmarks share: the results table, and a moto S3 server on loopback.

Each benchmark is a script run by hand (``make bench``); this module sits beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def add_work_dir(parser: argparse.ArgumentParser) -> None:
    """The --work-dir option: scratch space on a real disk (not a tmpfs /tmp)."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/work") if Path("/work").is_dir() else Path(__file__).resolve().parents[1],
        help="where the temporary scratch folder goes: a real disk, not tmpfs (default /work)",
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    print(rule)
    for n, cell in enumerate(cells):
        first = cell[0].ljust(widths[0])
        rest = "  ".join(cell[i].rjust(widths[i]) for i in range(1, len(header)))
        print(f"{first}  {rest}")
        if n == 0:
            print(rule)
    print(rule)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[tuple[str, int]]:
    """A moto S3 server on 127.0.0.1 (fake credentials only): (endpoint, pid); stopped on exit."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(FAKE_AWS)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).with_name("moto_server")
    with open(log_dir / "moto.log", "wb") as log:  # a file: a full pipe would block the server
        process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    log_file = log_dir / "moto.log"
                    raise RuntimeError(f"moto_server did not start; see {log_file}") from None
                time.sleep(0.05)
        yield endpoint, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
