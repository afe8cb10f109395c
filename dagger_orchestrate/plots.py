"""Figures of an experiment's results table, with matplotlib (the optional ``plots`` extra).

matplotlib is imported inside the functions only, and as ``matplotlib.figure.Figure`` rather than
pyplot: nothing opens a window, no global figure state is touched, and a missing matplotlib costs
nothing until a figure is asked for. The value rules the HTML report shares (what counts as a
number) live here too, so that this module stays the leaf of the two.

The rule of ``plot``: one series per ``hue`` group, coloured C0, C1, ...; a series is a line
(markers joined in x order) when x is numeric and takes distinct values within the group, and
a scatter otherwise (a categorical x, or several points at the same x, which a line would join
into a zigzag). A positive numeric x spanning at least two orders of magnitude (learning rates,
weight decays) is drawn on a log scale. Rows without a y (or x) are left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

EXTRA = "dagger-lab[plots]"


def require_matplotlib(what: str) -> None:
    """Raise ImportError naming the ``plots`` extra if matplotlib cannot be imported.

    Parameters
    ----------
    what
        What needs it, for the message (e.g. ``"Graph.plot"``).
    """
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"{what} needs matplotlib, an optional extra: pip install '{EXTRA}' "
            "(or pip install matplotlib)"
        ) from exc


def is_number(value: Any) -> bool:
    """Whether a table value is a finite real number (bools are not numbers here)."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and math.isfinite(value)


def is_missing(value: Any) -> bool:
    """Whether a table value is absent: None, NaN or NaT."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN and NaT are the values unequal to themselves
    except (TypeError, ValueError):
        return False


def numbers(column: pd.Series) -> list[float | None] | None:
    """The column as floats (None where absent or not finite), or None if it is not numeric.

    A column is numeric when it has at least one value and every value present is a number.
    """
    out: list[float | None] = []
    seen = False
    for value in column.tolist():
        if is_missing(value):
            out.append(None)
        elif is_number(value):
            out.append(float(value))
            seen = True
        elif isinstance(value, float | np.floating):  # inf: a number, but not plottable
            out.append(None)
            seen = True
        else:
            return None
    return out if seen else None


def plot(results: pd.DataFrame, x: str, y: str, hue: str | None = None) -> Figure:
    """A figure of ``y`` against ``x`` over the rows of a results table.

    Parameters
    ----------
    results
        A results table (``Experiment.results()``, ``NodeSet.results()``) or any DataFrame.
    x
        The column on the horizontal axis: numeric (a line per ``hue`` group where x values are
        distinct, else points) or categorical (points).
    y
        The column on the vertical axis; numeric.
    hue
        A column whose values split the rows into series, each with its own colour and a
        legend entry (rows without a value form the "(none)" series).

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot: shows inline in Jupyter; save it with ``fig.savefig(path)``.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'dagger-lab[plots]'``).
    KeyError
        A column is not in the table.
    ValueError
        ``y`` holds values that are not numbers.
    """
    require_matplotlib("plot")
    from matplotlib.figure import Figure

    for name in (x, y, hue):
        if name is not None and name not in results.columns:
            raise KeyError(
                f"no column {name!r} in the results table; its columns: {list(results.columns)}"
            )
    ys = numbers(results[y])
    if ys is None:
        kinds = sorted({type(v).__name__ for v in results[y].tolist() if not is_missing(v)})
        raise ValueError(
            f"y={y!r} must be a numeric column, but it holds {', '.join(kinds) or 'no values'}"
        )
    xs_numeric = numbers(results[x])
    xs: list[Any] = (
        xs_numeric
        if xs_numeric is not None
        else [None if is_missing(v) else str(v) for v in results[x].tolist()]
    )
    groups = _groups(results, hue)

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, rows) in enumerate(groups):
        points: list[tuple[Any, float]] = [
            (xs[r], value) for r in rows if xs[r] is not None and (value := ys[r]) is not None
        ]
        if not points:
            continue
        label = _text(name) if hue is not None else None
        if label is not None and label.startswith("_"):  # matplotlib hides "_"-labels
            label = f" {label}"
        color = f"C{i % 10}"
        px = [p[0] for p in points]
        if xs_numeric is not None and len(set(px)) == len(px) and len(px) > 1:
            points.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=label)
        else:
            ax.scatter(px, [p[1] for p in points], color=color, label=label, zorder=2)
    if xs_numeric is not None:
        present = [v for v in xs_numeric if v is not None]
        if present and min(present) > 0 and max(present) / min(present) >= 100:
            ax.set_xscale("log")
    ax.set_xlabel(_text(x))
    ax.set_ylabel(_text(y))
    ax.grid(True, alpha=0.3)
    if hue is not None and groups:
        many = len(groups) > 12
        ax.legend(
            title=_text(hue),
            fontsize="small",
            loc="upper left" if many else "best",
            bbox_to_anchor=(1.02, 1) if many else None,
            ncols=1 + len(groups) // 24,
        )
    return fig


def _groups(results: pd.DataFrame, hue: str | None) -> list[tuple[str, list[int]]]:
    """Row indices per hue value: numbers in numeric order, others in order of appearance."""
    if hue is None:
        return [("", list(range(len(results))))]
    values = results[hue].tolist()
    rows: dict[Any, list[int]] = {}
    for i, value in enumerate(values):
        rows.setdefault(None if is_missing(value) else value, []).append(i)
    keys = list(rows)
    present = [k for k in keys if k is not None]
    if present and all(is_number(k) for k in present):
        present.sort()
    ordered = present + ([None] if None in rows else [])
    return [("(none)" if k is None else str(k), rows[k]) for k in ordered]


def _text(value: str) -> str:
    """User text as matplotlib shows it literally: ``$`` would start mathtext."""
    return value.replace("$", r"\$")
