"""Quantities for people: byte counts in reports and on the command line."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int) -> str:
    """``n`` bytes for a reader: ``"512 B"``, ``"1.5 KiB"``, ``"2,048.0 TiB"`` (binary units)."""
    if n < 1024:
        return f"{n:,} B"
    scaled, unit = n / 1024, 0
    while scaled >= 1024 and unit < len(_UNITS) - 1:
        scaled /= 1024
        unit += 1
    return f"{scaled:,.1f} {_UNITS[unit]}"
