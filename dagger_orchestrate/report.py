"""A self-contained HTML report of an experiment, and the node colouring ``Graph.draw`` shares.

The report is one file that fetches nothing: CSS, the tree (inline SVG laid out here, since
Graphviz's ``dot`` may not be installed), the results table and its few lines of sorting script
are inline, the plot is matplotlib's SVG, and a Content-Security-Policy forbids any network
fetch, so a report mailed to a colleague renders the same offline. Every piece of user text
(labels, tags, values, column names) is HTML-escaped where it lands; none is ever put inside a
script.

Colouring (``color_by``):

- a column of the results table holding numbers: a viridis scale from the column's minimum to
  its maximum over the nodes shown; the legend shows five stops;
- any other column (strings, bools): one colour per distinct value, in order of appearance;
- ``"tag:GLOB"``: by the tags matching the glob (``fnmatch``, e.g. ``"tag:lr:*"``); a node's
  category is its matching tags, sorted and ", "-joined, in order of appearance; the legend
  lists the categories;
- default (None): the first Function result column holding numbers, if there is one.

Nodes without a value (or without a matching tag) are white with a dashed grey outline.

Tree layout (``tree_svg``): left to right, a column per depth, a row per leaf; a parent sits
halfway between its first and last child. Sibling subtrees own disjoint bands of rows, so boxes
never overlap and the cost is linear in the number of nodes. Left to right rather than top
down because experiment trees are wide and shallow (many hyper-parameters, a few stages): the
picture grows downwards, where pages scroll.

The plot (``plots.plot``) is matplotlib's SVG; without matplotlib the report is written without
it and says how to get it.
"""

from __future__ import annotations

import fnmatch
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from dagger_orchestrate.plots import EXTRA, is_missing, numbers, plot

if TYPE_CHECKING:
    import pandas as pd

    from dagger_orchestrate.graph import GraphNode, NodeSet

FIXED_COLUMNS = ("key", "label", "recipe", "depth", "tags", "seconds", "created")

VIRIDIS = (
    "#440154", "#48186a", "#472d7b", "#424086", "#3b528b", "#33638d", "#2c728e", "#26828e",
    "#21918c", "#1fa088", "#28ae80", "#3fbc73", "#5ec962", "#84d44b", "#addc30", "#d8e219",
    "#fde725",
)  # fmt: skip
CATEGORICAL = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
NO_VALUE = "#ffffff"
NO_VALUE_LINE = "#9e9e9e"
LEGEND_MAX = 20  # categories listed; the rest are counted


@dataclass(frozen=True, slots=True)
class Coloring:
    """How nodes are filled, by short key (the first 12 hex digits of the node key).

    ``kind`` is "scale" (numbers, viridis from ``low`` to ``high``), "categories" or "none";
    ``legend`` lists (fill, text) entries; a node absent from ``fills`` has no value.
    """

    by: str | None
    kind: Literal["scale", "categories", "none"]
    fills: Mapping[str, str] = field(default_factory=dict)
    shown: Mapping[str, str] = field(default_factory=dict)
    legend: tuple[tuple[str, str], ...] = ()
    low: float | None = None
    high: float | None = None

    def fill(self, key: str) -> str | None:
        """The fill of the node with this short key, or None where it has no value."""
        return self.fills.get(key)


def short_key(node: GraphNode) -> str:
    """How the table, the tree and the report name a node: its key's first 12 hex digits."""
    return node.key.hex[:12]


def function_columns(results: pd.DataFrame, nodes: Sequence[GraphNode] = ()) -> list[str]:
    """The Function result columns of a results table, in table order.

    The columns before ``seconds`` that are neither fixed ones (key, label, recipe, depth, tags)
    nor property columns ``<Class>.<property>`` or ``<Class>#<n>.<property>``, where Class is a
    recipe or state class of the table (the head of a label: ``Train`` in ``Train(lr=0.1)``) or
    of the graph of ``nodes`` (a NodeSet's rows carry their ancestors' properties too).
    """
    return _kinds(results, nodes)[1]


def property_columns(results: pd.DataFrame, nodes: Sequence[GraphNode] = ()) -> list[str]:
    """The property columns ``<Class>.<property>`` of a results table (see ``function_columns``)."""
    return _kinds(results, nodes)[0]


