"""Pictures and the shareable report: draw(color_by=...), plot(), the HTML report, Jupyter views.

The report is checked in a real headless browser (Debian's chromium): the page loads without a
console message, shows every node and row, and sorts by a click (driven by a script injected
into a copy of the page only).
"""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from toy_experiment import Finetune, Prune, State, Train, sparsity

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate import report
from dagger_orchestrate.cli import main
from dagger_orchestrate.graph import Graph, GraphNode

NASTY = "note:<b>\"&'</b><script>document.title='pwned'</script>"


@dg.Function
def nonzero(state: State) -> int:
    """Counts whose text order is not their numeric order (2368 < 474 as text)."""
    return int(sum((w != 0).sum() for w in state.model.values()))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> dg.Experiment:
    exp = dg.Experiment(tmp_path_factory.mktemp("report") / "exp", state_class=State)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag(NASTY):
        for lr in (0.001, 0.01, 0.1):
            with exp.tag(f"lr:{lr}"):
                trained = Train(lr=lr, nb_epochs=1)(root)
                sparsity(trained)
                nonzero(trained)
                for fraction in (0.5, 0.8):
                    with exp.tag("pruned"):
                        pruned = Prune(fraction=fraction)(trained)
                        sparsity(pruned)
                        nonzero(pruned)
                        Finetune(lr=lr / 10, nb_epochs=1)(pruned)
    exp.run()
    return exp


@pytest.fixture(scope="module")
def results(experiment: dg.Experiment) -> pd.DataFrame:
    return experiment.results()


def keys(graph: Graph) -> list[str]:
    return [n.key.hex[:12] for n in graph.nodes]


# -- colouring and draw -------------------------------------------------------------------------


def test_coloring_scales_a_metric_and_leaves_nodes_without_one_white(
    experiment: dg.Experiment, results: pd.DataFrame
) -> None:
    graph = experiment.graph
    colors = report.coloring(graph.nodes, results)  # default: the first numeric Function result
    assert colors.by == "sparsity" and colors.kind == "scale"
    values = dict(zip(results["key"], results["sparsity"], strict=True))
    low = min(v for v in values.values() if v == v)
    high = max(v for v in values.values() if v == v)
    assert (colors.low, colors.high) == (low, high)
    for key, value in values.items():
        if value != value:  # NaN: the root and the finetuned nodes have no sparsity
            assert colors.fill(key) is None
        elif value == low:
            assert colors.fill(key) == report.VIRIDIS[0]
        elif value == high:
            assert colors.fill(key) == report.VIRIDIS[-1]
    assert len(colors.legend) == 5 and colors.legend[0][0] == report.VIRIDIS[0]


def test_coloring_by_tags_and_by_text_columns(
    experiment: dg.Experiment, results: pd.DataFrame
) -> None:
    graph = experiment.graph
    colors = report.coloring(graph.nodes, None, "tag:lr:*")
    assert colors.kind == "categories"
    assert [text for _, text in colors.legend] == ["lr:0.001", "lr:0.01", "lr:0.1"]
    assert colors.fill(graph.root.key.hex[:12]) is None  # no lr tag
    for node in graph.nodes_at_distance(1):
        lr = next(t for t in node.tags if t.startswith("lr:"))
        assert colors.shown[node.key.hex[:12]] == lr
    by_recipe = report.coloring(graph.nodes, results, "recipe")
    assert [text for _, text in by_recipe.legend] == ["Train", "Prune", "Finetune"]
    with pytest.raises(KeyError, match="tag:GLOB"):
        report.coloring(graph.nodes, results, "no such column")
    with pytest.raises(ValueError, match="pattern"):
        report.coloring(graph.nodes, results, "tag:")


