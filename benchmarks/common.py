"""What the benchmarks share: the results table and its verdicts, and a moto S3 server on loopback.

Each benchmark is a script run by hand (``make bench``); this module sits beside them.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from dagger_store import testing


def add_work_dir(parser: argparse.ArgumentParser) -> None:
    """The --work-dir option: scratch space on a real disk (not a tmpfs /tmp)."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/work") if Path("/work").is_dir() else Path(__file__).resolve().parents[1],
        help="where the temporary scratch folder goes: a real disk, not tmpfs (default /work)",
    )


def verdict(passed: bool | None) -> str:
    """A bar's cell in the result column: PASS, FAIL, or "-" where there is no bar."""
    return "-" if passed is None else "PASS" if passed else "FAIL"


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


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[testing.MotoServer]:
    """A moto S3 server on 127.0.0.1 (``endpoint``, ``pid``, ``storage_options``), with fake
    credentials in this process's environment too; both stopped and restored on exit."""
    with testing.fake_aws_environ(), testing.moto_server(log_dir) as server:
        yield server