def _kinds(results: pd.DataFrame, nodes: Sequence[GraphNode]) -> tuple[list[str], list[str]]:
    heads = [*results["recipe"].tolist(), *results["label"].tolist()]
    if nodes:
        heads += [n.recipe or n.label for n in nodes[0].graph.nodes]
    classes = {str(v).partition("(")[0] for v in heads if not is_missing(v)}
    properties, functions = [], []
    for column in results.columns:
        name = str(column)
        if name == "seconds":  # then the time and provenance columns
            break
        head = re.sub(r"#\d+$", "", name.partition(".")[0])
        if "." in name and head in classes:
            properties.append(name)
        elif name not in FIXED_COLUMNS:
            functions.append(name)
    return properties, functions


def default_metric(results: pd.DataFrame | None, nodes: Sequence[GraphNode] = ()) -> str | None:
    """The first Function result column holding numbers, or None if there is none."""
    if results is None or not len(results):
        return None
    found = (c for c in function_columns(results, nodes) if numbers(results[c]) is not None)
    return next(found, None)


def coloring(
    nodes: Iterable[GraphNode], results: pd.DataFrame | None, color_by: str | None = None
) -> Coloring:
    """How to fill ``nodes``: by a column of ``results`` or by tags (see the module's rules).

    Parameters
    ----------
    nodes
        The nodes drawn: a scale spans their values only.
    results
        The results table (one row per node, a ``key`` column of short keys); may be None when
        colouring by tags.
    color_by
        A column name, ``"tag:GLOB"``, or None for the first numeric Function result column.

    Raises
    ------
    KeyError
        ``color_by`` is not a column of ``results``.
    ValueError
        A column is asked for without a results table, or ``"tag:"`` without a pattern.
    """
    nodes = list(nodes)
    if color_by is None:
        color_by = default_metric(results, nodes)
        if color_by is None:
            return Coloring(None, "none")
    if color_by.startswith("tag:"):
        pattern = color_by[len("tag:") :]
        if not pattern:
            raise ValueError("color_by='tag:GLOB' needs a pattern, e.g. 'tag:lr:*'")
        values = {}
        for node in nodes:
            matching = sorted(t for t in node.tags if fnmatch.fnmatchcase(t, pattern))
            if matching:
                values[short_key(node)] = ", ".join(matching)
        return _categories(color_by, values)
    if results is None:
        raise ValueError(f"colouring by the column {color_by!r} needs the results table")
    if color_by not in results.columns:
        raise KeyError(
            f"no column {color_by!r} in the results table (its columns: "
            f"{list(results.columns)}); to colour by tags, give 'tag:GLOB'"
        )
    keys = [str(k) for k in results["key"].tolist()]
    present = {short_key(n) for n in nodes}
    raw = results[color_by].tolist()
    floats = numbers(results[color_by])
    if floats is None:
        return _categories(
            color_by,
            {
                k: _show(v)
                for k, v in zip(keys, raw, strict=True)
                if k in present and not is_missing(v)
            },
        )
    scaled = {
        k: (f, v)
        for k, f, v in zip(keys, floats, raw, strict=True)
        if k in present and f is not None
    }
    if not scaled:
        return Coloring(color_by, "scale", legend=())
    low = min(f for f, _ in scaled.values())
    high = max(f for f, _ in scaled.values())

    def at(f: float) -> float:
        return (f - low) / (high - low) if high > low else 0.5

    stops = (0.0, 0.25, 0.5, 0.75, 1.0) if high > low else (0.5,)
    return Coloring(
        color_by,
        "scale",
        fills={k: scale_color(at(f)) for k, (f, _) in scaled.items()},
        shown={k: _show(v) for k, (_, v) in scaled.items()},
        legend=tuple((scale_color(t), _number(low + t * (high - low))) for t in stops)
        if high > low
        else ((scale_color(0.5), _number(low)),),
        low=low,
        high=high,
    )


def _categories(by: str, values: Mapping[str, str]) -> Coloring:
    order = list(dict.fromkeys(values.values()))
    palette = {v: CATEGORICAL[i % len(CATEGORICAL)] for i, v in enumerate(order)}
    legend = [(palette[v], v) for v in order[:LEGEND_MAX]]
    if len(order) > LEGEND_MAX:
        legend.append((NO_VALUE_LINE, f"… and {len(order) - LEGEND_MAX} more"))
    return Coloring(
        by,
        "categories",
        fills={k: palette[v] for k, v in values.items()},
        shown=dict(values),
        legend=tuple(legend),
    )


