"""A fixed-width table for the benchmarks' reports: first column left, the rest right-aligned."""

from __future__ import annotations

from collections.abc import Sequence


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