def test_draw_color_by_fills_nodes_and_adds_a_legend(experiment: dg.Experiment) -> None:
    graph = experiment.graph
    plain = graph.draw().source
    assert "fillcolor" not in plain and "cluster_legend" not in plain

    source = graph.draw(color_by="nonzero").source
    assert "subgraph cluster_legend" in source and "colour: nonzero" in source
    assert "(min)" in source and "(max)" in source and "no value" in source
    filled = re.findall(r'fillcolor="(#[0-9a-f]{6})"', source)
    assert len(filled) == len(graph)  # the legend's swatches are BGCOLORs, not nodes
    assert source.count('style="filled,dashed"') == 1 + 3 * 2  # the root and the finetuned
    assert "nonzero = 2368" in source

    tags = graph.draw(color_by="tag:lr:*").source
    assert "lr:0.01</TD>" in tags and "no matching tag" in tags
    # User text in the legend's HTML-like label is escaped.
    assert "colour: tag:&lt;b&gt;" in graph.draw(color_by="tag:<b>*").source


# -- plot -----------------------------------------------------------------------------------------


def test_plot_draws_lines_per_hue_and_renders(experiment: dg.Experiment, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    fig = experiment.graph.plot("Train.lr", "nonzero", hue="recipe")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Train.lr", "nonzero")
    assert ax.get_xscale() == "log"  # 0.001 .. 0.1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Train", "Prune"]
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [3]  # Train: one x per lr
    assert len(ax.collections) == 1  # Prune: two fractions per lr, so points, not a zigzag
    path = tmp_path / "plot.png"
    fig.savefig(path)
    pixels = imread(path)
    assert pixels.shape[:2] == (440, 640)
    ink = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.02 < ink < 0.5, ink
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20

    subset = experiment.graph.nodes.filter("lr:0.1").plot("Prune.fraction", "sparsity")
    assert subset.axes[0].get_legend() is None

    with pytest.raises(KeyError, match="no column 'nope'"):
        experiment.graph.plot("nope", "sparsity")
    with pytest.raises(ValueError, match="numeric"):
        experiment.graph.plot("Train.lr", "tags")


def test_plot_without_matplotlib_names_the_extra(
    experiment: dg.Experiment, results: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'dagger-lab\[plots\]'"):
        experiment.graph.plot("Train.lr", "sparsity")
    with pytest.raises(ImportError, match=r"NodeSet\.plot"):
        experiment.graph.nodes.plot("Train.lr", "sparsity")
    page = report.report_html(experiment.graph.nodes, results, title="t")
    assert "matplotlib is not installed" in page and "dagger-lab[plots]" in page
    assert '<div class="plot">' not in page
    assert all(f'id="n-{k}"' in page for k in keys(experiment.graph))


# -- the report -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(experiment: dg.Experiment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    argv = ["--store", experiment.path, "report", experiment.path, "-o", str(out)]
    assert main(argv) == 0
    return out


def test_report_cli_writes_one_self_contained_file(
    page: Path, experiment: dg.Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    text = page.read_text(encoding="utf-8")
    assert f"<h1>{experiment.name}</h1>" in text
    assert f"<b>{len(experiment.graph)}</b> nodes" in text and experiment.store.url in text
    assert "colour: <code>sparsity</code>" in text  # the first numeric Function result
    assert '<div class="plot"><svg' in text  # matplotlib's SVG, inline
    # Nothing is fetched: no external resource, and the CSP forbids any.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "<link" not in text and "@import" not in text
    assert not re.search(r"url\((?!#)", text)  # matplotlib's clip paths: url(#id), in the page
    assert "default-src 'none'" in text
    # User text is escaped wherever it lands.
    assert "<script>document.title" not in text and "<b>\"&'</b>" not in text
    assert html.escape(NASTY) in text

    out = page.with_name("custom.html")
    argv = ["--store", experiment.path, "report", experiment.name, "-o", str(out),
            "--color-by", "tag:lr:*",
            "--x", "Prune.fraction", "--y", "nonzero", "--hue", "tags"]  # fmt: skip
    assert main(argv) == 0
    custom = out.read_text(encoding="utf-8")
    assert "colour: <code>tag:lr:*</code>" in custom and "lr:0.01</span>" in custom
    capsys.readouterr()
    assert main([*argv[:-6], "--x", "Train.lr"]) == 2
    assert "both x and y" in capsys.readouterr().err
    assert main([*argv[:-6], "--color-by", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_report_of_1000_nodes_shows_every_node_and_row() -> None:
    # Its speed (<= 5 s) is benchmarks/bench_results.py's bar, not a timed test's.
    graph, table = synthetic(branches=(10, 10, 9))
    assert len(graph) == 1 + 10 + 100 + 900
    text = report.report_html(graph.nodes, table, title="big", store_url="memory://big")
    assert text.count('<g class="node"') == len(graph)
    assert text.count("<tr id=") == len(graph)


def test_tree_layout_never_overlaps_and_centres_parents() -> None:
    graph, table = synthetic(branches=(3, 1, 4))
    boxes = report._boxes(list(graph.nodes), report.coloring(graph.nodes, table))
    by_key = {b.node.key: b for b in boxes}
    places = {(b.column, b.row) for b in boxes}
    assert len(places) == len(boxes)
    for b in boxes:
        kids = [by_key[c.key] for c in b.node.children]
        assert b.column == b.node.depth
        if kids:
            assert b.row == (kids[0].row + kids[-1].row) / 2
    assert sorted(b.row for b in boxes if not b.node.children) == list(range(3 * 1 * 4))


def test_jupyter_views(experiment: dg.Experiment) -> None:
    graph = experiment.graph
    view = graph._repr_html_()
    assert view.startswith('<div class="dagger-report"') and "<svg" in view
    assert all(f'id="n-{k}"' in view and f'id="r-{k}"' in view for k in keys(graph))
    pruned = graph.nodes.filter("pruned")
    rows = pruned._repr_html_()
    assert rows is not None and "<svg" not in rows
    assert rows.count("<tr id=") == len(pruned) == 12
    assert f'id="r-{graph.root.key.hex[:12]}"' not in rows
    # A graph that does not name its experiment has no results table: the tree alone.
    bare = Graph.from_records(experiment.store, experiment.name, State)
    bare.experiment = None  # a graph put together by hand
    assert "no results table" in bare._repr_html_() and "<table" not in bare._repr_html_()
    assert bare.nodes._repr_html_() is None  # Jupyter shows the text repr instead


# -- in a browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("the report's browser test needs Chromium (Debian: apt-get install chromium)")
    return found


def browse(chromium: str, page: Path, *flags: str) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console messages Chromium logged."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=3000", f"--user-data-dir={page.parent / 'profile'}",
         *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_report_in_a_browser_shows_every_node_and_row(
    chromium: str, page: Path, experiment: dg.Experiment
) -> None:
    dom, console = browse(chromium, page)
    assert console == []  # no error, no warning, nothing at all
    tree = dom[dom.index('<svg xmlns="http://www.w3.org/2000/svg" class="dagger-tree"') :]
    tree = tree[: tree.index("</svg>")]
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    for key in keys(experiment.graph):
        assert f'id="n-{key}"' in tree and f">{key}<" in tree
        assert f'<tr id="r-{key}">' in body
    assert body.count("<tr") == len(experiment.graph)
    assert "<title>pwned" not in dom and "&lt;script&gt;document.title" in dom
    assert 'data-sortable="1"' in dom  # the sorting script ran


def test_report_sorts_by_a_click_numerically(
    chromium: str, page: Path, results: pd.DataFrame
) -> None:
    # A copy of the page drives it: errors and the row orders land in the DOM; and an image
    # from the network shows that the page may fetch nothing (and that console lines are seen).
    probe = """
<img src="https://example.invalid/pixel.png" alt="">
<script>
var out = {errors: window.__errors, orders: {}};
function order() {
  return Array.prototype.map.call(document.querySelectorAll("table.dagger-results tbody tr"),
                                  function (row) { return row.id.slice(2); });
}
var heads = document.querySelectorAll("table.dagger-results th");
["nonzero", "label"].forEach(function (name) {
  var th = Array.prototype.find.call(heads, function (h) { return h.textContent === name; });
  th.click(); out.orders[name + " up"] = order();
  th.click(); out.orders[name + " down"] = order();
  out.orders[name + " aria"] = th.getAttribute("aria-sort");
});
var pre = document.createElement("pre"); pre.id = "probe";
pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
</script>"""
    recorder = "<script>window.__errors = []; window.addEventListener('error', function (e) "
    recorder += "{ window.__errors.push(String(e.message)); });</script>"
    text = page.read_text(encoding="utf-8")
    copy = page.with_name("probe.html")
    copy.write_text(
        text.replace("<head>", "<head>" + recorder, 1).replace("</body>", probe + "</body>", 1),
        encoding="utf-8",
    )
    dom, console = browse(chromium, copy)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found is not None, dom[-3000:]
    out: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    assert out["errors"] == []
    assert console and all("Content Security Policy" in line for line in console), console

    table = results.assign(position=range(len(results)))
    with_value = table[table["nonzero"].notna()]
    up = with_value.sort_values(["nonzero", "position"], kind="stable")["key"].tolist()
    empty = table[table["nonzero"].isna()]["key"].tolist()
    assert out["orders"]["nonzero up"] == up + empty  # numeric: 474 < 1184 < 2368
    assert (
        out["orders"]["nonzero down"][: len(up)]
        == with_value.sort_values(["nonzero", "position"], ascending=[False, True], kind="stable")[
            "key"
        ].tolist()
    )
    assert out["orders"]["nonzero down"][len(up) :] == empty  # empty cells stay last
    assert out["orders"]["nonzero aria"] == "descending"
    labels = [results.set_index("key").loc[k, "label"] for k in out["orders"]["label up"]]
    assert labels[0].startswith("Finetune(lr=0.0001") and labels[-1].startswith("Train(lr=0.1")


# -- helpers --------------------------------------------------------------------------------------


def synthetic(branches: tuple[int, ...]) -> tuple[Graph, pd.DataFrame]:
    """A graph of ``branches[i]`` children per node at depth i (no store records), and a results
    table for it built as the contract says (properties along the path, a result, timings)."""
    graph = Graph(ds.open_store("memory://report-synthetic"), State)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    counter = iter(range(10**6))

    def add(parent: GraphNode | None, depth: int, path: dict[str, Any]) -> Iterator[GraphNode]:
        i = next(counter)
        recipe = None if parent is None else ("Train", "Prune", "Finetune")[(depth - 1) % 3]
        properties = {"seed": 0} if parent is None else {"lr": 10.0 ** -(i % 4), "step": i}
        label = f"{recipe or 'State'}({', '.join(f'{k}={v}' for k, v in properties.items())})"
        node = GraphNode(graph, ds.node_key("test", {"i": i}), label, recipe, properties)
        node.parent = parent
        node.tags = frozenset({f"lr:{properties.get('lr')}", "synthetic"})
        if parent is not None:
            parent.children.append(node)
        path = {**path, **{f"{recipe or 'State'}.{k}": v for k, v in properties.items()}}
        rows.append(
            {"key": node.key.hex[:12], "label": label, "recipe": recipe, "depth": depth,
             "tags": ", ".join(sorted(node.tags)), **path,
             "accuracy": float(rng.random()) if depth else None,
             "seconds": float(rng.random()), "created": pd.Timestamp.now(tz="UTC")}
        )  # fmt: skip
        yield node
        if depth < len(branches):
            for _ in range(branches[depth]):
                yield from add(node, depth + 1, path)

    order = list(add(None, 0, {}))
    graph._by_key = {n.key: n for n in order}
    graph._order = order
    frame = pd.DataFrame(rows)
    properties = [c for c in frame.columns if "." in c]
    fixed = ["key", "label", "recipe", "depth", "tags"]
    return graph, frame[[*fixed, *properties, "accuracy", "seconds", "created"]]


def test_synthetic_table_is_what_the_report_expects() -> None:
    graph, table = synthetic(branches=(2, 2))
    assert report.default_metric(table, list(graph.nodes)) == "accuracy"
    assert report.property_columns(table) == ["State.seed", "Train.lr", "Train.step",
                                              "Prune.lr", "Prune.step"]  # fmt: skip
    assert report.default_axes(table, "accuracy") == ("Train.lr", "accuracy", "recipe")
    svg = report.tree_svg(list(graph.nodes), report.coloring(graph.nodes, table))
    assert svg.count("<rect") == len(graph) == 7
    assert io.StringIO(svg).read().startswith("<svg")