def scale_color(t: float) -> str:
    """The viridis colour at ``t`` in [0, 1] (clipped), as ``#rrggbb``."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = _rgb(VIRIDIS[i]), _rgb(VIRIDIS[i + 1])
    mixed = (round(p + (q - p) * (t - i)) for p, q in zip(a, b, strict=True))
    return "#" + "".join(f"{c:02x}" for c in mixed)


def ink(fill: str) -> str:
    """A text colour readable on ``fill``: near-black on light colours, white on dark ones."""
    r, g, b = (c / 255 for c in _rgb(fill))
    return "#1a1a1a" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def graphviz_style(colors: Coloring, key: str) -> dict[str, str]:
    """Graphviz node attributes filling the node with this short key (dashed grey: no value)."""
    fill = colors.fill(key)
    if fill is None:
        return {"style": "filled,dashed", "fillcolor": NO_VALUE, "color": NO_VALUE_LINE}
    return {"style": "filled", "fillcolor": fill, "fontcolor": ink(fill)}


def graphviz_legend(colors: Coloring) -> str | None:
    """The legend as a Graphviz HTML-like label (a table of swatches), or None if uncoloured."""
    if colors.by is None:
        return None
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>colour: {_esc(colors.by)}</B></TD></TR>']
    entries = list(colors.legend)
    if colors.kind == "scale" and len(entries) > 1:
        entries[0] = (entries[0][0], f"{entries[0][1]} (min)")
        entries[-1] = (entries[-1][0], f"{entries[-1][1]} (max)")
    no_value = "no matching tag" if colors.by.startswith("tag:") else "no value"
    for fill, text in [*entries, (NO_VALUE, no_value)]:
        line = NO_VALUE_LINE if fill == NO_VALUE else "#4a4a4a"
        rows.append(
            f'<TR><TD BGCOLOR="{fill}" COLOR="{line}" BORDER="1" WIDTH="16" HEIGHT="14"> </TD>'
            f'<TD ALIGN="LEFT">{_esc(text)}</TD></TR>'
        )
    table = "".join(rows)
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="2">{table}</TABLE>>'


# -- the tree ----------------------------------------------------------------------------------

_LINE = 15  # px between text baselines in a box
_PAD = 8
_GAP_X = 44
_GAP_Y = 10
_MARGIN = 12
_LABEL_CHARS = 48
_TAG_CHARS = 56


@dataclass(frozen=True, slots=True)
class _Box:
    node: GraphNode
    key: str
    column: int
    row: float
    lines: tuple[str, ...]  # label, tags (if any), key
    value: str  # the coloured value, after the key


def _boxes(nodes: Sequence[GraphNode], colors: Coloring) -> list[_Box]:
    """Columns (depth below the drawn root) and rows (leaves in order; parents centred)."""
    keys = {n.key for n in nodes}
    children = {n.key: [c for c in n.children if c.key in keys] for n in nodes}
    roots = [n for n in nodes if n.parent is None or n.parent.key not in keys]
    place: dict[Any, tuple[int, float]] = {}
    next_row = 0
    for root in roots:
        stack: list[tuple[GraphNode, int, bool]] = [(root, 0, False)]
        while stack:  # iterative post-order: a chain of 10,000 recipes must not recurse
            node, column, expanded = stack.pop()
            kids = children[node.key]
            if not kids:
                place[node.key] = (column, float(next_row))
                next_row += 1
            elif expanded:
                first, last = place[kids[0].key][1], place[kids[-1].key][1]
                place[node.key] = (column, (first + last) / 2)
            else:
                stack.append((node, column, True))
                stack.extend((c, column + 1, False) for c in reversed(kids))
    boxes = []
    for node in nodes:
        key = short_key(node)
        lines = [_clip(node.label, _LABEL_CHARS)]
        if node.tags:
            lines.append(_clip(", ".join(sorted(node.tags)), _TAG_CHARS))
        value = colors.shown.get(key)
        lines.append(key)
        column, row = place[node.key]
        boxes.append(_Box(node, key, column, row, tuple(lines), _clip(value or "", 24)))
    return boxes


def _width(lines: Sequence[str], value: str, tagged: bool) -> float:
    """Estimated text width in px: generous per-character widths of common sans/mono fonts."""
    widths = [len(lines[0]) * 7.3]  # 12 px semibold
    if tagged:
        widths.append(len(lines[1]) * 6.4)  # 11 px
    widths.append((len(lines[-1]) + len(value)) * 6.8 + 9)  # 11 px monospace
    return max(widths)


def tree_svg(nodes: Sequence[GraphNode], colors: Coloring) -> str:
    """The nodes as an SVG tree: a box per node (label, tags, short key and coloured value),
    linked to its row of the results table (``#r-<short key>``), with edges from each parent.

    Parameters
    ----------
    nodes
        The nodes to draw, in graph order; a node whose parent is not among them is drawn as a
        root.
    colors
        Their fills (``coloring``).
    """
    boxes = _boxes(nodes, colors)
    if not boxes:
        return '<p class="note">no nodes</p>'
    lines = max(len(b.lines) for b in boxes)
    height = 2 * _PAD + (lines - 1) * _LINE + 4
    pitch = height + _GAP_Y
    columns = max(b.column for b in boxes) + 1
    widths = [96.0] * columns
    for b in boxes:
        needed = _width(b.lines, b.value, bool(b.node.tags)) + 2 * _PAD
        widths[b.column] = min(max(widths[b.column], needed), 380.0)
    lefts = [float(_MARGIN)]
    for w in widths[:-1]:
        lefts.append(lefts[-1] + w + _GAP_X)
    rows = max(b.row for b in boxes) + 1
    total_w = lefts[-1] + widths[-1] + _MARGIN
    total_h = _MARGIN * 2 + rows * pitch - _GAP_Y

    def middle(box: _Box) -> float:
        return _MARGIN + box.row * pitch + height / 2

    by_key = {b.node.key: b for b in boxes}
    edges = []
    parts = []
    for b in boxes:
        x, y = lefts[b.column], middle(b)
        parent = by_key.get(b.node.parent.key) if b.node.parent is not None else None
        if parent is not None:
            x1, y1 = lefts[parent.column] + widths[parent.column], middle(parent)
            xm = (x1 + x) / 2
            edges.append(f"M{x1:.1f} {y1:.1f}C{xm:.1f} {y1:.1f} {xm:.1f} {y:.1f} {x:.1f} {y:.1f}")
        fill = colors.fill(b.key)
        rect_class = "" if fill is not None or colors.kind == "none" else ' class="nv"'
        fill = fill or NO_VALUE
        text = ink(fill)
        top = y - height / 2
        title = "\n".join(
            [b.node.label]
            + ([", ".join(sorted(b.node.tags))] if b.node.tags else [])
            + [b.node.key.hex]
            + ([f"{colors.by} = {colors.shown[b.key]}"] if b.key in colors.shown else [])
        )
        spans = []
        for i, line in enumerate(b.lines):
            kind = "l" if i == 0 else "k" if i == len(b.lines) - 1 else "t"
            value = f'<tspan class="v" dx="9">{_esc(b.value)}</tspan>' if kind == "k" else ""
            spans.append(
                f'<text class="{kind}" x="{x + _PAD:.1f}" y="{top + _PAD + 10 + i * _LINE:.1f}"'
                f' fill="{text}">{_esc(line)}{value}</text>'
            )
        parts.append(
            f'<a href="#r-{b.key}"><g class="node" id="n-{b.key}"><title>{_esc(title)}</title>'
            f'<rect{rect_class} x="{x:.1f}" y="{top:.1f}" width="{widths[b.column]:.1f}" '
            f'height="{height}" rx="5" fill="{fill}"/>{"".join(spans)}</g></a>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dagger-tree" width="{total_w:.0f}" '
        f'height="{total_h:.0f}" viewBox="0 0 {total_w:.0f} {total_h:.0f}" role="img" '
        f'aria-label="experiment tree"><path class="edges" d="{"".join(edges)}"/>'
        f"{''.join(parts)}</svg>"
    )


def legend_html(colors: Coloring) -> str:
    """The colour legend as HTML: a gradient with its stops, or swatches per category."""
    if colors.kind == "none" or colors.by is None:
        return '<p class="legend note">nodes are not coloured: no numeric result column</p>'
    title = f'<span class="legend-title">colour: <code>{_esc(colors.by)}</code></span>'
    none = (
        f'<span class="swatch nv" style="background:{NO_VALUE}"></span>'
        f"<span>{'no matching tag' if colors.by.startswith('tag:') else 'no value'}</span>"
    )
    if not colors.legend:
        return f'<div class="legend">{title}{none}</div>'
    if colors.kind == "scale":
        gradient = ", ".join(VIRIDIS)
        labels = "".join(f"<span>{_esc(text)}</span>" for _, text in colors.legend)
        ramp = (
            f'<span class="ramp"><span class="bar" style="background:linear-gradient(to right, '
            f'{gradient})"></span><span class="stops">{labels}</span></span>'
        )
        return f'<div class="legend">{title}{ramp}{none}</div>'
    items = "".join(
        f'<span class="swatch" style="background:{fill}"></span><span>{_esc(text)}</span>'
        for fill, text in colors.legend
    )
    return f'<div class="legend">{title}{items}{none}</div>'


# -- the table ---------------------------------------------------------------------------------


def results_table(results: pd.DataFrame) -> str:
    """The results table as an HTML table, sortable by its headers once ``SORT_SCRIPT`` runs.

    Numeric columns sort numerically (each cell carries its full-precision value in ``data-v``)
    and are right-aligned; a row's id is ``r-<short key>`` and its key links to the node in the
    tree (``#n-<short key>``).
    """
    columns = [str(c) for c in results.columns]
    numeric = [numbers(results[c]) for c in results.columns]
    head = "".join(
        f'<th scope="col"{" data-num" if nums is not None else ""}>{_esc(name)}</th>'
        for name, nums in zip(columns, numeric, strict=True)
    )
    cells_by_column = []
    for name, nums, raw in zip(columns, numeric, (results[c].tolist() for c in results.columns),
                               strict=True):  # fmt: skip
        if name == "key":
            cells_by_column.append([f'<td><a href="#n-{_esc(k)}"><code>{_esc(k)}</code></a></td>'
                                    for k in map(str, raw)])  # fmt: skip
        elif nums is not None:
            cells_by_column.append(
                [
                    '<td class="n"></td>'
                    if f is None
                    else f'<td class="n" data-v="{f!r}">{_esc(_show(v))}</td>'
                    for f, v in zip(nums, raw, strict=True)
                ]
            )
        else:
            cells_by_column.append([f"<td>{_esc(_show(v))}</td>" for v in raw])
    keys = [str(k) for k in results["key"].tolist()] if "key" in results.columns else []
    body = []
    for i in range(len(results)):
        row_id = f' id="r-{_esc(keys[i])}"' if keys else ""
        body.append(f"<tr{row_id}>{''.join(cells[i] for cells in cells_by_column)}</tr>")
    return (
        f'<table class="dagger-results"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


# -- the plot ----------------------------------------------------------------------------------


def plot_svg(results: pd.DataFrame, x: str, y: str, hue: str | None = None) -> str:
    """``plots.plot`` as inline SVG markup (no XML prolog), its text drawn as paths.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    fig = plot(results, x, y, hue)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def default_axes(
    results: pd.DataFrame, metric: str | None, nodes: Sequence[GraphNode] = ()
) -> tuple[str, str, str | None] | None:
    """(x, y, hue) for the report's plot when none are given, or None.

    y: ``metric`` if it is a numeric column, else the first numeric Function result column;
    x: the first numeric property column taking more than one value; hue: ``recipe`` if the
    rows with a y value come from more than one recipe.
    """
    if metric is None or metric not in results.columns or numbers(results[metric]) is None:
        metric = default_metric(results, nodes)
    if metric is None:
        return None
    ys = numbers(results[metric]) or []
    for name in property_columns(results, nodes):
        if name == metric:
            continue
        xs = numbers(results[name])
        if xs is not None and len({v for v in xs if v is not None}) > 1:
            recipes = {
                str(r) for r, v in zip(results["recipe"].tolist(), ys, strict=True) if v is not None
            }
            return name, metric, "recipe" if len(recipes) > 1 else None
    return None


# -- the pages ---------------------------------------------------------------------------------

CSS = """
.dagger-report{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1a1a1a}
.dagger-report h1{font-size:1.5em;margin:0 0 .25em}
.dagger-report h2{font-size:1.15em;margin:1.5em 0 .5em}
.dagger-report .summary{color:#444;margin:0}
.dagger-report .note{color:#666;font-style:italic}
.dagger-report code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;
 font-size:.92em}
.dagger-report .scroll{overflow:auto;max-height:75vh;border:1px solid #ddd;border-radius:6px;
 background:#fff}
.dagger-report svg.dagger-tree{display:block}
.dagger-report svg.dagger-tree text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,
 "DejaVu Sans",sans-serif}
.dagger-report .node text.l{font-size:12px;font-weight:600}
.dagger-report .node text.t{font-size:11px;opacity:.85}
.dagger-report .node text.k{font-size:11px;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,
 Consolas,monospace}
.dagger-report .node rect{stroke:#4a4a4a;stroke-width:1}
.dagger-report .node rect.nv{stroke:#9e9e9e;stroke-dasharray:4 3}
.dagger-report .node:hover rect{stroke-width:2.5}
.dagger-report .node:target rect{stroke:#e8590c;stroke-width:3}
.dagger-report path.edges{fill:none;stroke:#9a9a9a;stroke-width:1.3}
.dagger-report .legend{display:flex;flex-wrap:wrap;align-items:center;gap:.35em .6em;
 margin:.4em 0 .6em}
.dagger-report .legend-title{margin-right:.4em}
.dagger-report .swatch{display:inline-block;width:14px;height:14px;border:1px solid #4a4a4a;
 border-radius:3px}
.dagger-report .swatch.nv{border:1px dashed #9e9e9e;margin-left:.8em}
.dagger-report .ramp{display:inline-flex;flex-direction:column;width:280px}
.dagger-report .ramp .bar{height:14px;border:1px solid #4a4a4a;border-radius:3px}
.dagger-report .ramp .stops{display:flex;justify-content:space-between;font-size:12px;
 font-variant-numeric:tabular-nums}
.dagger-report table.dagger-results{border-collapse:collapse;font-size:13px;white-space:nowrap}
.dagger-report table.dagger-results th,.dagger-report table.dagger-results td{
 padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
.dagger-report table.dagger-results td.n{text-align:right;font-variant-numeric:tabular-nums}
.dagger-report table.dagger-results th{position:sticky;top:0;background:#f1f3f5;cursor:pointer;
 user-select:none;border-bottom:1px solid #ccc}
.dagger-report table.dagger-results th[aria-sort=ascending]::after{content:" \\25B2"}
.dagger-report table.dagger-results th[aria-sort=descending]::after{content:" \\25BC"}
.dagger-report table.dagger-results tbody tr:hover{background:#f6f8fa}
.dagger-report table.dagger-results tr:target{background:#fff3bf}
.dagger-report .plot svg{max-width:100%;height:auto}
"""

# Binds every results table not bound yet (several notebook outputs share one page). Sorting is
# stable, so equal values keep their previous order; empty cells stay last either way.
SORT_SCRIPT = """
(function () {
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  function value(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) return null;
    var text = numeric ? cell.getAttribute("data-v") : cell.textContent;
    return text === null || text === "" ? null : text;
  }
  function bind(table) {
    if (table.getAttribute("data-sortable") === "1") return;
    table.setAttribute("data-sortable", "1");
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, index) {
      th.tabIndex = 0;
      th.title = "sort";
      function sort() {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        var numeric = th.hasAttribute("data-num");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var u = value(a, index, numeric), v = value(b, index, numeric);
          if (u === null || v === null) return (u === null) - (v === null);
          var c = numeric ? parseFloat(u) - parseFloat(v) : collator.compare(u, v);
          return ascending ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.dagger-results"), bind);
})();
"""

# Nothing may be fetched: a report must render the same offline, and a stray URL in user text
# can never make the page call out.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src data:; font-src data:"
)


def report_html(
    nodes: Sequence[GraphNode],
    results: pd.DataFrame,
    *,
    title: str,
    store_url: str | None = None,
    color_by: str | None = None,
    x: str | None = None,
    y: str | None = None,
    hue: str | None = None,
) -> str:
    """The self-contained HTML report page: summary, coloured tree, sortable table, plot.

    Parameters
    ----------
    nodes
        The nodes to report, in graph order (``graph.nodes`` or any NodeSet).
    results
        Their results table (``nodes.results()``).
    title
        The experiment's name, for the heading.
    store_url
        Where the experiment's store is, for the summary.
    color_by
        How to colour the tree (a column or ``"tag:GLOB"``); default: the first numeric
        Function result column.
    x, y, hue
        The plot's columns (``plots.plot``); default: y the colour column, x the first numeric
        property column that varies, hue ``recipe``. Without matplotlib the page says the plot
        was left out and how to get it.

    Raises
    ------
    KeyError
        A named column is not in ``results``.
    ValueError
        Only one of ``x`` and ``y`` is given.
    """
    if (x is None) != (y is None):
        raise ValueError("give both x and y for the report's plot, or neither")
    for name in (x, y, hue):
        if name is not None and name not in results.columns:
            raise KeyError(
                f"no column {name!r} in the results table; its columns: {list(results.columns)}"
            )
    colors = coloring(nodes, results, color_by)
    roots = sum(1 for n in nodes if n.parent is None)
    summary = [
        f"<b>{len(nodes)}</b> node{'s' if len(nodes) != 1 else ''}",
        f"{roots} tree{'s' if roots != 1 else ''}",
        f"{len(function_columns(results, nodes))} result column"
        f"{'s' if len(function_columns(results, nodes)) != 1 else ''}",
    ]
    if store_url is not None:
        summary.append(f"store <code>{_esc(store_url)}</code>")
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    summary.append(f"generated {generated}")
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)} · dagger report</title>",
        f"<style>body{{margin:24px}}{CSS}</style></head>",
        '<body><main class="dagger-report">',
        f'<h1>{_esc(title)}</h1><p class="summary">{" · ".join(summary)}</p>',
        '<h2>Tree</h2><p class="note">Click a node for its row of the table.</p>',
        legend_html(colors),
        f'<div class="scroll">{tree_svg(nodes, colors)}</div>',
        '<h2>Results</h2><p class="note">Click a column header to sort; '
        "a key links to its node.</p>",
        f'<div class="scroll">{results_table(results)}</div>',
        f"<h2>Plot</h2>{_plot_section(results, nodes, colors, x, y, hue)}",
        f"</main><script>{SORT_SCRIPT}</script></body></html>",
    ]
    return "\n".join(page)


def _plot_section(
    results: pd.DataFrame,
    nodes: Sequence[GraphNode],
    colors: Coloring,
    x: str | None,
    y: str | None,
    hue: str | None,
) -> str:
    if x is None or y is None:
        axes = default_axes(results, colors.by, nodes)
        if axes is None:
            return (
                '<p class="note">No plot: no numeric property column varies against a numeric '
                "result (choose columns with --x and --y).</p>"
            )
        x, y, hue = axes
    try:
        svg = plot_svg(results, x, y, hue)
    except ImportError:
        return (
            f'<p class="note">No plot of {_esc(y)} against {_esc(x)}: matplotlib is not '
            f"installed (pip install '{EXTRA}').</p>"
        )
    return f'<div class="plot">{svg}</div>'


def notebook_html(nodes: NodeSet, *, tree: bool) -> str | None:
    """Jupyter's view of a graph (``tree=True``: the coloured tree and the table) or of a
    NodeSet (the table), as an HTML fragment; None for a NodeSet whose results table cannot
    be had (a graph not taken from an Experiment), so that Jupyter shows its text instead.

    Styles are scoped to the fragment's ``dagger-report`` class, and its script binds the
    sorting of each table once, so several outputs can share a notebook page.
    """
    results = nodes.results() if nodes._graph.experiment is not None else None
    if results is None and not tree:
        return None
    parts = [f'<div class="dagger-report"><style>{CSS}</style>']
    if tree:
        colors = coloring(nodes, results) if results is not None else Coloring(None, "none")
        parts += [legend_html(colors), f'<div class="scroll">{tree_svg(nodes, colors)}</div>']
    if results is None:
        parts.append(
            '<p class="note">no results table: this graph does not name its experiment</p>'
        )
    elif len(results):
        parts.append(f'<div class="scroll">{results_table(results)}</div>')
    else:
        parts.append('<p class="note">no nodes</p>')
    parts.append(f"<script>{SORT_SCRIPT}</script></div>")
    return "".join(parts)


# -- values as shown ---------------------------------------------------------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _show(value: Any) -> str:
    """A table value as text: floats to 6 significant digits, times to the second, UTC."""
    if is_missing(value):
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.6g}"
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        return _show(value.item())
    return str(value)
